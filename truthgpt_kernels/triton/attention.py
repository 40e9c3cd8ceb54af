"""Flash attention (FlashAttention-2 structure) in Triton: forward and backward with causal /
sliding window, GQA/MQA, ALiBi, softcap, key padding mask, block-sparse masks, a relative-position
bias by distance (T5) and Philox dropout.

Kernels (the "triton" backend of tk.attention; signatures as ops/reference.py):
- `_attn_fwd`: one program per (query tile, batch * query head); online softmax over the
  visible key tiles, fp32 accumulation, writes out and the natural-log lse.
- `_attn_bwd_delta`: delta = rowsum(dO * O) per query row (fp32). Rows that see exactly one
  key (flagged by the launcher, `_one_key_rows`) use dP at that key instead, so their dS is
  exactly 0 (the softmax of one key is constant), not a rounding difference of two sums.
- `_attn_bwd_dkdv`: one program per (key tile, batch * kv head); loops over the query heads
  sharing that kv head (GQA) and over their visible query tiles. Every dK/dV element is
  written by exactly one program: no atomics, deterministic.
- `_attn_bwd_dq`: one program per (query tile, batch * query head), like the forward.

HAS_REL: score(i, j) += rel[h, j - i + Sq - 1] after softcap (the kernels add it to the masked
log2 scores: -inf stays -inf). Its gradient, the diagonal sums of dS (before the softcap
derivative) over the batch, comes from the dQ kernel without atomics: each program sums its
tiles' diagonals (dS through a scratch tile read back skewed) into a private row, and the
launcher adds the rows in a fixed order (`_rel_grad`); its tiles are fixed (warps tuned) so the
launcher can size the rows. HAS_DROPOUT: P Z / (1 - p) enters P V, dV and dP (the normaliser,
lse and delta = rowsum(dO O) are of the undropped P); Z from Philox4x32-10 written out in
`_philox4` (csrc/common/philox.h's stream, bit for bit), one call per element, or per four keys
when Sk % 4 == 0 (DROP4).

VARLEN (constexpr; triton/attention_varlen.py launches it): packed rows, batch strides 0; the
program of sequence b reads its first rows and lengths from CU_Q / CU_K, returns when its tile
starts past the sequence, and writes out/dq/dk/dv in the packed (T, H, D) layout and the row
statistics as (Hq, Tq). Its dropout reads the sequence's Philox key from SEEDS (int32 lo/hi
pairs) and numbers the sequence's scores as batch 0 of (1, Hq, Sq, Sk). The dense path compiles without any of it.

Which tiles a program visits:
- without a block mask, the window (causal is window_right = 0) gives a contiguous range of
  tiles, computed in the kernel;
- with a block mask, the launcher converts the mask (any block_size) to kernel-tile
  granularity with a 2-D prefix sum, ANDs the tile-level window, and compacts it into a
  per-(b, h, q-tile) list of visible key tiles plus counts (and the transposed lists for
  dK/dV). Each entry is `tile * 2 + partial`: partial tiles (not every covering mask block
  set) get exact per-element block-mask tests, full ones none. So sparse cost scales with
  density, and nothing is synchronised with the host.
Inside a visited tile, element masks (window edge, sequence end, key mask, partial block)
are only computed where the tile needs them.

Scores are computed in the log2 domain (exp2); lse is stored in natural log. Rows without a
visible key give out = 0, lse = -inf and zero gradients. Head dims 1..256 are padded to a
power of two >= 16 in registers (masked loads). Offsets into q/k/v/o use int64 bases, so any
strides and sizes work. The grid is (tiles, heads, batch). fp16/bf16 matmuls run on tensor
cores with fp32 accumulation (P and dS rounded to the input dtype, as flash-attention does);
fp32 inputs use 3xTF32 (`tf32x3`), close to fp32 accuracy, rather than plain TF32.
"""
import collections
import functools

import torch
import triton
import triton.language as tl

from ..backends import BackendError, triton_interpreted
from ..ops.reference import dropout_threshold


# Tile sizes under TRITON_INTERPRET=1 (the CPU interpreter; no tuning there). Tests may change them.
INTERPRET_TILES = {"fwd": (32, 32), "bwd": (32, 32)}

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_TL = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}


