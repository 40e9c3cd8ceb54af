"""Rotary embeddings in Triton (kernel ops rotary_fwd / rotary_qk_fwd of csrc/registration.cpp).

x (B, H, S, D), any strides; cos/sin (P, R/2) in float32 or x's dtype, any strides;
position_ids int64 (B, S), possibly a broadcast view (stride 0). The first R dims of every head
rotate by the angle of the token's position, the rest are copied through; pairs
(x[d], x[d + R/2]) (GPT-NeoX/Llama) or, interleaved, (x[2d], x[2d + 1]) (GPT-J). fp32 math.

One program handles one token (b, s) and a block of BLOCK_H heads: it loads the token's
position and cos/sin row once and reuses them for every head. rotary_qk_fwd rotates q and k in
one launch: the second grid axis enumerates q's head blocks, then k's.
"""
import torch
import triton
import triton.language as tl

from ..backends import BackendError
from .utils import MAX_FUSED_SIZE, tile_settings


@triton.jit
def _rotate_heads(x_ptr, sxb, sxh, sxs, sxd, o_ptr, H, S, D, b, s, h0, c, sn, HALF,
                  INTERLEAVED: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr,
                  BLOCK_REST: tl.constexpr):
    heads = h0 + tl.arange(0, BLOCK_H).to(tl.int64)
    hmask = heads < H
    x_head = x_ptr + b * sxb + s * sxs + heads[:, None] * sxh   # (BLOCK_H, 1) pointers
    o_head = o_ptr + ((b * H + heads[:, None]) * S + s) * D    # output is contiguous
    j = tl.arange(0, BLOCK_HALF)
    c = c[None, :]
    sn = sn[None, :]
    if INTERLEAVED:
        # one contiguous (BLOCK_H, 2 * BLOCK_HALF) tile, split into the even/odd lanes
        d = tl.arange(0, 2 * BLOCK_HALF)
        m = hmask[:, None] & (d < 2 * HALF)[None, :]
        x = tl.load(x_head + d.to(tl.int64)[None, :] * sxd, mask=m, other=0.0).to(tl.float32)
        x1, x2 = tl.split(tl.reshape(x, (BLOCK_H, BLOCK_HALF, 2)))
        o = tl.reshape(tl.join(x1 * c - x2 * sn, x2 * c + x1 * sn), (BLOCK_H, 2 * BLOCK_HALF))
        tl.store(o_head + d[None, :], o.to(o_ptr.dtype.element_ty), mask=m)
    else:
        m = hmask[:, None] & (j < HALF)[None, :]
        j64 = j.to(tl.int64)[None, :]
        x1 = tl.load(x_head + j64 * sxd, mask=m, other=0.0).to(tl.float32)
        x2 = tl.load(x_head + (j64 + HALF) * sxd, mask=m, other=0.0).to(tl.float32)
        tl.store(o_head + j[None, :], (x1 * c - x2 * sn).to(o_ptr.dtype.element_ty), mask=m)
        tl.store(o_head + HALF + j[None, :], (x2 * c + x1 * sn).to(o_ptr.dtype.element_ty), mask=m)
    if BLOCK_REST > 0:  # partial rotary: dims R..D pass through
        r = 2 * HALF + tl.arange(0, BLOCK_REST)
        m = hmask[:, None] & (r < D)[None, :]
        v = tl.load(x_head + r.to(tl.int64)[None, :] * sxd, mask=m, other=0.0)
        tl.store(o_head + r[None, :], v, mask=m)


@triton.jit
def _rotary_kernel(q_ptr, sqb, sqh, sqs, sqd, qo_ptr, Hq, k_ptr, skb, skh, sks, skd, ko_ptr, Hk,
                   cos_ptr, sc0, sc1, sin_ptr, ss0, ss1, P, pos_ptr, spb, sps, S, D, HALF,
                   Q_BLOCKS, INTERLEAVED: tl.constexpr, BLOCK_H: tl.constexpr,
                   BLOCK_HALF: tl.constexpr, BLOCK_REST: tl.constexpr):
    tok = tl.program_id(0).to(tl.int64)
    hb = tl.program_id(1).to(tl.int64)
    b = tok // S
    s = tok - b * S
    pos = tl.load(pos_ptr + b * spb + s * sps).to(tl.int64)
    pos = tl.minimum(tl.maximum(pos, 0), P - 1)  # validated by the public op; never read out of bounds
    j = tl.arange(0, BLOCK_HALF).to(tl.int64)
    jm = j < HALF
    c = tl.load(cos_ptr + pos * sc0 + j * sc1, mask=jm, other=1.0).to(tl.float32)
    sn = tl.load(sin_ptr + pos * ss0 + j * ss1, mask=jm, other=0.0).to(tl.float32)
    if hb < Q_BLOCKS:
        _rotate_heads(q_ptr, sqb, sqh, sqs, sqd, qo_ptr, Hq, S, D, b, s, hb * BLOCK_H, c, sn, HALF,
                      INTERLEAVED, BLOCK_H, BLOCK_HALF, BLOCK_REST)
    else:
        _rotate_heads(k_ptr, skb, skh, sks, skd, ko_ptr, Hk, S, D, b, s, (hb - Q_BLOCKS) * BLOCK_H,
                      c, sn, HALF, INTERLEAVED, BLOCK_H, BLOCK_HALF, BLOCK_REST)


def _launch(q, k, cos, sin, position_ids, interleaved):
    """Rotates q and, when k is not None, k; returns the contiguous outputs."""
    B, Hq, S, D = q.shape
    Hk = 0 if k is None else k.shape[1]
    half = cos.shape[-1]
    qo = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    ko = None if k is None else torch.empty(k.shape, dtype=k.dtype, device=k.device)
    if B * S == 0 or (Hq == 0 and Hk == 0) or D == 0:
        return qo, ko
    block_half = triton.next_power_of_2(half)
    rest = D - 2 * half
    block_rest = triton.next_power_of_2(rest) if rest > 0 else 0
    if 2 * block_half + block_rest > MAX_FUSED_SIZE:
        raise BackendError(f"the triton rotary kernel holds a head in one tile, up to {MAX_FUSED_SIZE} "
                           f"elements; head dim {D} is too large: use backend 'cuda' or 'cpu'")
    heads = min(h for h in (Hq, Hk) if h > 0)
    block_h, _, warps = tile_settings(heads, 2 * block_half + block_rest, max_cols=1 << 30)
    q_blocks = triton.cdiv(Hq, block_h)
    k_blocks = triton.cdiv(Hk, block_h)
    kk, kko = (q, qo) if k is None else (k, ko)  # unused when Hk == 0
    _rotary_kernel[(B * S, q_blocks + k_blocks)](
        q, *q.stride(), qo, Hq, kk, *kk.stride(), kko, Hk,
        cos, *cos.stride(), sin, *sin.stride(), cos.shape[0], position_ids, *position_ids.stride(),
        S, D, half, q_blocks, INTERLEAVED=bool(interleaved), BLOCK_H=block_h,
        BLOCK_HALF=block_half, BLOCK_REST=block_rest, num_warps=warps)
    return qo, ko


def rotary_fwd(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, position_ids: torch.Tensor,
               interleaved: bool) -> torch.Tensor:
    return _launch(x, None, cos, sin, position_ids, interleaved)[0]


def rotary_qk_fwd(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                  position_ids: torch.Tensor, interleaved: bool):
    return _launch(q, k, cos, sin, position_ids, interleaved)
