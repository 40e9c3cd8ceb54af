"""tk.attention_with_kvcache: decoding / chunked-prefill attention against a KV cache, contiguous
or paged, appending the new keys and values in place first (flash-attn's flash_attn_with_kvcache
semantics). Forward only: the op has no autograd formula (a backward through it raises)."""
from typing import Optional

import torch
from torch import Tensor

from .. import backends
from ..validation import (check_attention_options, check_head_dim, check_kvcache_lengths,
                          check_same_dtype, check_tensor)

FAMILY = "attention_with_kvcache"


def _check_values(q, k_cache, cache_seqlens, block_table, k_new, in_graph=False):
    """The value checks (they read cache_seqlens and block_table), before anything is written;
    in_graph: as asserts in a compiled graph (see check_kvcache_lengths)."""
    s_new = 0 if k_new is None else k_new.shape[2]
    if block_table is None:
        capacity, page_size, num_pages = k_cache.shape[2], k_cache.shape[2], k_cache.shape[0]
    else:
        page_size, num_pages = k_cache.shape[1], k_cache.shape[0]
        capacity = block_table.shape[1] * page_size
    check_kvcache_lengths(cache_seqlens, block_table, s_new, capacity, page_size, num_pages, in_graph=in_graph)


@torch.library.custom_op("truthgpt::attention_with_kvcache", mutates_args=("k_cache", "v_cache"))
def attention_with_kvcache_op(q: Tensor, k_cache: Tensor, v_cache: Tensor, cache_seqlens: Tensor,
                              block_table: Optional[Tensor], k_new: Optional[Tensor],
                              v_new: Optional[Tensor], scale: float, window_left: int,
                              window_right: int, alibi_slopes: Optional[Tensor], softcap: float,
                              backend: str) -> Tensor:
    """Returns out (B, Hq, Sq, D), contiguous, dtype of q. MUTATES k_cache and v_cache: k_new and
    v_new (when given) are written at positions cache_seqlens[b] .. + S_new of sequence b before
    attending. cache_seqlens itself is not changed. Arguments as normalised by
    `attention_with_kvcache` below (causal folded into window_right)."""
    _check_values(q, k_cache, cache_seqlens, block_table, k_new)
    return backends.kernel(FAMILY, backend, "fwd")(
        q, k_cache, v_cache, cache_seqlens, block_table, k_new, v_new, scale, window_left,
        window_right, alibi_slopes, softcap)


@backends.register_fake(attention_with_kvcache_op, FAMILY, "fwd")
def _(q, k_cache, v_cache, cache_seqlens, block_table, k_new, v_new, scale, window_left,
      window_right, alibi_slopes, softcap, backend):
    return q.new_empty(q.shape)


def _check_inputs(q, k_cache, v_cache, cache_seqlens, block_table, k_new, v_new):
    """Ranks, dtypes, devices and shapes; returns (B, Hq, Hkv, D)."""
    B, Hq, Sq, D = check_tensor("q", q, ndim=4).shape
    dev = q.device
    check_tensor("k_cache", k_cache, ndim=4, device=dev)
    check_tensor("v_cache", v_cache, ndim=4, device=dev, shape=tuple(k_cache.shape))
    check_tensor("cache_seqlens", cache_seqlens, ndim=1, dtypes=(torch.int32,), device=dev, shape=(B,))
    if block_table is None:  # (B, Hkv, S_max, D)
        Bc, Hkv, _, Dc = k_cache.shape
        if Bc != B:
            raise ValueError(f"k_cache and v_cache (B, Hkv, S_max, D) must have the batch size of q "
                             f"({B}), got {Bc}")
    else:  # (num_pages, page_size, Hkv, D)
        check_tensor("block_table", block_table, ndim=2, dtypes=(torch.int32,), device=dev,
                     shape=(B, None))
        _, _, Hkv, Dc = k_cache.shape
    if Dc != D:
        raise ValueError(f"k_cache and v_cache must have the head dim of q ({D}), got {Dc}")
    if Hkv < 1 or Hq % Hkv:
        raise ValueError(f"q heads ({Hq}) must be a multiple of k_cache/v_cache heads ({Hkv}) (GQA/MQA)")
    check_head_dim("q", D)
    for name, c in (("k_cache", k_cache), ("v_cache", v_cache)):
        if c.stride(-1) != 1 and D > 1:
            raise ValueError(f"{name} must have a unit stride in its last (head) dim, got strides "
                             f"{tuple(c.stride())} (it is written in place, so it is never copied)")
    if (k_new is None) != (v_new is None):
        raise ValueError("k_new and v_new must be given together (or neither)")
    if k_new is not None:
        check_tensor("k_new", k_new, ndim=4, device=dev, shape=(B, Hkv, None, D))
        check_tensor("v_new", v_new, ndim=4, device=dev, shape=tuple(k_new.shape))
    check_same_dtype("q", q, k_cache=k_cache, v_cache=v_cache, k_new=k_new, v_new=v_new)
    return B, Hq, Hkv, D


def attention_with_kvcache(q: Tensor, k_cache: Tensor, v_cache: Tensor, *, cache_seqlens: Tensor,
                           block_table: Optional[Tensor] = None, k_new: Optional[Tensor] = None,
                           v_new: Optional[Tensor] = None, causal: bool = True,
                           scale: Optional[float] = None, window=None,
                           alibi_slopes: Optional[Tensor] = None, softcap: float = 0.0,
                           backend: Optional[str] = None) -> Tensor:
    """Attention of q (B, Hq, Sq, D) (SDPA layout, any strides) over a KV cache.

    Cache: contiguous k_cache/v_cache (B, Hkv, S_max, D), or paged (num_pages, page_size, Hkv, D)
    with block_table (B, max_pages) int32: token t of sequence b sits in page
    block_table[b, t // page_size], slot t % page_size. Both need a unit stride in the last dim.
    cache_seqlens int32 (B,): tokens already cached per sequence. k_new/v_new (B, Hkv, S_new, D)
    (both or neither) are written IN PLACE into the cache at positions cache_seqlens[b] ..
    cache_seqlens[b] + S_new - 1, then q attends to the first L_b = cache_seqlens[b] + S_new keys
    of sequence b; cache_seqlens is not updated (the caller advances it). Causal is bottom-right
    aligned: query i sits at position L_b - Sq + i. window, alibi_slopes ((Hq,) or (B, Hq)
    float32), softcap and GQA as tk.attention; rows with no visible key give zeros.
    Forward only (no autograd formula). Returns out (B, Hq, Sq, D) in q's dtype."""
    B, Hq, Hkv, D = _check_inputs(q, k_cache, v_cache, cache_seqlens, block_table, k_new, v_new)
    scale, softcap, (left, right), alibi_slopes = check_attention_options(
        D, B, Hq, q.device, scale=scale, softcap=softcap, causal=causal, window=window,
        alibi_slopes=alibi_slopes)
    name = backends.select(FAMILY, backend, q)
    # under torch.compile the values are checked by asserts in the graph (the C++ kernels go into
    # the graph themselves, see backends.call; the op's own body checks them too)
    _check_values(q, k_cache, cache_seqlens, block_table, k_new, in_graph=torch.compiler.is_compiling())
    return backends.call(attention_with_kvcache_op, FAMILY, "fwd", name, q, k_cache, v_cache,
                         cache_seqlens, block_table, k_new, v_new, scale, left, right,
                         alibi_slopes, softcap)
