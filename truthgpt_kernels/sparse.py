"""Block-sparse attention layouts for `tk.attention(block_mask=..., block_size=...)`.

Each function returns a bool mask of shape (1, heads, ceil(seq_q / block_size),
ceil(seq_k / block_size)): True where a query block may attend a key block. When
seq_q != seq_k, query blocks are aligned with the last key blocks (bottom-right, in whole
blocks), matching the token-level alignment of tk.attention for block-aligned lengths.
The kernels skip the False blocks, so attention cost scales with `density(mask)`.
"""
import math
from typing import Optional, Sequence

import torch
from torch import Tensor

from .validation import check_int, check_tensor


def _grid(seq_q: int, seq_k: Optional[int], block_size: int, device=None):
    check_int("seq_q", seq_q, minimum=1)
    seq_k = seq_q if seq_k is None else check_int("seq_k", seq_k, minimum=1)
    check_int("block_size", block_size, minimum=1)
    nq, nk = math.ceil(seq_q / block_size), math.ceil(seq_k / block_size)
    qi = torch.arange(nq, device=device)[:, None] + (nk - nq)  # query block's key-block index
    kj = torch.arange(nk, device=device)[None, :]
    return qi, kj


def _finish(mask: Tensor, causal: bool, qi: Tensor, kj: Tensor) -> Tensor:
    if causal:
        mask = mask & (kj <= qi)
    return mask


def local_layout(seq_q: int, seq_k: Optional[int] = None, *, block_size: int = 64,
                 num_local_blocks: int = 4, causal: bool = False, device=None) -> Tensor:
    """Each query block sees the key blocks within num_local_blocks - 1 of its own (a banded
    sliding window at block granularity)."""
    check_int("num_local_blocks", num_local_blocks, minimum=1)
    qi, kj = _grid(seq_q, seq_k, block_size, device)
    mask = (qi - kj).abs() < num_local_blocks
    return _finish(mask, causal, qi, kj)[None, None]


def local_global_layout(seq_q: int, seq_k: Optional[int] = None, *, block_size: int = 64,
                        num_local_blocks: int = 4, global_blocks: Sequence[int] = (0,),
                        causal: bool = False, device=None) -> Tensor:
    """Longformer: local band plus global key blocks that every query sees, and whose queries
    see every key."""
    check_int("num_local_blocks", num_local_blocks, minimum=1)
    qi, kj = _grid(seq_q, seq_k, block_size, device)
    nk = kj.shape[1]
    g = torch.zeros(nk, dtype=torch.bool, device=device)
    for b in global_blocks:
        if not 0 <= b < nk:
            raise ValueError(f"global_blocks: block {b} is outside [0, {nk})")
        g[b] = True
    # a query block is global when it sits at a global key block's position (query blocks
    # before the first key block, when seq_q > seq_k, sit at none)
    global_q = (qi >= 0) & g[qi.clamp(0, nk - 1)]
    mask = ((qi - kj).abs() < num_local_blocks) | g[None, :] | global_q
    return _finish(mask, causal, qi, kj)[None, None]


def bigbird_layout(seq_q: int, seq_k: Optional[int] = None, *, block_size: int = 64,
                   num_local_blocks: int = 3, num_global_blocks: int = 1,
                   num_random_blocks: int = 2, heads: int = 1, seed: int = 0,
                   causal: bool = False, device=None) -> Tensor:
    """BigBird (Zaheer et al. 2020): local band, the first num_global_blocks blocks global,
    and num_random_blocks random key blocks per query block, drawn per head from `seed`."""
    check_int("heads", heads, minimum=1)
    check_int("num_global_blocks", num_global_blocks, minimum=0)
    check_int("num_random_blocks", num_random_blocks, minimum=0)
    check_int("seed", seed)
    qi, kj = _grid(seq_q, seq_k, block_size, device)
    nq, nk = qi.shape[0], kj.shape[1]
    base = local_global_layout(seq_q, seq_k, block_size=block_size,
                               num_local_blocks=num_local_blocks,
                               global_blocks=range(min(num_global_blocks, nk)), device=device)[0, 0]
    gen = torch.Generator().manual_seed(seed)
    rand = torch.zeros(heads, nq, nk, dtype=torch.bool)
    r = min(num_random_blocks, nk)
    if r:
        idx = torch.rand(heads, nq, nk, generator=gen).argsort(-1)[..., :r]
        rand.scatter_(-1, idx, True)
    mask = base[None] | rand.to(device)
    return _finish(mask, causal, qi, kj)[None]


def strided_layout(seq_q: int, seq_k: Optional[int] = None, *, block_size: int = 64,
                   stride: int = 4, causal: bool = True, device=None) -> Tensor:
    """Sparse Transformer, strided pattern (Child et al. 2019): each query block sees the
    previous `stride` blocks (local) and every block whose index is stride - 1 mod stride
    (the summary columns)."""
    check_int("stride", stride, minimum=1)
    qi, kj = _grid(seq_q, seq_k, block_size, device)
    mask = ((qi - kj).abs() < stride) | (kj % stride == stride - 1)
    return _finish(mask, causal, qi, kj)[None, None]


def block_mask_from_dense(mask: Tensor, block_size: int) -> Tensor:
    """A bool token mask (Sq, Sk), (H, Sq, Sk) or (B, H, Sq, Sk) to the 4-d block mask
    (B or 1, H or 1, ceil(Sq/bs), ceil(Sk/bs)) that keeps every block holding at least one
    True. Use it together with the dense mask (e.g. as key_mask, or knowing the kernel only
    sees whole blocks): blocks are all-or-nothing."""
    check_tensor("mask", mask, ndim=range(2, 5), dtypes=(torch.bool,))
    check_int("block_size", block_size, minimum=1)
    Sq, Sk = mask.shape[-2:]
    nq, nk = math.ceil(Sq / block_size), math.ceil(Sk / block_size)
    padded = torch.zeros(*mask.shape[:-2], nq * block_size, nk * block_size, dtype=torch.bool,
                         device=mask.device)
    padded[..., :Sq, :Sk] = mask
    blocks = padded.reshape(*mask.shape[:-2], nq, block_size, nk, block_size)
    out = blocks.any(-1).any(-2)
    while out.dim() < 4:
        out = out[None]
    return out


def density(block_mask: Tensor) -> float:
    """Fraction of visible blocks."""
    return block_mask.float().mean().item()
