"""Attention against a KV cache in Triton (decoding and chunked prefill): the "triton" backend
of tk.attention_with_kvcache (signature as ops/reference.py's attention_with_kvcache_fwd).

The launcher appends k_new/v_new into the cache with torch indexing (in place), then one
program per (query tile, query head, sequence) walks the sequence's first L_b keys in tiles of
BLOCK_N, reading each key's page through block_table (a contiguous cache is one page of S_max
per sequence, page cache_batch_idx[b] or b), with the online softmax and score masking of the
tk.attention forward (triton/attention.py: _tile_scores, _max_nan; exp2 domain, fp32
accumulation); keys before cache_leftpad[b] are masked. Page sizes need not divide BLOCK_N:
every key's page is looked up. HAS_REL: the T5 bias by distance over the cache capacity
(Hq, Sq + S_cap - 1), read from S_cap - L_b on as the dense kernel's (Hq, Sq + L_b - 1) vector
(_rel_scores). Also writes the rows' lse (float32, natural log)."""
import torch
import triton
import triton.language as tl

from ..backends import triton_interpreted
from ..ops.reference import kvcache_append, kvcache_capacity
from .attention import _DTYPES, _TL, _max_nan, _nullctx, _q_tile, _rel_scores, _tile_scores

INTERPRET_TILES = (16, 32)


