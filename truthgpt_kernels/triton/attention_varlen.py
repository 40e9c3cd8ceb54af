"""Varlen (packed) attention in Triton: the "triton" backend of tk.attention_varlen.

The dense kernels of triton/attention.py run with VARLEN set: the grid is
(cdiv(max_seqlen, tile), heads, sequences); a program reads its sequence's first row and
length from cu_seqlens_q / cu_seqlens_k (on the device: no host synchronisation), leaves at
once when its tile starts past the sequence's end, and otherwise works exactly as the dense
kernel on that sequence (bottom-right window, ALiBi per (sequence, head), softcap, GQA, the
relative bias from the sequence's slice of the one bias by distance, dropout with the
sequence's own key).
Layouts (flash-attn's varlen ones): q, dq, out (Tq, Hq, D); k, v, dk, dv (Tk, Hkv, D), any
strides in, contiguous out; lse and the backward's row statistics (Hq, Tq) float32.
"""
import torch
import triton

from ..ops.reference import varlen_dropout_seed
from . import attention as _dense


def _sdpa_view(t):
    """(T, H, D) -> (1, H, T, D) view with batch stride 0, for the dense argument builders
    (the kernels move along the rows by the row stride from each sequence's first row)."""
    return t.transpose(0, 1).as_strided((1, t.shape[1], t.shape[0], t.shape[2]),
                                        (0, t.stride(1), t.stride(0), t.stride(2)))


def _seeds(dropout_seed, B, device):
    """(B, 2) int32: the lo/hi words of each sequence's dropout key (reference.varlen_dropout_seed)."""
    words = []
    for b in range(B):
        key = int(varlen_dropout_seed(dropout_seed, b)) % 2 ** 64
        words += [_dense._i32(key), _dense._i32(key >> 32)]
    return torch.tensor(words, dtype=torch.int32).view(B, 2).to(device)


def _args(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, window_left,
          window_right, alibi_slopes, softcap, rel_bias, dropout_p, dropout_seed):
    q4, k4, v4 = _sdpa_view(q), _sdpa_view(k), _sdpa_view(v)
    a = _dense._mask_args(q4, k4, scale, window_left, window_right, alibi_slopes, None, 0, None, softcap,
                          _dense._rel_contig(rel_bias), dropout_p, dropout_seed)
    if dropout_p > 0:  # per-sequence keys; lengths vary, so one Philox call per element
        a.update(SEEDS=_seeds(dropout_seed, cu_seqlens_q.shape[0] - 1, q.device), DROP4=False)
    _dense._set_lists(a, None, None)
    a.update(Q=q, K=k, V=v, **_dense._strides("sq", q4), **_dense._strides("sk", k4),
             **_dense._strides("sv", v4),
             VARLEN=True, CU_Q=cu_seqlens_q, CU_K=cu_seqlens_k, TQ=q.shape[0],
             Sq=int(max_seqlen_q), Sk=int(max_seqlen_k),  # per sequence in the kernels
             SQ_KEY=_dense._bucket(max_seqlen_q), SK_KEY=_dense._bucket(max_seqlen_k))
    return a


def _check(q, k, cu_seqlens_q):
    _dense._check(_sdpa_view(q), _sdpa_view(k))
    if cu_seqlens_q.shape[0] - 1 > 65535:
        raise _dense.BackendError(f"the triton attention kernels launch one grid row per sequence, "
                                  f"at most 65535; got {cu_seqlens_q.shape[0] - 1}; use "
                                  f"backend='reference'")


def _tiles(which):
    return _dense.INTERPRET_TILES[which] if _dense.triton_interpreted() else None


def _device(q):
    return torch.cuda.device(q.device) if q.is_cuda else _dense._nullctx()