# ============================================================================ device helpers
@triton.jit
def _max_nan(a, b):
    """max that propagates NaN (tl.maximum / tl.max drop a NaN operand by default): a NaN
    score must make its row's max NaN, so the row comes out NaN rather than empty (zeros)."""
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _visible(i2, j2, pos_off, Sq, Sk, wl, wr, km_ptr, skms, bm_ptr, sbmq, sbmk, block_size, partial,
             HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, HAS_KMASK: tl.constexpr,
             HAS_LIST: tl.constexpr):
    """Bool tile: may query i (i2) attend key j (j2); i2, j2 broadcast against each other."""
    ipos = i2 + pos_off
    vis = (j2 < Sk) & (i2 >= 0)
    if HAS_LEFT:
        vis = vis & (j2 >= ipos - wl)
    if HAS_RIGHT:
        vis = vis & (j2 <= ipos + wr)
    if HAS_KMASK:
        km = tl.load(km_ptr + j2 * skms, mask=j2 < Sk, other=0)
        vis = vis & (km != 0)
    if HAS_LIST:
        if partial:
            bmv = tl.load(bm_ptr + (i2 // block_size) * sbmq + (j2 // block_size) * sbmk,
                          mask=(i2 < Sq) & (j2 < Sk), other=0)
            vis = vis & (bmv != 0)
    return vis


@triton.jit
def _tile_scores(qk, i2, j2, m0, n0, pos_off, Sq, Sk, scale, softcap, slope, wl, wr,
                 km_ptr, skms, bm_ptr, sbmq, sbmk, block_size, partial,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                 HAS_ALIBI: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
                 HAS_KMASK: tl.constexpr, HAS_LIST: tl.constexpr):
    """Masked log2-domain scores of one tile from the raw fp32 dot products qk, and
    tanh(scale qk / softcap) for the softcap gradient. Queries m0.. (indices i2), keys n0..
    (indices j2), in either orientation. Element masks only where the tile needs them."""
    if HAS_SOFTCAP:  # tanh from exp: stable at both ends
        x = qk * (scale / softcap)
        e = tl.exp(-2.0 * tl.abs(x))
        t = (1.0 - e) / (1.0 + e)
        t = tl.where(x < 0, -t, t)
        s = t * (softcap * 1.4426950408889634)
    else:
        t = qk
        s = qk * (scale * 1.4426950408889634)
    if HAS_ALIBI:
        s = s - (slope * 1.4426950408889634) * tl.abs(i2 + pos_off - j2).to(tl.float32)
    if HAS_KMASK:
        s = tl.where(_visible(i2, j2, pos_off, Sq, Sk, wl, wr, km_ptr, skms, bm_ptr, sbmq, sbmk,
                              block_size, partial, HAS_LEFT, HAS_RIGHT, HAS_KMASK, HAS_LIST),
                     s, float("-inf"))
    else:
        # does the tile reach past Sk, cross a window edge, or hold a partial mask block
        need = (n0 + BLOCK_N) > Sk
        if HAS_LEFT:
            need = need | (n0 < m0 + (BLOCK_M - 1) + pos_off - wl)
        if HAS_RIGHT:
            need = need | (n0 + (BLOCK_N - 1) > m0 + pos_off + wr)
        if HAS_LIST:
            need = need | partial
        if need:
            s = tl.where(_visible(i2, j2, pos_off, Sq, Sk, wl, wr, km_ptr, skms, bm_ptr, sbmq,
                                  sbmk, block_size, partial, HAS_LEFT, HAS_RIGHT, HAS_KMASK,
                                  HAS_LIST),
                         s, float("-inf"))
    return s, t


@triton.jit
def _rel_scores(s, rel_ptr, i2, j2, Sq, Sk):
    """s plus the relative-position bias by distance, rel[j - i + Sq - 1] (rel_ptr at the
    head's row of the (Hq, Sq + Sk - 1) table), in log2 units. Added after _tile_scores, whose
    masked scores are -inf and stay so; rows past Sq and keys past Sk read nothing."""
    bias = tl.load(rel_ptr + (j2 - i2 + Sq - 1), mask=(i2 < Sq) & (j2 < Sk), other=0.0)
    return s + bias * 1.4426950408889634


@triton.jit
def _philox4(ctr, seed_lo, seed_hi):
    """The four uint32 words of Philox4x32-10 for counters ctr (int64 tensor >= 0; c0 = low
    half, c1 = high half, c2 = c3 = 0) and key (seed_lo, seed_hi): csrc/common/philox.h."""
    ROUND_A: tl.constexpr = 0xD2511F53
    ROUND_B: tl.constexpr = 0xCD9E8D57
    WEYL_A: tl.constexpr = 0x9E3779B9
    WEYL_B: tl.constexpr = 0xBB67AE85
    c0 = (ctr & 0xFFFFFFFF).to(tl.uint32)
    c1 = (ctr >> 32).to(tl.uint32)
    c2 = c0 * 0
    c3 = c0 * 0
    k0 = seed_lo.to(tl.uint32)
    k1 = seed_hi.to(tl.uint32)
    for _ in tl.static_range(10):
        n0 = tl.umulhi(c2, ROUND_B) ^ c1 ^ k0
        n2 = tl.umulhi(c0, ROUND_A) ^ c3 ^ k1
        c1 = tl.mul(c2, ROUND_B, sanitize_overflow=False)
        c3 = tl.mul(c0, ROUND_A, sanitize_overflow=False)
        c0 = n0
        c2 = n2
        k0 = tl.add(k0, WEYL_A, sanitize_overflow=False)
        k1 = tl.add(k1, WEYL_B, sanitize_overflow=False)
    return c0, c1, c2, c3


@triton.jit
def _dropout_keep(row0, i2, j2, Sk, seed_lo, seed_hi, dthresh):
    """Bool tile: dropout keeps element (i2, j2) of the (Sq, Sk) score matrix whose first row
    is row0 = (b Hq + h) Sq of the flattened (B, Hq, Sq, Sk): element e = (row0 + i) Sk + j
    is kept iff word e & 3 of Philox(e >> 2) is >= dthresh (ops/reference.py:
    dropout_keep_mask). One Philox call per element; i2, j2 broadcast, either orientation."""
    e = (row0 + i2.to(tl.int64)) * Sk + j2.to(tl.int64)
    c0, c1, c2, c3 = _philox4(e >> 2, seed_lo, seed_hi)
    w = e & 3
    return tl.where(w == 0, c0, tl.where(w == 1, c1, tl.where(w == 2, c2, c3))) >= dthresh.to(tl.uint32)


@triton.jit
def _dropout_keep4(row0, offs_m, n0, Sk, seed_lo, seed_hi, dthresh, BLOCK_M: tl.constexpr,
                   BLOCK_N: tl.constexpr):
    """_dropout_keep of the (BLOCK_M, BLOCK_N) tile of queries offs_m and keys n0.., queries
    x keys, when Sk % 4 == 0 (n0 is a multiple of BLOCK_N, so of 4): then keys 4c..4c+3 of a
    row share one Philox call and take its words in order, a quarter of the calls."""
    c = tl.arange(0, BLOCK_N // 4)
    ctr = ((row0 + offs_m.to(tl.int64))[:, None] * Sk + n0 + 4 * c[None, :]) >> 2
    w0, w1, w2, w3 = _philox4(ctr, seed_lo, seed_hi)
    # join(join(w0, w2), join(w1, w3))[i, c, k, a] = w_(2k + a): row-major, key 4c + 2k + a
    w = tl.reshape(tl.join(tl.join(w0, w2), tl.join(w1, w3)), (BLOCK_M, BLOCK_N))
    return w >= dthresh.to(tl.uint32)


@triton.jit
def _dropout_tile(row0, offs_m, n0, Sk, seed_lo, seed_hi, dthresh, BLOCK_M: tl.constexpr,
                  BLOCK_N: tl.constexpr, DROP4: tl.constexpr):
    """The keep tile of queries offs_m x keys n0.. (DROP4: Sk % 4 == 0, a quarter of the calls)."""
    if DROP4:
        keep = _dropout_keep4(row0, offs_m, n0, Sk, seed_lo, seed_hi, dthresh, BLOCK_M, BLOCK_N)
    else:
        keep = _dropout_keep(row0, offs_m[:, None], n0 + tl.arange(0, BLOCK_N)[None, :], Sk, seed_lo,
                             seed_hi, dthresh)
    return keep


@triton.jit
def _seq(CU_Q, CU_K, b):
    """(first query row int64, Sq int32, first key row int64, Sk int32) of sequence b of a
    packed (varlen) batch."""
    q0 = tl.load(CU_Q + b)
    k0 = tl.load(CU_K + b)
    return q0.to(tl.int64), tl.load(CU_Q + b + 1) - q0, k0.to(tl.int64), tl.load(CU_K + b + 1) - k0


@triton.jit
def _seq_bwd_ptrs(Q, K, V, DO, LSE, DELTA, ONE, q0, k0, sqs, sks, svs, sds):
    """The backward's pointers moved to a sequence's first rows: q, k, v, dO by their row
    strides, the (Hq, Tq) row statistics by q0."""
    return Q + q0 * sqs, K + k0 * sks, V + k0 * svs, DO + q0 * sds, LSE + q0, DELTA + q0, ONE + q0


@triton.jit
def _kv_tiles(m0, pos_off, Sq, Sk, wl, wr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr):
    """(first key tile, count) visible from query tile m0 under the window (no block mask)."""
    lo = m0 * 0
    hi = m0 * 0 + Sk
    if HAS_LEFT:
        lo = tl.maximum(m0 + pos_off - wl, 0)
    if HAS_RIGHT:
        hi = tl.minimum(tl.minimum(m0 + BLOCK_M, Sq) - 1 + pos_off + wr + 1, Sk)
    n = tl.where(hi > lo, (hi + BLOCK_N - 1) // BLOCK_N - lo // BLOCK_N, 0)
    return lo // BLOCK_N, n


@triton.jit
def _q_tiles(n0, pos_off, Sq, Sk, wl, wr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
             HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr):
    """(first query tile, count) that see key tile n0 under the window (no block mask)."""
    lo = n0 * 0
    hi = n0 * 0 + Sq
    if HAS_RIGHT:
        lo = tl.maximum(n0 - wr - pos_off, 0)
    if HAS_LEFT:
        hi = tl.minimum(tl.minimum(n0 + BLOCK_N, Sk) - 1 + wl - pos_off + 1, Sq)
    n = tl.where(hi > lo, (hi + BLOCK_M - 1) // BLOCK_M - lo // BLOCK_M, 0)
    return lo // BLOCK_M, n


@triton.jit
def _q_tile(Q, b, h, m0, sqb, sqh, sqs, sqd, Sq, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
            BLOCK_M: tl.constexpr, DOT_T: tl.constexpr):
    """Query rows [m0, m0 + BLOCK_M) of (batch b, head h) as DOT_T, zero past Sq and HEAD_DIM,
    with the row / column offsets and masks the kernels go on using."""
    ar_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < HEAD_DIM
    offs_m = m0.to(tl.int32) + ar_m
    mmask = offs_m < Sq
    q = tl.load(Q + b * sqb + h * sqh + m0 * sqs + ar_m[:, None] * sqs + offs_d[None, :] * sqd,
                mask=mmask[:, None] & dmask[None, :], other=0.0).to(DOT_T)
    return q, ar_m, offs_m, mmask, offs_d, dmask


# Every kernel below takes DOT_T, the operand type of its tl.dot calls: the input dtype, except
# under the CPU interpreter with bfloat16 inputs (its tl.dot multiplies bfloat16 as raw integers),
# where the operands, already rounded to bfloat16, are widened to float32. On GPUs the `.to(DOT_T)`
# casts are no-ops.

# ============================================================================ forward
@triton.jit(do_not_specialize=["Sq", "Sk", "wl", "wr", "block_size", "SQ_KEY", "SK_KEY", "TQ",
                               "seed_lo", "seed_hi", "dthresh"])
def _attn_fwd(Q, K, V, O, LSE, SLOPES, BMASK, KMASK, LIST, CNT, CU_Q, CU_K,
              sqb, sqh, sqs, sqd, skb, skh, sks, skd, svb, svh, svs, svd,
              sab, sah, sbmb, sbmh, sbmq, sbmk, skmb, skms, slb, slh, slt, scb, sch,
              Hq, G, Sq, Sk, scale, softcap, wl, wr, block_size, SQ_KEY, SK_KEY, TQ,
              REL, SEEDS, seed_lo, seed_hi, dthresh, dscale,
              HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
              HAS_ALIBI: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_LEFT: tl.constexpr,
              HAS_RIGHT: tl.constexpr, HAS_LIST: tl.constexpr, HAS_KMASK: tl.constexpr,
              VARLEN: tl.constexpr, HAS_REL: tl.constexpr, HAS_DROPOUT: tl.constexpr,
              DROP4: tl.constexpr, PREC: tl.constexpr, DOT_T: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # heaviest (last, under causal) query tiles first
    pid_m = (tl.num_programs(0) - 1 - tl.program_id(0)).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    pid_bh = b * Hq + h
    hk = h // G
    m0 = pid_m * BLOCK_M
    drop_bh = pid_bh  # the dropout stream's (batch, head) row block
    rel_w = Sq + Sk - 1  # the bias rows' length and key offset (VARLEN: of the longest lengths)
    rel_k = Sk
    if VARLEN:  # sequence b of the packed rows (the batch strides are 0)
        q_start, Sq, k_start, Sk = _seq(CU_Q, CU_K, b)
        if m0 >= Sq:
            return
        if HAS_DROPOUT:  # sequence b: its own key, its scores as batch 0 of (1, Hq, Sq, Sk)
            seed_lo = tl.load(SEEDS + 2 * b)
            seed_hi = tl.load(SEEDS + 2 * b + 1)
            drop_bh = h
        Q = Q + q_start * sqs
        K = K + k_start * sks
        V = V + k_start * svs
    pos_off = Sk - Sq
    ar_n = tl.arange(0, BLOCK_N)
    q, ar_m, offs_m, mmask, offs_d, dmask = _q_tile(Q, b, h, m0, sqb, sqh, sqs, sqd, Sq, HEAD_DIM,
                                                    BLOCK_D, BLOCK_M, DOT_T)
    k_base = K + b * skb + hk * skh
    v_base = V + b * svb + hk * svh
    km_ptr = KMASK + b * skmb
    bm_ptr = BMASK + b * sbmb + h * sbmh
    slope = 0.0
    if HAS_ALIBI:
        slope = tl.load(SLOPES + b * sab + h * sah)
    if HAS_REL:  # VARLEN: the sequence's slice, from column rel_k - Sk (reference.varlen_rel_slice)
        rel_ptr = REL + h * rel_w + (rel_k - Sk)

    if HAS_LIST:
        lst = LIST + b * slb + h * slh + pid_m * slt
        n_iter = tl.load(CNT + b * scb + h * sch + pid_m)
        u_lo = 0
    else:
        u_lo, n_iter = _kv_tiles(m0, pos_off, Sq, Sk, wl, wr, BLOCK_M, BLOCK_N, HAS_LEFT, HAS_RIGHT)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    i2 = offs_m[:, None]
    for it in range(0, n_iter):
        if HAS_LIST:
            e = tl.load(lst + it)
            u = e >> 1
            partial = (e & 1) != 0
        else:
            u = u_lo + it
            partial = False
        n0 = (u * BLOCK_N).to(tl.int32)
        n0l = n0.to(tl.int64)
        offs_n = n0 + ar_n
        kv_msk = (offs_n < Sk)[:, None] & dmask[None, :]
        k = tl.load(k_base + n0l * sks + ar_n[:, None] * sks + offs_d[None, :] * skd,
                    mask=kv_msk, other=0.0).to(DOT_T)
        v = tl.load(v_base + n0l * svs + ar_n[:, None] * svs + offs_d[None, :] * svd,
                    mask=kv_msk, other=0.0).to(DOT_T)
        qk = tl.dot(q, tl.trans(k), input_precision=PREC)
        s, _ = _tile_scores(qk, i2, offs_n[None, :], m0, n0, pos_off, Sq, Sk, scale, softcap, slope,
                            wl, wr, km_ptr, skms, bm_ptr, sbmq, sbmk, block_size, partial,
                            BLOCK_M, BLOCK_N, HAS_SOFTCAP, HAS_ALIBI, HAS_LEFT, HAS_RIGHT,
                            HAS_KMASK, HAS_LIST)
        if HAS_REL:
            s = _rel_scores(s, rel_ptr, i2, offs_n[None, :], Sq, Sk)
        m_new = _max_nan(m_i, tl.reduce(s, 1, _max_nan))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # no -inf - -inf on empty rows
        p = tl.exp2(s - m_use[:, None])
        alpha = tl.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)  # of the undropped P: lse and the normaliser
        if HAS_DROPOUT:
            keep = _dropout_tile(drop_bh * Sq, offs_m, n0, Sk, seed_lo, seed_hi, dthresh, BLOCK_M, BLOCK_N,
                                 DROP4)
            p = tl.where(keep, p * dscale, 0.0)
        p = p.to(V.dtype.element_ty).to(DOT_T)
        acc = acc * alpha[:, None] + tl.dot(p, v, input_precision=PREC)
        m_i = m_new

    empty = l_i == 0.0  # (a NaN in v of a key in the tile, seen by other rows, must not leak)
    out = tl.where(empty[:, None], 0.0, acc / tl.where(empty, 1.0, l_i)[:, None])
    lse = tl.where(empty, float("-inf"),
                   (m_i + tl.log2(tl.where(empty, 1.0, l_i))) * 0.6931471805599453)
    if VARLEN:  # out (Tq, Hq, D) contiguous, lse (Hq, Tq)
        row = q_start + offs_m
        tl.store(O + row[:, None] * (Hq * HEAD_DIM) + h * HEAD_DIM + offs_d[None, :],
                 out.to(O.dtype.element_ty), mask=mmask[:, None] & dmask[None, :])
        tl.store(LSE + h * TQ + row, lse, mask=mmask)
    else:
        row = pid_bh * Sq + offs_m
        tl.store(O + row[:, None] * HEAD_DIM + offs_d[None, :], out.to(O.dtype.element_ty),
                 mask=mmask[:, None] & dmask[None, :])
        tl.store(LSE + row, lse, mask=mmask)


# ============================================================================ backward
@triton.jit(do_not_specialize=["Sq"])
def _attn_bwd_delta(O, DO, DELTA, sdb, sdh, sds, sdd, Hq, Sq,
                    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                    VARLEN: tl.constexpr = False):
    """VARLEN: all the packed rows as one sequence (B = 1, Sq = Tq), O (Tq, Hq, D) contiguous."""
    pid_m = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    pid_bh = b * Hq + h
    m0 = pid_m * BLOCK_M
    ar_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_m = m0.to(tl.int32) + ar_m
    msk = (offs_m < Sq)[:, None] & (offs_d < HEAD_DIM)[None, :]
    row = pid_bh * Sq + offs_m
    if VARLEN:
        o = tl.load(O + offs_m[:, None].to(tl.int64) * (Hq * HEAD_DIM) + h * HEAD_DIM + offs_d[None, :],
                    mask=msk, other=0.0).to(tl.float32)
    else:
        o = tl.load(O + row[:, None] * HEAD_DIM + offs_d[None, :], mask=msk, other=0.0).to(tl.float32)
    do = tl.load(DO + b * sdb + h * sdh + m0 * sds + ar_m[:, None] * sds + offs_d[None, :] * sdd,
                 mask=msk, other=0.0).to(tl.float32)
    tl.store(DELTA + row, tl.sum(o * do, 1), mask=offs_m < Sq)


@triton.jit(do_not_specialize=["Sq", "Sk", "wl", "wr", "block_size", "SQ_KEY", "SK_KEY", "TQ",
                               "seed_lo", "seed_hi", "dthresh"])
def _attn_bwd_dkdv(Q, K, V, DO, LSE, DELTA, ONE, DK, DV, SLOPES, BMASK, KMASK, LIST, CNT, CU_Q, CU_K,
                   sqb, sqh, sqs, sqd, skb, skh, sks, skd, svb, svh, svs, svd,
                   sdb, sdh, sds, sdd,
                   sab, sah, sbmb, sbmh, sbmq, sbmk, skmb, skms, slb, slh, slt, scb, sch,
                   Hq, G, Sq, Sk, scale, softcap, wl, wr, block_size, SQ_KEY, SK_KEY, TQ,
                   REL, SEEDS, seed_lo, seed_hi, dthresh, dscale,
                   HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                   HAS_ALIBI: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_LEFT: tl.constexpr,
                   HAS_RIGHT: tl.constexpr, HAS_LIST: tl.constexpr, HAS_KMASK: tl.constexpr,
                   VARLEN: tl.constexpr, HAS_REL: tl.constexpr, HAS_DROPOUT: tl.constexpr,
                   DROP4: tl.constexpr, HAS_ONE: tl.constexpr, PREC: tl.constexpr, DOT_T: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Works on transposed tiles (keys x queries): dV = P^T dO, dK = scale dS^T Q."""
    pid_n = tl.program_id(0).to(tl.int64)
    hk = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    pid_bk = b * (Hq // G) + hk
    n0l = pid_n * BLOCK_N
    n0 = n0l.to(tl.int32)
    drop_b = b  # the dropout stream's batch index
    rel_w = Sq + Sk - 1  # as in _attn_fwd
    rel_k = Sk
    if VARLEN:  # sequence b of the packed rows (the batch strides are 0), stats (Hq, Tq)
        q_start, Sq, k_start, Sk = _seq(CU_Q, CU_K, b)
        if n0l >= Sk:
            return
        if HAS_DROPOUT:  # sequence b: its own key, its scores as batch 0 of (1, Hq, Sq, Sk)
            seed_lo = tl.load(SEEDS + 2 * b)
            seed_hi = tl.load(SEEDS + 2 * b + 1)
            drop_b = b * 0
        Q, K, V, DO, LSE, DELTA, ONE = _seq_bwd_ptrs(Q, K, V, DO, LSE, DELTA, ONE, q_start, k_start,
                                                     sqs, sks, svs, sds)
    pos_off = Sk - Sq
    ar_m = tl.arange(0, BLOCK_M)
    ar_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < HEAD_DIM
    offs_n = n0 + ar_n
    kv_msk = (offs_n < Sk)[:, None] & dmask[None, :]
    k = tl.load(K + b * skb + hk * skh + n0l * sks + ar_n[:, None] * sks + offs_d[None, :] * skd,
                mask=kv_msk, other=0.0).to(DOT_T)
    v = tl.load(V + b * svb + hk * svh + n0l * svs + ar_n[:, None] * svs + offs_d[None, :] * svd,
                mask=kv_msk, other=0.0).to(DOT_T)
    km_ptr = KMASK + b * skmb
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    j2 = offs_n[:, None]
    if not HAS_LIST:
        t_lo, n_iter = _q_tiles(n0l, pos_off, Sq, Sk, wl, wr, BLOCK_M, BLOCK_N, HAS_LEFT, HAS_RIGHT)
    for g in range(0, G):  # the query heads sharing this kv head (GQA): summed here, no atomics
        h = hk * G + g
        q_base = Q + b * sqb + h * sqh
        do_base = DO + b * sdb + h * sdh
        if VARLEN:
            stat = h * TQ
        else:
            stat = (b * Hq + h) * Sq
        bm_ptr = BMASK + b * sbmb + h * sbmh
        slope = 0.0
        if HAS_ALIBI:
            slope = tl.load(SLOPES + b * sab + h * sah)
        if HAS_REL:
            rel_ptr = REL + h * rel_w + (rel_k - Sk)
        if HAS_LIST:
            lst = LIST + b * slb + h * slh + pid_n * slt
            n_iter = tl.load(CNT + b * scb + h * sch + pid_n)
        for it in range(0, n_iter):
            if HAS_LIST:
                e = tl.load(lst + it)
                t_idx = e >> 1
                partial = (e & 1) != 0
            else:
                t_idx = t_lo + it
                partial = False
            m0 = (t_idx * BLOCK_M).to(tl.int32)
            m0l = m0.to(tl.int64)
            offs_m = m0 + ar_m
            mmask = offs_m < Sq
            q_msk = mmask[:, None] & dmask[None, :]
            q = tl.load(q_base + m0l * sqs + ar_m[:, None] * sqs + offs_d[None, :] * sqd,
                        mask=q_msk, other=0.0).to(DOT_T)
            do = tl.load(do_base + m0l * sds + ar_m[:, None] * sds + offs_d[None, :] * sdd,
                         mask=q_msk, other=0.0).to(DOT_T)
            lse = tl.load(LSE + stat + offs_m, mask=mmask, other=float("inf"))
            lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
            delta = tl.load(DELTA + stat + offs_m, mask=mmask, other=0.0)[None, :]
            kq = tl.dot(k, tl.trans(q), input_precision=PREC)  # (BLOCK_N, BLOCK_M)
            s, t = _tile_scores(kq, offs_m[None, :], j2, m0, n0, pos_off, Sq, Sk, scale, softcap,
                                slope, wl, wr, km_ptr, skms, bm_ptr, sbmq, sbmk, block_size, partial,
                                BLOCK_M, BLOCK_N, HAS_SOFTCAP, HAS_ALIBI, HAS_LEFT, HAS_RIGHT,
                                HAS_KMASK, HAS_LIST)
            if HAS_REL:
                s = _rel_scores(s, rel_ptr, offs_m[None, :], j2, Sq, Sk)
            p = tl.exp2(s - lse2[None, :])  # 0 where masked, in empty rows and past Sq
            dp = tl.dot(v, tl.trans(do), input_precision=PREC)
            if HAS_DROPOUT:  # dV = (P Z / (1 - p))^T dO, dP = (dO V^T) Z / (1 - p)
                if DROP4:
                    keep = tl.trans(_dropout_keep4((drop_b * Hq + h) * Sq, offs_m, n0, Sk, seed_lo, seed_hi,
                                                   dthresh, BLOCK_M, BLOCK_N))
                else:
                    keep = _dropout_keep((drop_b * Hq + h) * Sq, offs_m[None, :], j2, Sk, seed_lo, seed_hi,
                                         dthresh)
                dv += tl.dot(tl.where(keep, p * dscale, 0.0).to(DO.dtype.element_ty).to(DOT_T), do,
                             input_precision=PREC)
                dp = tl.where(keep, dp * dscale, 0.0)
            else:
                dv += tl.dot(p.to(DO.dtype.element_ty).to(DOT_T), do, input_precision=PREC)
            if HAS_ONE:  # one-key rows: delta = dP at the key (see _one_key_rows)
                one = tl.load(ONE + stat + offs_m, mask=mmask, other=0) != 0
                delta = tl.where(one[None, :], dp, delta)
            ds = p * (dp - delta)
            if HAS_SOFTCAP:
                ds = ds * (1.0 - t * t)
            dk += tl.dot(ds.to(Q.dtype.element_ty).to(DOT_T), q, input_precision=PREC)
    if VARLEN:  # dk, dv (Tk, Hkv, D) contiguous
        o_ptrs = ((k_start + offs_n)[:, None] * ((Hq // G) * HEAD_DIM) + hk * HEAD_DIM
                  + offs_d[None, :])
    else:
        o_ptrs = (pid_bk * Sk + offs_n)[:, None] * HEAD_DIM + offs_d[None, :]
    tl.store(DK + o_ptrs, (dk * scale).to(DK.dtype.element_ty), mask=kv_msk)
    tl.store(DV + o_ptrs, dv.to(DV.dtype.element_ty), mask=kv_msk)


@triton.jit(do_not_specialize=["Sq", "Sk", "wl", "wr", "block_size", "SQ_KEY", "SK_KEY", "TQ",
                               "seed_lo", "seed_hi", "dthresh"])
def _attn_bwd_dq(Q, K, V, DO, LSE, DELTA, ONE, DQ, SLOPES, BMASK, KMASK, LIST, CNT, CU_Q, CU_K,
                 sqb, sqh, sqs, sqd, skb, skh, sks, skd, svb, svh, svs, svd,
                 sdb, sdh, sds, sdd,
                 sab, sah, sbmb, sbmh, sbmq, sbmk, skmb, skms, slb, slh, slt, scb, sch,
                 Hq, G, Sq, Sk, scale, softcap, wl, wr, block_size, SQ_KEY, SK_KEY, TQ,
                 REL, SEEDS, seed_lo, seed_hi, dthresh, dscale,
                 HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                 HAS_ALIBI: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_LEFT: tl.constexpr,
                 HAS_RIGHT: tl.constexpr, HAS_LIST: tl.constexpr, HAS_KMASK: tl.constexpr,
                 VARLEN: tl.constexpr, HAS_REL: tl.constexpr, HAS_DROPOUT: tl.constexpr,
                 DROP4: tl.constexpr, HAS_ONE: tl.constexpr, PREC: tl.constexpr, DOT_T: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 DREL=None, DSCR=None, sdrel=0, REL_W: tl.constexpr = 1):
    """dQ = scale dS K, dS = P (dO V^T - delta), over the key tiles the forward visited.

    HAS_REL: the bias's gradient by distance. Each program owns row (pid_bh, pid_m) of DREL
    (sdrel floats; entry d = j - (i - m0) + BLOCK_M - 1; VARLEN: the vector's own columns,
    shifted by REL_W, so the sequences' rows add up directly) and a BLOCK_M x BLOCK_N scratch tile
    of DSCR. Per key tile: dS (before the softcap derivative) goes to the scratch, is read back
    skewed (REL_W = next power of two >= BLOCK_M + BLOCK_N - 1 diagonals) and summed over the
    rows, then added into the row at n0 (consecutive tiles overlap: barriers between). The
    launcher sums the rows over the batch and the query tiles in a fixed order (no atomics)."""
    pid_m = (tl.num_programs(0) - 1 - tl.program_id(0)).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    pid_bh = b * Hq + h
    hk = h // G
    m0 = pid_m * BLOCK_M
    drop_bh = pid_bh  # the dropout stream's (batch, head) row block
    rel_w = Sq + Sk - 1  # as in _attn_fwd
    rel_k = Sk
    if VARLEN:  # sequence b of the packed rows (the batch strides are 0), stats (Hq, Tq)
        q_start, Sq, k_start, Sk = _seq(CU_Q, CU_K, b)
        if m0 >= Sq:
            return
        if HAS_DROPOUT:  # sequence b: its own key, its scores as batch 0 of (1, Hq, Sq, Sk)
            seed_lo = tl.load(SEEDS + 2 * b)
            seed_hi = tl.load(SEEDS + 2 * b + 1)
            drop_bh = h
        Q, K, V, DO, LSE, DELTA, ONE = _seq_bwd_ptrs(Q, K, V, DO, LSE, DELTA, ONE, q_start, k_start,
                                                     sqs, sks, svs, sds)
    pos_off = Sk - Sq
    ar_n = tl.arange(0, BLOCK_N)
    q, ar_m, offs_m, mmask, offs_d, dmask = _q_tile(Q, b, h, m0, sqb, sqh, sqs, sqd, Sq, HEAD_DIM,
                                                    BLOCK_D, BLOCK_M, DOT_T)
    q_msk = mmask[:, None] & dmask[None, :]
    do = tl.load(DO + b * sdb + h * sdh + m0 * sds + ar_m[:, None] * sds + offs_d[None, :] * sdd,
                 mask=q_msk, other=0.0).to(DOT_T)
    if VARLEN:
        stat = h * TQ
    else:
        stat = pid_bh * Sq
    lse = tl.load(LSE + stat + offs_m, mask=mmask, other=float("inf"))
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
    delta = tl.load(DELTA + stat + offs_m, mask=mmask, other=0.0)[:, None]
    if HAS_ONE:
        one = (tl.load(ONE + stat + offs_m, mask=mmask, other=0) != 0)[:, None]
    k_base = K + b * skb + hk * skh
    v_base = V + b * svb + hk * svh
    km_ptr = KMASK + b * skmb
    bm_ptr = BMASK + b * sbmb + h * sbmh
    slope = 0.0
    if HAS_ALIBI:
        slope = tl.load(SLOPES + b * sab + h * sah)
    if HAS_REL:
        rel_ptr = REL + h * rel_w + (rel_k - Sk)
        prog = pid_bh * tl.num_programs(0) + pid_m
        drel_row = DREL + prog * sdrel
        scr = DSCR + prog * (BLOCK_M * BLOCK_N)
        ar_w = tl.arange(0, REL_W)
        w_msk = ar_w < BLOCK_M + BLOCK_N - 1
        scr_tile = scr + ar_m[:, None] * BLOCK_N + ar_n[None, :]
        skew_col = ar_w[None, :] - (BLOCK_M - 1) + ar_m[:, None]  # (BLOCK_M, REL_W): c = d - BM + 1 + r
        skew_msk = (skew_col >= 0) & (skew_col < BLOCK_N)
        for w0 in range(0, sdrel, REL_W):  # zero the row here: a relaunch (autotuning) repeats it
            tl.store(drel_row + w0 + ar_w, tl.zeros([REL_W], dtype=tl.float32), mask=w0 + ar_w < sdrel)
        tl.debug_barrier()
        if VARLEN:  # entry d goes to the vector's column d + Sq + rel_k - Sk - (pid_m + 1) BM, + REL_W
            drel_row += REL_W + Sq + rel_k - Sk - (pid_m + 1) * BLOCK_M
    if HAS_LIST:
        lst = LIST + b * slb + h * slh + pid_m * slt
        n_iter = tl.load(CNT + b * scb + h * sch + pid_m)
        u_lo = 0
    else:
        u_lo, n_iter = _kv_tiles(m0, pos_off, Sq, Sk, wl, wr, BLOCK_M, BLOCK_N, HAS_LEFT, HAS_RIGHT)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    i2 = offs_m[:, None]
    for it in range(0, n_iter):
        if HAS_LIST:
            e = tl.load(lst + it)
            u = e >> 1
            partial = (e & 1) != 0
        else:
            u = u_lo + it
            partial = False
        n0 = (u * BLOCK_N).to(tl.int32)
        n0l = n0.to(tl.int64)
        offs_n = n0 + ar_n
        kv_msk = (offs_n < Sk)[:, None] & dmask[None, :]
        k = tl.load(k_base + n0l * sks + ar_n[:, None] * sks + offs_d[None, :] * skd,
                    mask=kv_msk, other=0.0).to(DOT_T)
        v = tl.load(v_base + n0l * svs + ar_n[:, None] * svs + offs_d[None, :] * svd,
                    mask=kv_msk, other=0.0).to(DOT_T)
        qk = tl.dot(q, tl.trans(k), input_precision=PREC)
        s, t = _tile_scores(qk, i2, offs_n[None, :], m0, n0, pos_off, Sq, Sk, scale, softcap, slope,
                            wl, wr, km_ptr, skms, bm_ptr, sbmq, sbmk, block_size, partial,
                            BLOCK_M, BLOCK_N, HAS_SOFTCAP, HAS_ALIBI, HAS_LEFT, HAS_RIGHT,
                            HAS_KMASK, HAS_LIST)
        if HAS_REL:
            s = _rel_scores(s, rel_ptr, i2, offs_n[None, :], Sq, Sk)
        p = tl.exp2(s - lse2[:, None])
        dp = tl.dot(do, tl.trans(v), input_precision=PREC)
        if HAS_DROPOUT:  # dP = (dO V^T) Z / (1 - p)
            keep = _dropout_tile(drop_bh * Sq, offs_m, n0, Sk, seed_lo, seed_hi, dthresh, BLOCK_M, BLOCK_N,
                                 DROP4)
            dp = tl.where(keep, dp * dscale, 0.0)
        if HAS_ONE:  # one-key rows: delta = dP at the key (see _one_key_rows)
            ds = p * (dp - tl.where(one, dp, delta))
        else:
            ds = p * (dp - delta)
        if HAS_REL:  # diagonal sums of dS into this program's row (0 past Sq and Sk)
            tl.store(scr_tile, ds)
            tl.debug_barrier()
            diag = tl.sum(tl.load(scr + ar_m[:, None] * BLOCK_N + skew_col, mask=skew_msk, other=0.0), 0)
            dst = drel_row + n0l + ar_w
            tl.store(dst, tl.load(dst, mask=w_msk, other=0.0) + diag, mask=w_msk)
            tl.debug_barrier()
        if HAS_SOFTCAP:
            ds = ds * (1.0 - t * t)
        dq += tl.dot(ds.to(K.dtype.element_ty).to(DOT_T), k, input_precision=PREC)
    if VARLEN:  # dq (Tq, Hq, D) contiguous
        row = q_start + offs_m
        tl.store(DQ + row[:, None] * (Hq * HEAD_DIM) + h * HEAD_DIM + offs_d[None, :],
                 (dq * scale).to(DQ.dtype.element_ty), mask=q_msk)
    else:
        row = pid_bh * Sq + offs_m
        tl.store(DQ + row[:, None] * HEAD_DIM + offs_d[None, :], (dq * scale).to(DQ.dtype.element_ty),
                 mask=q_msk)


# ============================================================================ configurations
# GPU configurations per architecture, kernel and head-dim class (BLOCK_D <= 64, 128, 256):
# (BLOCK_M, BLOCK_N, num_warps, num_stages), BLOCK_M the query tile and BLOCK_N the key tile
# in every kernel. Chosen offline by compiling every candidate for sm_80 and sm_90 (bf16) and
# keeping those that fit the shared memory (A100 164 KiB, H100/H200 227 KiB) without register
# spills; 16-row query tiles serve decoding (Sq <= 16). The autotuner benchmarks what survives
# `_prune` (which also drops tiles far larger than the sequence, and, by an estimate, what
# float32 inputs push past the shared memory), keyed on head dim, power-of-two buckets of the
# lengths, and the window. Other architectures use the sm_80 table.
_TABLE = {
    80: {
        "fwd": {64: [(128, 128, 8, 3), (128, 64, 8, 3), (128, 64, 4, 3), (64, 64, 4, 3), (128, 32, 4, 4),
                     (64, 32, 4, 3), (16, 128, 4, 3), (16, 64, 4, 3), (16, 32, 4, 2)],
                128: [(128, 64, 8, 3), (128, 64, 8, 2), (128, 32, 8, 3), (64, 64, 4, 3), (64, 32, 4, 4),
                      (64, 64, 4, 2), (16, 128, 4, 3), (16, 64, 4, 3), (16, 32, 4, 2)],
                256: [(64, 64, 8, 2), (64, 32, 8, 3), (64, 32, 8, 2), (32, 32, 4, 2), (16, 64, 4, 3),
                      (16, 32, 4, 2)]},
        "dkdv": {64: [(32, 64, 8, 2), (16, 128, 8, 2), (16, 64, 4, 3), (16, 64, 4, 2), (32, 32, 4, 2)],
                 128: [(32, 64, 8, 2), (32, 64, 8, 3), (16, 64, 8, 3), (32, 32, 4, 2)],
                 256: [(32, 32, 8, 2), (16, 32, 8, 2), (16, 32, 4, 1)]},
        "dq": {64: [(128, 32, 8, 3), (128, 64, 8, 2), (64, 64, 8, 3), (64, 32, 4, 3), (64, 64, 4, 2),
                    (128, 32, 4, 3), (16, 64, 4, 2)],
               128: [(64, 64, 8, 2), (64, 64, 8, 3), (64, 32, 8, 3), (64, 32, 4, 3), (64, 64, 4, 2),
                     (16, 64, 4, 2)],
               256: [(64, 64, 8, 2), (64, 32, 8, 2), (64, 32, 8, 3), (32, 32, 4, 3), (16, 32, 4, 1)]},
    },
    90: {
        "fwd": {64: [(128, 128, 8, 3), (128, 64, 8, 3), (128, 64, 4, 3), (64, 64, 4, 3), (128, 32, 4, 4),
                     (64, 32, 4, 3), (16, 128, 4, 3), (16, 64, 4, 3), (16, 32, 4, 2)],
                128: [(128, 128, 8, 3), (128, 64, 8, 3), (128, 64, 8, 2), (128, 32, 8, 3), (64, 64, 4, 3),
                      (64, 32, 4, 4), (16, 128, 4, 3), (16, 64, 4, 3), (16, 32, 4, 2)],
                256: [(128, 32, 8, 2), (64, 64, 8, 2), (64, 32, 8, 3), (64, 32, 8, 2), (32, 32, 4, 2),
                      (16, 64, 4, 3), (16, 32, 4, 2)]},
        "dkdv": {64: [(32, 128, 8, 3), (32, 128, 8, 2), (64, 64, 8, 2), (64, 64, 8, 3), (32, 64, 8, 2),
                      (16, 128, 8, 2), (32, 64, 4, 3), (64, 64, 4, 2)],
                 128: [(32, 64, 8, 2), (32, 64, 8, 3), (16, 64, 8, 3), (16, 128, 8, 2), (16, 128, 8, 3)],
                 256: [(32, 32, 8, 2), (16, 32, 8, 2), (16, 64, 8, 1)]},
        "dq": {64: [(128, 32, 8, 3), (128, 64, 8, 2), (64, 64, 8, 3), (64, 32, 4, 3), (64, 64, 4, 2),
                    (128, 32, 4, 3), (16, 64, 4, 2)],
               128: [(128, 64, 8, 3), (128, 32, 8, 3), (128, 32, 8, 2), (128, 64, 8, 2), (64, 64, 8, 2),
                     (64, 32, 8, 3), (16, 64, 4, 2)],
               256: [(64, 64, 8, 2), (64, 32, 8, 2), (64, 32, 8, 3), (32, 32, 4, 3), (16, 32, 4, 1)]},
    },
}
# With a block mask the launcher builds its tile lists for one tile shape (the same for the
# dK/dV and dQ kernels, which share the lists): (BLOCK_M, BLOCK_N) per head-dim class; only
# warps and stages are tuned. Chosen like the table (no spills on sm_80 and sm_90 at 8 warps).
_LIST_TILES = {"fwd": {64: (128, 64), 128: (64, 64), 256: (64, 32)},
               "bwd": {64: (64, 32), 128: (32, 64), 256: (32, 32)}}
_LIST_WARPS = [(8, 2), (8, 3), (4, 2)]
_KEY = ["HEAD_DIM", "SQ_KEY", "SK_KEY", "HAS_LEFT", "HAS_RIGHT", "VARLEN"]


def _dclass(block_d: int) -> int:
    return 64 if block_d <= 64 else block_d


def _configs(kind):
    shapes = sorted({c for arch in _TABLE.values() for c in sum(arch[kind].values(), [])})
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=st)
            for bm, bn, w, st in shapes]


_WARP_CONFIGS = [triton.Config({}, num_warps=w, num_stages=st) for w, st in _LIST_WARPS]


@functools.lru_cache(maxsize=None)
def _arch(device_index: int):
    """(table key, shared memory bytes per block) of a CUDA device."""
    major, minor = torch.cuda.get_device_capability(device_index)
    if major == 9:
        return 90, 227 * 1024
    if (major, minor) == (8, 0):
        return 80, 164 * 1024
    if major == 10:
        return 80, 227 * 1024
    return 80, 99 * 1024  # sm_86, sm_89, sm_120 and older: less shared memory


def _prune(kind):
    def prune(configs, named_args, **kwargs):
        a = {**named_args, **kwargs}
        d, elem = a["BLOCK_D"], a["Q"].element_size()
        arch, limit = _arch(a["Q"].device.index or 0)
        sq, sk = a["SQ_KEY"], a["SK_KEY"]
        if "BLOCK_M" in configs[0].kwargs:  # tile shapes tuned: this arch's table for this head dim
            allowed = set(_TABLE[arch][kind][_dclass(d)])
            configs = [c for c in configs
                       if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) in allowed]

        def tiles(c):
            return c.kwargs.get("BLOCK_M", a.get("BLOCK_M")), c.kwargs.get("BLOCK_N", a.get("BLOCK_N"))

        keep = []
        for c in configs:
            bm, bn = tiles(c)
            # tiles far larger than the sequence only waste work; 16-row query tiles only for
            # decoding (except as the inner loop of dK/dV)
            if "BLOCK_M" in c.kwargs and (bm > max(16, sq) or bn > max(32, sk)
                                          or (bm == 16 and sq > 16 and kind != "dkdv")):
                continue
            # the table holds what fits for 16-bit inputs; for float32 (twice the bytes) estimate
            # the operand tiles staged through shared memory
            stream, fixed = (bm, bn) if kind == "dkdv" else (bn, bm)
            if elem > 2 and (fixed * d * (1 if kind == "fwd" else 2)
                             + c.num_stages * 2 * stream * d) * elem > limit:
                continue
            keep.append(c)
        if not keep:  # the smallest always runs
            keep = [min(configs, key=lambda c: (tiles(c)[0] * tiles(c)[1], c.num_stages))]
        return keep
    return prune


class _Tuned:
    """The autotuned launchers of a kernel ([False]: tiles from the tuning table, [True]: tiles
    given, warps tuned), built at the first GPU launch: Triton releases before 3.3 query the
    GPU driver when an autotuner is created, which fails at import on a machine without one."""

    def __init__(self, fn, kind):
        self.fn, self.kind, self.built = fn, kind, {}

    def __getitem__(self, tiles_given: bool):
        if tiles_given not in self.built:
            configs = _WARP_CONFIGS if tiles_given else _configs(self.kind)
            self.built[tiles_given] = triton.autotune(
                configs=configs, key=_KEY, prune_configs_by={"early_config_prune": _prune(self.kind)})(self.fn)
        return self.built[tiles_given]


_FWD = _Tuned(_attn_fwd, "fwd")
_DKDV = _Tuned(_attn_bwd_dkdv, "dkdv")
_DQ = _Tuned(_attn_bwd_dq, "dq")


def _list_tiles(which: str, block_d: int):
    """(BLOCK_M, BLOCK_N) of the block-mask (tile list) path; fixed so the lists can be built."""
    if triton_interpreted():
        return INTERPRET_TILES[which]
    return _LIST_TILES[which][_dclass(block_d)]


# ============================================================================ launchers
def _check(q: torch.Tensor, k: torch.Tensor):
    if q.dtype not in _DTYPES:
        raise BackendError(f"the triton attention kernels take float16, bfloat16 and float32, got "
                           f"{q.dtype}; use backend='cpu' or 'reference' for it")
    if q.device.type != "cuda" and not triton_interpreted():
        raise BackendError(f"the triton attention kernels need CUDA tensors (or TRITON_INTERPRET=1), "
                           f"got {q.device}; use backend='cpu' for CPU tensors")
    if max(q.shape[0], q.shape[1], k.shape[1]) > 65535:
        raise BackendError(f"the triton attention kernels launch one grid row per batch and head, at "
                           f"most 65535 each; got batch {q.shape[0]}, heads {q.shape[1]}; use "
                           f"backend='reference'")


def _bucket(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 1))


def _tile_vis(block_mask, block_size, Sq, Sk, BM, BN, wl, wr):
    """Block mask (B, H, nbq, nbk), maybe broadcast, at kernel-tile granularity:
    (visible, partial), bool (B or 1, H or 1, ceil(Sq/BM), ceil(Sk/BN)). A tile is visible when
    some covering mask block is set and the window reaches it; partial when not every covering
    block is set (the kernel then tests the mask per element)."""
    bm = block_mask
    if bm.shape[0] > 1 and bm.stride(0) == 0:
        bm = bm[:1]
    if bm.shape[1] > 1 and bm.stride(1) == 0:
        bm = bm[:, :1]
    dev = bm.device
    nqt, nkt = triton.cdiv(Sq, BM), triton.cdiv(Sk, BN)
    i0 = torch.arange(nqt, device=dev) * BM
    i1 = torch.clamp(i0 + BM, max=Sq)  # exclusive
    j0 = torch.arange(nkt, device=dev) * BN
    j1 = torch.clamp(j0 + BN, max=Sk)
    r0, r1 = i0 // block_size, (i1 - 1) // block_size + 1  # covering mask rows [r0, r1)
    c0, c1 = j0 // block_size, (j1 - 1) // block_size + 1
    # 2-D prefix sums: set mask blocks in any rectangle of blocks in four lookups
    pre = bm.to(torch.int32).cumsum(-2, dtype=torch.int32).cumsum(-1, dtype=torch.int32)
    pre = torch.nn.functional.pad(pre, (1, 0, 1, 0))
    p1, p0 = pre.index_select(-2, r1), pre.index_select(-2, r0)
    cnt = (p1.index_select(-1, c1) - p0.index_select(-1, c1)
           - p1.index_select(-1, c0) + p0.index_select(-1, c0))
    area = (r1 - r0)[:, None] * (c1 - c0)[None, :]
    vis = cnt > 0
    # window at tile level: some row i' in [i0, i1) + off and key in [j0, j1) with
    # i' - wl <= j <= i' + wr  <=>  max(i0', j0 - wr) <= min(i1' - 1, j1 - 1 + wl)
    off = Sk - Sq
    lo = (i0 + off)[:, None]
    hi = (i1 - 1 + off)[:, None]
    if wr >= 0:
        lo = torch.maximum(lo, (j0 - wr)[None, :])
    if wl >= 0:
        hi = torch.minimum(hi, (j1 - 1 + wl)[None, :])
    if wl >= 0 or wr >= 0:
        vis = vis & (lo <= hi)
    return vis, cnt < area


def _compact(vis, partial):
    """Per row of the last dim: sorted entries `index * 2 + partial` of the visible tiles, then
    padding; and the counts. int32, contiguous."""
    n = vis.shape[-1]
    idx = torch.arange(n, device=vis.device, dtype=torch.int32)
    code = torch.where(vis, idx * 2 + partial.to(torch.int32), 2 * n + 2)
    lst = code.sort(-1).values.to(torch.int32).contiguous()
    return lst, vis.sum(-1, dtype=torch.int32).contiguous()


_LIST_CACHE: "collections.OrderedDict" = collections.OrderedDict()
_LIST_CACHE_SIZE = 16


def _tile_lists(block_mask, block_size, Sq, Sk, BM, BN, wl, wr, both: bool):
    """((list, counts) per query tile, and with `both` (list, counts) per key tile) for a block
    mask. A model reuses one mask across its layers, forward and backward, so results are kept
    in a small LRU cache keyed on the mask's memory, version counter (in-place edits), layout
    and the tiling; each entry holds a reference to the mask, so its memory cannot be reused
    for another tensor while the entry lives."""
    try:
        key = (block_mask.data_ptr(), block_mask._version, block_mask.device, tuple(block_mask.shape),
               block_mask.stride(), block_size, Sq, Sk, BM, BN, wl, wr, both)
    except RuntimeError:  # inference tensors have no version counter: no caching
        key = None
    hit = _LIST_CACHE.get(key) if key is not None else None
    if hit is not None:
        _LIST_CACHE.move_to_end(key)
        return hit[1]
    vis, partial = _tile_vis(block_mask, block_size, Sq, Sk, BM, BN, wl, wr)
    out = (_compact(vis, partial),
           _compact(vis.transpose(-1, -2), partial.transpose(-1, -2)) if both else None)
    if key is not None:
        _LIST_CACHE[key] = (block_mask, out)
        while len(_LIST_CACHE) > _LIST_CACHE_SIZE:
            _LIST_CACHE.popitem(last=False)
    return out


def _list_strides(lst, cnt):
    """(slb, slh, slt, scb, sch): zero over broadcast batch/head dims."""
    def z(t, d):
        return 0 if t.shape[d] == 1 else t.stride(d)
    return z(lst, 0), z(lst, 1), lst.stride(2), z(cnt, 0), z(cnt, 1)


def _mask_args(q, k, scale, wl, wr, alibi_slopes, block_mask, block_size, key_mask, softcap,
               rel_bias=None, dropout_p=0.0, dropout_seed=None):
    """Kernel arguments shared by every attention kernel (everything but the tensors' own)."""
    B, Hq, Sq, D = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    a = dict(Hq=Hq, G=Hq // Hkv, Sq=Sq, Sk=Sk, scale=float(scale), softcap=float(softcap),
             wl=int(wl), wr=int(wr), block_size=int(block_size), SQ_KEY=_bucket(Sq), SK_KEY=_bucket(Sk),
             HEAD_DIM=D, BLOCK_D=max(16, triton.next_power_of_2(D)),
             HAS_ALIBI=alibi_slopes is not None, HAS_SOFTCAP=softcap > 0, HAS_LEFT=wl >= 0,
             HAS_RIGHT=wr >= 0, HAS_LIST=block_mask is not None, HAS_KMASK=key_mask is not None,
             VARLEN=False, CU_Q=q, CU_K=q, TQ=0,
             PREC="tf32x3" if q.dtype == torch.float32 else "tf32",
             DOT_T=tl.float32 if q.dtype == torch.bfloat16 and triton_interpreted() else _TL[q.dtype])
    if alibi_slopes is not None:
        a.update(SLOPES=alibi_slopes, sab=alibi_slopes.stride(0), sah=alibi_slopes.stride(1))
    else:
        a.update(SLOPES=q, sab=0, sah=0)
    if block_mask is not None:
        bm = block_mask.view(torch.uint8)
        a.update(BMASK=bm, sbmb=bm.stride(0), sbmh=bm.stride(1), sbmq=bm.stride(2), sbmk=bm.stride(3))
    else:
        a.update(BMASK=q, sbmb=0, sbmh=0, sbmq=0, sbmk=0)
    if key_mask is not None:
        km = key_mask.view(torch.uint8)
        a.update(KMASK=km, skmb=km.stride(0), skms=km.stride(1))
    else:
        a.update(KMASK=q, skmb=0, skms=0)
    a.update(REL=rel_bias if rel_bias is not None else q, SEEDS=q, HAS_REL=rel_bias is not None,
             HAS_DROPOUT=dropout_p > 0, DROP4=dropout_p > 0 and Sk % 4 == 0, seed_lo=0, seed_hi=0,
             dthresh=0, dscale=1.0)
    if dropout_p > 0:  # 32-bit words passed as int32 (one specialisation), read back as uint32
        seed = int(dropout_seed)
        a.update(seed_lo=_i32(seed), seed_hi=_i32(seed >> 32), dthresh=_i32(dropout_threshold(dropout_p)),
                 dscale=1.0 / (1.0 - dropout_p))
    return a


def _i32(x: int) -> int:
    """The low 32 bits of x as a signed int32 value (the kernels cast it back to uint32)."""
    x &= 0xFFFFFFFF
    return x - (1 << 32) if x >= 1 << 31 else x


def _set_lists(a, lst, cnt):
    if lst is None:
        a.update(LIST=a["SLOPES"], CNT=a["SLOPES"], slb=0, slh=0, slt=0, scb=0, sch=0)
    else:
        slb, slh, slt, scb, sch = _list_strides(lst, cnt)
        a.update(LIST=lst, CNT=cnt, slb=slb, slh=slh, slt=slt, scb=scb, sch=sch)


def _strides(prefix, t):
    return {f"{prefix}{c}": s for c, s in zip("bhsd", t.stride())}


def _launch(tuned, raw, grid_dim0, heads, batch, a, tiles):
    """Runs the kernel: under the interpreter or when the caller fixes them (tile lists, the
    bias gradient), with the given tiles; else through the autotuner, which also picks them."""
    if triton_interpreted():
        bm, bn = tiles
        raw[(grid_dim0(bm, bn), heads, batch)](**a, BLOCK_M=bm, BLOCK_N=bn, num_warps=4, num_stages=1)
    elif tiles is not None:  # a tile list or the bias gradient's buffers: tiles fixed, warps tuned
        bm, bn = tiles
        tuned[True][(grid_dim0(bm, bn), heads, batch)](**a, BLOCK_M=bm, BLOCK_N=bn)
    else:
        tuned[False][lambda meta: (grid_dim0(meta["BLOCK_M"], meta["BLOCK_N"]), heads, batch)](**a)


def _rel_contig(rel_bias):
    return None if rel_bias is None else rel_bias.to(torch.float32).contiguous()


def attention_fwd(q, k, v, scale, window_left, window_right, alibi_slopes, block_mask, block_size,
                  key_mask, softcap, rel_bias=None, dropout_p=0.0, dropout_seed=None):
    _check(q, k)
    B, Hq, Sq, D = q.shape
    Sk = k.shape[2]
    out = torch.empty((B, Hq, Sq, D), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, Hq, Sq), dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out, lse.fill_(float("-inf"))
    a = _mask_args(q, k, scale, window_left, window_right, alibi_slopes, block_mask, block_size,
                   key_mask, softcap, _rel_contig(rel_bias), dropout_p, dropout_seed)
    tiles = _list_tiles("fwd", a["BLOCK_D"]) if (block_mask is not None or triton_interpreted()) else None
    lst = cnt = None
    if block_mask is not None:
        (lst, cnt), _ = _tile_lists(block_mask, block_size, Sq, Sk, *tiles, window_left, window_right,
                                    both=False)
    _set_lists(a, lst, cnt)
    a.update(Q=q, K=k, V=v, O=out, LSE=lse, **_strides("sq", q), **_strides("sk", k), **_strides("sv", v))
    with torch.cuda.device(q.device) if q.is_cuda else _nullctx():
        _launch(_FWD, _attn_fwd, lambda bm, bn: triton.cdiv(Sq, bm), Hq, B, a, tiles)
    return out, lse


def attention_bwd(grad_out, q, k, v, out, lse, scale, window_left, window_right, alibi_slopes,
                  block_mask, block_size, key_mask, softcap, rel_bias=None, dropout_p=0.0,
                  dropout_seed=None):
    _check(q, k)
    B, Hq, Sq, D = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    rel_bias = _rel_contig(rel_bias)
    drel = (torch.empty(0, dtype=torch.float32, device=q.device) if rel_bias is None
            else torch.zeros((Hq, max(Sq + Sk - 1, 0)), dtype=torch.float32, device=q.device))
    dq = torch.empty((B, Hq, Sq, D), dtype=q.dtype, device=q.device)
    dk = torch.empty((B, Hkv, Sk, D), dtype=k.dtype, device=k.device)
    dv = torch.empty((B, Hkv, Sk, D), dtype=v.dtype, device=v.device)
    if dq.numel() == 0 or Sk == 0:
        return dq.zero_(), dk.zero_(), dv.zero_(), drel
    out = out.contiguous()
    lse = lse.contiguous()
    a = _mask_args(q, k, scale, window_left, window_right, alibi_slopes, block_mask, block_size,
                   key_mask, softcap, rel_bias, dropout_p, dropout_seed)
    bd = a["BLOCK_D"]
    delta = torch.empty((B, Hq, Sq), dtype=torch.float32, device=q.device)
    one = _one_key_rows(B, Hq, Sq, Sk, window_left, window_right, block_mask, block_size, key_mask, q.device)
    a.update(ONE=one if one is not None else delta, HAS_ONE=one is not None)
    with torch.cuda.device(q.device) if q.is_cuda else _nullctx():
        bm_delta = 32 if triton_interpreted() else max(16, min(128, 8192 // bd))
        _attn_bwd_delta[(triton.cdiv(Sq, bm_delta), Hq, B)](
            out, grad_out, delta, *grad_out.stride(), Hq, Sq, HEAD_DIM=D, BLOCK_D=bd, BLOCK_M=bm_delta,
            num_warps=4)
        tiles = _list_tiles("bwd", bd) if (block_mask is not None or triton_interpreted()) else None
        lst_q = cnt_q = lst_k = cnt_k = None
        if block_mask is not None:  # key tiles per query tile (dQ), query tiles per key tile (dK/dV)
            (lst_k, cnt_k), (lst_q, cnt_q) = _tile_lists(block_mask, block_size, Sq, Sk, *tiles,
                                                         window_left, window_right, both=True)
        a.update(Q=q, K=k, V=v, DO=grad_out, LSE=lse, DELTA=delta, **_strides("sq", q),
                 **_strides("sk", k), **_strides("sv", v), **_strides("sd", grad_out))
        _set_lists(a, lst_q, cnt_q)
        _launch(_DKDV, _attn_bwd_dkdv, lambda bm, bn: triton.cdiv(Sk, bn), Hkv, B,
                dict(a, DK=dk, DV=dv), tiles)
        _set_lists(a, lst_k, cnt_k)
        dq_args = dict(a, DQ=dq)
        if rel_bias is not None:  # per-program rows of the bias gradient: tiles fixed to size them
            tiles = tiles or _list_tiles("bwd", bd)
            bm, bn = tiles
            nqt, nkt = triton.cdiv(Sq, bm), triton.cdiv(Sk, bn)
            w = triton.next_power_of_2(bm + bn - 1)
            row = (nkt - 1) * bn + w
            part = torch.empty((B, Hq, nqt, row), dtype=torch.float32, device=q.device)
            scratch = torch.empty((B * Hq * nqt, bm * bn), dtype=torch.float32, device=q.device)
            dq_args.update(DREL=part, DSCR=scratch, sdrel=row, REL_W=w)
        _launch(_DQ, _attn_bwd_dq, lambda bm, bn: triton.cdiv(Sq, bm), Hq, B, dq_args, tiles)
        if rel_bias is not None:
            drel = _rel_grad(part, Sq, Sk, bm)
    return dq, dk, dv, drel


def _rel_grad(part, Sq, Sk, bm):
    """The bias gradient (Hq, Sq + Sk - 1) from the dQ kernel's rows (B, Hq, nqt, row): entry d
    of query tile t's row is diagonal d + Sq - (t + 1) bm. Summed over the batch, then over the
    tiles through a skewed view (row t shifted by (nqt - 1 - t) bm): fixed order, no atomics."""
    x = part.sum(0)  # (Hq, nqt, row)
    Hq, nqt, row = x.shape
    width = (nqt - 1) * bm + row
    y = x.new_zeros(Hq, nqt, width)
    y.as_strided((Hq, nqt, row), (nqt * width, width - bm, 1), (nqt - 1) * bm).copy_(x)
    shift = nqt * bm - Sq
    return y.sum(1)[:, shift:shift + Sq + Sk - 1].contiguous()


def _one_key_rows(B, Hq, Sq, Sk, wl, wr, block_mask, block_size, key_mask, device):
    """int8 (B, Hq, Sq), contiguous: 1 where query row i sees exactly one key; None when no row
    can (no window, no masks, Sk > 1). Such a row's softmax is the constant 1, so its dS must be
    exactly 0; the kernels then take delta = dP at that key, which cancels bit for bit.
    O(B Hq Sq) work (plus O(B Hq nqb nkb) at block granularity with a block mask): rows see
    keys [lo, hi] of the window, counted through the key mask's prefix sums; with a block mask,
    whole blocks inside the window count from prefix sums over the key blocks, the two edge
    blocks from the key-mask prefix sums."""
    if wl < 0 and wr < 0 and key_mask is None and block_mask is None and Sk > 1:
        return None
    i = torch.arange(Sq, device=device) + (Sk - Sq)
    lo = (i - wl).clamp(min=0) if wl >= 0 else torch.zeros_like(i)
    hi = (i + wr).clamp(max=Sk - 1) if wr >= 0 else torch.full_like(i, Sk - 1)
    if key_mask is not None:  # kc[b, j] = visible keys before j
        kc = torch.nn.functional.pad(key_mask.to(torch.int32).cumsum(-1, dtype=torch.int32), (1, 0))
    else:
        kc = torch.arange(Sk + 1, device=device, dtype=torch.int32)[None]
    kc = kc[:, None, :]  # (B or 1, 1, Sk + 1)

    def count(a, e):  # visible keys of [a, e] (per row; 0 when empty), (B or 1, 1, Sq)
        ok = (a <= e) & (a >= 0) & (e < Sk)
        a, e = torch.where(ok, a, 0), torch.where(ok, e, 0)
        c = kc.index_select(-1, e + 1) - kc.index_select(-1, a)
        return torch.where(ok, c, 0)

    if block_mask is None:
        n = count(lo, hi)
    else:
        bs = block_size
        bm = block_mask.to(torch.int32)  # (B or 1, H or 1, nqb, nkb), maybe broadcast views
        nkb = bm.shape[-1]
        k0 = torch.arange(nkb, device=device) * bs
        blk = kc.index_select(-1, (k0 + bs).clamp(max=Sk)) - kc.index_select(-1, k0)  # keys per block
        pre = torch.nn.functional.pad((bm * blk[:, :, None, :]).cumsum(-1, dtype=torch.int32), (1, 0))
        qb = torch.arange(Sq, device=device) // bs
        kb_lo, kb_hi = lo // bs, hi // bs
        bm_rows = bm.index_select(-2, qb)      # (.., Sq, nkb)
        pre_rows = pre.index_select(-2, qb)    # (.., Sq, nkb + 1)

        def at(t, idx):  # t[..., i, idx[i]]
            return t.gather(-1, idx.clamp(0, t.shape[-1] - 1).expand(*t.shape[:-1])[..., None])[..., 0]

        same = kb_lo == kb_hi
        left = at(bm_rows, kb_lo) * count(lo, torch.where(same, hi, (kb_lo + 1) * bs - 1))
        right = torch.where(same, 0, at(bm_rows, kb_hi) * count(kb_hi * bs, hi))
        inner = torch.where(same, 0, at(pre_rows, kb_hi) - at(pre_rows, kb_lo + 1))
        n = torch.where(lo <= hi, left + right + inner, 0)
    return (n == 1).to(torch.int8).expand(B, Hq, Sq).contiguous()


class _nullctx:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