@triton.jit(do_not_specialize=["Sq", "capacity", "wl", "wr"])
def _kvcache_fwd(Q, K, V, O, LSE, LENS, BT, ROWS, LEFTPAD, SLOPES, REL,
                 sqb, sqh, sqs, sqd, skp, sks, skh, svp, svs, svh, sbt, sab, sah, srh,
                 Hq, G, Sq, page_size, capacity, scale, softcap, wl, wr,
                 HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, PAGED: tl.constexpr,
                 HAS_ALIBI: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_LEFT: tl.constexpr,
                 HAS_RIGHT: tl.constexpr, HAS_LEFTPAD: tl.constexpr, HAS_REL: tl.constexpr,
                 PREC: tl.constexpr, DOT_T: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_m = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    hk = h // G
    Sk = tl.load(LENS + b)  # keys of this sequence, after the append
    pos_off = Sk - Sq
    m0 = pid_m * BLOCK_M
    ar_n = tl.arange(0, BLOCK_N)
    q, ar_m, offs_m, mmask, offs_d, dmask = _q_tile(Q, b, h, m0, sqb, sqh, sqs, sqd, Sq, HEAD_DIM,
                                                    BLOCK_D, BLOCK_M, DOT_T)
    slope = 0.0
    if HAS_ALIBI:
        slope = tl.load(SLOPES + b * sab + h * sah)
    # the key range the tile's queries may see
    lo = Sk * 0
    hi = Sk
    if HAS_LEFT:
        lo = tl.maximum(m0.to(tl.int32) + pos_off - wl, 0)
    start = Sk * 0  # the sequence's first key (cache_leftpad)
    if HAS_LEFTPAD:
        start = tl.load(LEFTPAD + b)
        lo = tl.maximum(lo, start)
    if HAS_RIGHT:
        hi = tl.minimum(tl.minimum(m0.to(tl.int32) + BLOCK_M, Sq) - 1 + pos_off + wr + 1, Sk)
    lo = (lo // BLOCK_N) * BLOCK_N
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    i2 = offs_m[:, None]
    if HAS_REL:  # this sequence's dense vector: entry j - i + Sq - 1 at capacity - Sk + that
        rel_row = REL + h * srh + (capacity - Sk)
    for n0 in range(lo, hi, BLOCK_N):
        offs_n = n0 + ar_n
        nmask = (offs_n < Sk) & (offs_n >= start)
        if PAGED:
            page = tl.load(BT + b * sbt + offs_n // page_size, mask=nmask, other=0).to(tl.int64)
        else:
            page = tl.load(ROWS + b).to(tl.int64) + offs_n.to(tl.int64) * 0
        slot = (offs_n % page_size).to(tl.int64)
        kv_msk = nmask[:, None] & dmask[None, :]
        k = tl.load(K + (page * skp + slot * sks + hk * skh)[:, None] + offs_d[None, :],
                    mask=kv_msk, other=0.0).to(DOT_T)
        v = tl.load(V + (page * svp + slot * svs + hk * svh)[:, None] + offs_d[None, :],
                    mask=kv_msk, other=0.0).to(DOT_T)
        qk = tl.dot(q, tl.trans(k), input_precision=PREC)
        s, _ = _tile_scores(qk, i2, offs_n[None, :], m0, n0, pos_off, Sq, Sk, scale, softcap, slope,
                            wl, wr, Q, 0, Q, 0, 0, 1, False,
                            BLOCK_M, BLOCK_N, HAS_SOFTCAP, HAS_ALIBI, HAS_LEFT, HAS_RIGHT, False, False)
        if HAS_LEFTPAD:
            s = tl.where(offs_n[None, :] >= start, s, float("-inf"))
        if HAS_REL:
            s = _rel_scores(s, rel_row, i2, offs_n[None, :], Sq, Sk)
        m_new = _max_nan(m_i, tl.reduce(s, 1, _max_nan))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_use[:, None])
        alpha = tl.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        p = p.to(V.dtype.element_ty).to(DOT_T)
        acc = acc * alpha[:, None] + tl.dot(p, v, input_precision=PREC)
        m_i = m_new
    empty = l_i == 0.0
    out = tl.where(empty[:, None], 0.0, acc / tl.where(empty, 1.0, l_i)[:, None])
    row = (b * Hq + h) * Sq + offs_m
    tl.store(O + row[:, None] * HEAD_DIM + offs_d[None, :], out.to(O.dtype.element_ty),
             mask=mmask[:, None] & dmask[None, :])
    # scores are in the exp2 domain: lse = (m + log2 l) ln 2
    lse = tl.where(empty, float("-inf"), (m_i + tl.log2(tl.where(empty, 1.0, l_i))) * 0.6931471805599453)
    tl.store(LSE + row, lse, mask=mmask)


def attention_with_kvcache_fwd(q, k_cache, v_cache, cache_seqlens, block_table, k_new, v_new,
                               cache_batch_idx, cache_leftpad, scale, window_left, window_right,
                               alibi_slopes, softcap, rel_bias=None):
    if q.dtype not in _DTYPES:
        raise TypeError(f"the Triton kernels take float16, bfloat16 and float32, got {q.dtype}")
    kvcache_append(k_cache, v_cache, cache_seqlens, block_table, k_new, v_new, cache_batch_idx)
    B, Hq, Sq, D = q.shape
    paged = block_table is not None
    Hkv = k_cache.shape[2] if paged else k_cache.shape[1]
    out = torch.empty((B, Hq, Sq, D), dtype=q.dtype, device=q.device)
    lse = torch.full((B, Hq, Sq), float("-inf"), dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out, lse
    lens = (cache_seqlens + (0 if k_new is None else k_new.shape[2])).to(torch.int32)
    if paged:  # (num_pages, page_size, Hkv, D)
        page_size = k_cache.shape[1]
        kst = (k_cache.stride(0), k_cache.stride(1), k_cache.stride(2))
        vst = (v_cache.stride(0), v_cache.stride(1), v_cache.stride(2))
        bt = block_table.contiguous()  # (the kernel reads a row's entries at unit stride)
    else:  # (B, Hkv, S_max, D): page b of S_max slots
        page_size = k_cache.shape[2]
        kst = (k_cache.stride(0), k_cache.stride(2), k_cache.stride(1))
        vst = (v_cache.stride(0), v_cache.stride(2), v_cache.stride(1))
        bt = lens
    rows = (cache_batch_idx if cache_batch_idx is not None
            else torch.arange(B, dtype=torch.int32, device=q.device)).contiguous()
    leftpad = cache_leftpad.contiguous() if cache_leftpad is not None else lens
    slopes = alibi_slopes if alibi_slopes is not None else lens
    rel = rel_bias.contiguous() if rel_bias is not None else lens
    interp = triton_interpreted()
    bm, bn = INTERPRET_TILES if interp else (16 if Sq <= 16 else 64, 64)
    block_d = max(16, triton.next_power_of_2(D))
    dot_t = tl.float32 if q.dtype == torch.bfloat16 and interp else _TL[q.dtype]
    grid = (triton.cdiv(Sq, bm), Hq, B)
    with torch.cuda.device(q.device) if q.is_cuda else _nullctx():
        _kvcache_fwd[grid](
            q, k_cache, v_cache, out, lse, lens, bt, rows, leftpad, slopes, rel,
            *q.stride(), *kst, *vst, bt.stride(0) if paged else 0,
            slopes.stride(0) if alibi_slopes is not None else 0,
            slopes.stride(1) if alibi_slopes is not None else 0,
            rel.stride(0) if rel_bias is not None else 0,
            Hq, Hq // Hkv, Sq, page_size, kvcache_capacity(k_cache, block_table), scale, softcap,
            window_left, window_right,
            HEAD_DIM=D, BLOCK_D=block_d, PAGED=paged, HAS_ALIBI=alibi_slopes is not None,
            HAS_SOFTCAP=softcap > 0, HAS_LEFT=window_left >= 0, HAS_RIGHT=window_right >= 0,
            HAS_LEFTPAD=cache_leftpad is not None, HAS_REL=rel_bias is not None,
            PREC="tf32x3" if q.dtype == torch.float32 else "tf32", DOT_T=dot_t, BLOCK_M=bm, BLOCK_N=bn,
            num_warps=4, num_stages=1 if interp else 2)
    return out, lse