def attention_varlen_fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale,
                         window_left, window_right, alibi_slopes, softcap, rel_bias=None, dropout_p=0.0,
                         dropout_seed=None):
    _check(q, k, cu_seqlens_q)
    Tq, Hq, D = q.shape
    out = torch.empty((Tq, Hq, D), dtype=q.dtype, device=q.device)
    lse = torch.empty((Hq, Tq), dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out, lse.fill_(float("-inf"))
    a = _args(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, window_left,
              window_right, alibi_slopes, softcap, rel_bias, dropout_p, dropout_seed)
    a.update(O=out, LSE=lse)
    B = cu_seqlens_q.shape[0] - 1
    with _device(q):
        _dense._launch(_dense._FWD, _dense._attn_fwd, lambda bm, bn: triton.cdiv(max(max_seqlen_q, 1), bm),
                       Hq, B, a, _tiles("fwd"))
    return out, lse


def _one_key_rows(cu_seqlens_q, cu_seqlens_k, Tq, Hq, wl, wr):
    """int8 (Hq, Tq), contiguous: 1 where packed query row r sees exactly one key of its
    sequence (see attention._one_key_rows). Always built: a sequence may have one key."""
    dev = cu_seqlens_q.device
    r = torch.arange(Tq, device=dev)
    b = torch.searchsorted(cu_seqlens_q[1:], r, right=True)
    q0 = cu_seqlens_q.long()[b]
    sq = cu_seqlens_q.long()[b + 1] - q0
    sk = cu_seqlens_k.long()[b + 1] - cu_seqlens_k.long()[b]
    i = r - q0 + (sk - sq)
    lo = (i - wl).clamp(min=0) if wl >= 0 else torch.zeros_like(i)
    hi = torch.minimum(i + wr, sk - 1) if wr >= 0 else sk - 1
    return (hi == lo).to(torch.int8).expand(Hq, Tq).contiguous()


def attention_varlen_bwd(grad_out, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                         max_seqlen_k, scale, window_left, window_right, alibi_slopes, softcap,
                         rel_bias=None, dropout_p=0.0, dropout_seed=None):
    """(dq, dk, dv, d rel_bias) (the last empty without rel_bias)."""
    _check(q, k, cu_seqlens_q)
    Tq, Hq, D = q.shape
    Tk, Hkv = k.shape[0], k.shape[1]
    dq = torch.empty((Tq, Hq, D), dtype=q.dtype, device=q.device)
    dk = torch.empty((Tk, Hkv, D), dtype=k.dtype, device=k.device)
    dv = torch.empty((Tk, Hkv, D), dtype=v.dtype, device=v.device)
    drel = (torch.empty(0, dtype=torch.float32, device=q.device) if rel_bias is None
            else torch.zeros(rel_bias.shape, dtype=torch.float32, device=q.device))
    if dq.numel() == 0 or dk.numel() == 0:
        return dq.zero_(), dk.zero_(), dv.zero_(), drel
    out = out.contiguous()
    lse = lse.contiguous()
    a = _args(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, window_left,
              window_right, alibi_slopes, softcap, rel_bias, dropout_p, dropout_seed)
    bd = a["BLOCK_D"]
    delta = torch.empty((Hq, Tq), dtype=torch.float32, device=q.device)
    B = cu_seqlens_q.shape[0] - 1
    a.update(DO=grad_out, LSE=lse, DELTA=delta, **_dense._strides("sd", _sdpa_view(grad_out)),
             ONE=_one_key_rows(cu_seqlens_q, cu_seqlens_k, Tq, Hq, window_left, window_right),
             HAS_ONE=True)
    tiles = _tiles("bwd")
    with _device(q):
        bm_delta = 32 if _dense.triton_interpreted() else max(16, min(128, 8192 // bd))
        # delta needs no sequence boundaries: all the packed rows as one sequence
        _dense._attn_bwd_delta[(triton.cdiv(Tq, bm_delta), Hq, 1)](
            out, grad_out, delta, *_sdpa_view(grad_out).stride(), Hq, Tq,
            HEAD_DIM=D, BLOCK_D=bd, BLOCK_M=bm_delta, VARLEN=True, num_warps=4)
        _dense._launch(_dense._DKDV, _dense._attn_bwd_dkdv,
                       lambda bm, bn: triton.cdiv(max(max_seqlen_k, 1), bn), Hkv, B,
                       dict(a, DK=dk, DV=dv), tiles)
        dq_args = dict(a, DQ=dq)
        if rel_bias is not None:  # per-program rows in the vector's columns (tiles fixed to size them)
            tiles = tiles or _dense._list_tiles("bwd", bd)
            bm, bn = tiles
            nqt = triton.cdiv(max(max_seqlen_q, 1), bm)
            w = triton.next_power_of_2(bm + bn - 1)
            L = drel.shape[1]
            part = torch.zeros((B, Hq, nqt, L + 2 * w), dtype=torch.float32, device=q.device)
            scratch = torch.empty((B * Hq * nqt, bm * bn), dtype=torch.float32, device=q.device)
            dq_args.update(DREL=part, DSCR=scratch, sdrel=L + 2 * w, REL_W=w)
        _dense._launch(_dense._DQ, _dense._attn_bwd_dq,
                       lambda bm, bn: triton.cdiv(max(max_seqlen_q, 1), bm), Hq, B, dq_args, tiles)
        if rel_bias is not None:  # summed over the sequences and query tiles in a fixed order
            drel = part.sum((0, 2))[:, w:w + L].contiguous()
    return dq, dk, dv, drel
