"""tk.attention_with_kvcache: decoding / chunked-prefill attention against a KV cache, contiguous
or paged, appending the new keys and values in place first (flash-attn's flash_attn_with_kvcache
semantics, with its rotary, cache_batch_idx, cache_leftpad and softmax-lse options). Forward only:
the op has no autograd formula (a backward through it raises). T5 relative position bias
(rel_bias) as tk.attention."""
from typing import Optional, Tuple, Union

import torch
from torch import Tensor

from .. import backends
from ..validation import (check_attention_options, check_head_dim, check_int, check_kvcache_lengths,
                          check_kvcache_rows, check_rel_bias, check_same_dtype, check_tensor)
from .reference import kvcache_capacity, lse_dtype, rel_bias_by_distance
from .rotary import apply_rotary

FAMILY = "attention_with_kvcache"


def _check_values(q, k_cache, cache_seqlens, block_table, k_new, cache_batch_idx, cache_leftpad,
                  in_graph=False):
    """The value checks (they read cache_seqlens, block_table, cache_batch_idx, cache_leftpad),
    before anything is written; in_graph: as asserts in a compiled graph (see check_kvcache_lengths)."""
    s_new = 0 if k_new is None else k_new.shape[2]
    capacity, num_pages = kvcache_capacity(k_cache, block_table), k_cache.shape[0]
    page_size = k_cache.shape[2] if block_table is None else k_cache.shape[1]
    check_kvcache_lengths(cache_seqlens, block_table, s_new, capacity, page_size, num_pages, in_graph=in_graph)
    check_kvcache_rows(cache_seqlens, cache_batch_idx, cache_leftpad, k_cache.shape[0], s_new, in_graph=in_graph)


@torch.library.custom_op("truthgpt::attention_with_kvcache", mutates_args=("k_cache", "v_cache"))
def attention_with_kvcache_op(q: Tensor, k_cache: Tensor, v_cache: Tensor, cache_seqlens: Tensor,
                              block_table: Optional[Tensor], k_new: Optional[Tensor],
                              v_new: Optional[Tensor], cache_batch_idx: Optional[Tensor],
                              cache_leftpad: Optional[Tensor], scale: float, window_left: int,
                              window_right: int, alibi_slopes: Optional[Tensor], softcap: float,
                              rel_bias: Optional[Tensor], backend: str) -> tuple[Tensor, Tensor]:
    """Returns (out (B, Hq, Sq, D), contiguous, dtype of q; lse (B, Hq, Sq), float32 (float64 for
    float64 q)). MUTATES k_cache and v_cache: k_new and v_new (when given) are written at
    positions cache_seqlens[b] .. + S_new of sequence b (cache row cache_batch_idx[b] of a
    contiguous cache) before attending. cache_seqlens itself is not changed. Arguments as
    normalised by `attention_with_kvcache` below (causal folded into window_right; rel_bias by
    distance over the cache capacity S_cap, (Hq, Sq + S_cap - 1): the score of query i
    (position i' = i + L_b - Sq) and key j gets rel_bias[h, (j - i') + S_cap - 1])."""
    _check_values(q, k_cache, cache_seqlens, block_table, k_new, cache_batch_idx, cache_leftpad)
    return backends.kernel(FAMILY, backend, "fwd")(
        q, k_cache, v_cache, cache_seqlens, block_table, k_new, v_new, cache_batch_idx, cache_leftpad,
        scale, window_left, window_right, alibi_slopes, softcap, rel_bias)


@backends.register_fake(attention_with_kvcache_op, FAMILY, "fwd")
def _(q, k_cache, v_cache, cache_seqlens, block_table, k_new, v_new, cache_batch_idx, cache_leftpad,
      scale, window_left, window_right, alibi_slopes, softcap, rel_bias, backend):
    return q.new_empty(q.shape), q.new_empty(q.shape[:3], dtype=lse_dtype(q.dtype))


def _check_inputs(q, k_cache, v_cache, cache_seqlens, block_table, k_new, v_new, cache_batch_idx,
                  cache_leftpad):
    """Ranks, dtypes, devices and shapes; returns (B, Hq, Hkv, D)."""
    B, Hq, Sq, D = check_tensor("q", q, ndim=4).shape
    dev = q.device
    check_tensor("k_cache", k_cache, ndim=4, device=dev)
    check_tensor("v_cache", v_cache, ndim=4, device=dev, shape=tuple(k_cache.shape))
    check_tensor("cache_seqlens", cache_seqlens, ndim=1, dtypes=(torch.int32,), device=dev, shape=(B,))
    for name, t in (("cache_batch_idx", cache_batch_idx), ("cache_leftpad", cache_leftpad)):
        if t is not None:
            check_tensor(name, t, ndim=1, dtypes=(torch.int32,), device=dev, shape=(B,))
    if block_table is not None and cache_batch_idx is not None:
        raise ValueError("cache_batch_idx selects rows of a contiguous cache; with a paged cache "
                         "(block_table) give each sequence its pages in block_table instead")
    if block_table is None:  # (B, Hkv, S_max, D), or (B_cache, ...) rows picked by cache_batch_idx
        Bc, Hkv, _, Dc = k_cache.shape
        if Bc != B and cache_batch_idx is None:
            raise ValueError(f"k_cache and v_cache (B, Hkv, S_max, D) must have the batch size of q "
                             f"({B}), got {Bc} (or pass cache_batch_idx to pick their rows)")
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


def _rotate(x: Tensor, cos: Tensor, sin: Tensor, interleaved: bool, start: Tensor, steps: bool,
            backend: Optional[str]) -> Tensor:
    """x (B, H, S, D) rotated at positions start[b] + i (steps) or start[b] (every row)."""
    B, _, S, _ = x.shape
    pos = start.long()[:, None] + (torch.arange(S, device=x.device) if steps else torch.zeros(S, dtype=torch.long,
                                                                                               device=x.device))
    return apply_rotary(x, cos, sin, interleaved=interleaved, position_ids=pos, backend=backend)


def _check_rotary(q, cache_seqlens, k_new, rotary_cos, rotary_sin, steps):
    """rotary_cos/rotary_sin (P, R/2) given together, with k_new, covering every position used."""
    if (rotary_cos is None) != (rotary_sin is None):
        raise ValueError("rotary_cos and rotary_sin must be given together (or neither)")
    if rotary_cos is None:
        return
    if k_new is None:
        raise ValueError("rotary_cos/rotary_sin rotate the new keys and the queries: they need k_new/v_new "
                         "(keys already in the cache were rotated when they were written)")
    check_tensor("rotary_cos", rotary_cos, ndim=2, device=q.device)
    check_tensor("rotary_sin", rotary_sin, ndim=2, device=q.device, shape=tuple(rotary_cos.shape))
    n = max(k_new.shape[2], q.shape[2] if steps else 1)
    if not torch.compiler.is_compiling() and cache_seqlens.numel():
        need = int(cache_seqlens.max()) + n
        if need > rotary_cos.shape[0]:
            raise ValueError(f"rotary_cos/rotary_sin cover {rotary_cos.shape[0]} positions, but cache_seqlens "
                             f"(max {int(cache_seqlens.max())}) + {n} new positions need {need}")


def attention_with_kvcache(q: Tensor, k_cache: Tensor, v_cache: Tensor, *,
                           cache_seqlens: Union[Tensor, int, None] = None,
                           block_table: Optional[Tensor] = None, k_new: Optional[Tensor] = None,
                           v_new: Optional[Tensor] = None, causal: bool = True,
                           scale: Optional[float] = None, window=None,
                           alibi_slopes: Optional[Tensor] = None, softcap: float = 0.0,
                           rotary_cos: Optional[Tensor] = None, rotary_sin: Optional[Tensor] = None,
                           rotary_interleaved: bool = False, cache_batch_idx: Optional[Tensor] = None,
                           cache_leftpad: Optional[Tensor] = None,
                           rel_bias: Optional[Tensor] = None,
                           rel_buckets: Optional[Tuple[bool, int, int]] = None, return_lse: bool = False,
                           backend: Optional[str] = None):
    """Attention of q (B, Hq, Sq, D) (SDPA layout, any strides) over a KV cache.

    Cache: contiguous k_cache/v_cache (B, Hkv, S_max, D), or paged (num_pages, page_size, Hkv, D)
    with block_table (B, max_pages) int32: token t of sequence b sits in page
    block_table[b, t // page_size], slot t % page_size. Both need a unit stride in the last dim.
    cache_seqlens int32 (B,) (or an int for every sequence; None: the cache is full, as
    flash-attn's default): tokens already cached per sequence.
    k_new/v_new (B, Hkv, S_new, D) (both or neither) are written IN PLACE into the cache at
    positions cache_seqlens[b] .. cache_seqlens[b] + S_new - 1, then q attends to the first
    L_b = cache_seqlens[b] + S_new keys of sequence b; cache_seqlens is not updated (the caller
    advances it). Causal is bottom-right aligned: query i sits at position L_b - Sq + i. window,
    alibi_slopes ((Hq,) or (B, Hq) float32), softcap and GQA as tk.attention; rows with no
    visible key give zeros.
    flash-attn's options: rotary_cos/rotary_sin (P, R/2) (with k_new) rotate k_new at positions
    cache_seqlens[b] + i and q at cache_seqlens[b] + i when causal or windowed, else every query
    at cache_seqlens[b] (tk.apply_rotary's pairs; rotary_interleaved: GPT-J pairs) before the
    append. cache_batch_idx int32 (B,) (contiguous cache only): sequence b uses cache row
    cache_batch_idx[b] (distinct rows when k_new is written), so k_cache may hold more rows
    than B. cache_leftpad int32 (B,): sequence b's keys start at cache_leftpad[b] <=
    cache_seqlens[b] (left-padded caches); positions still count from the cache's start, so the
    causal alignment and ALiBi distances are unchanged, as in flash-attn.
    rel_bias: T5 relative position bias as tk.attention, float32 (Hq, num_buckets), rel_buckets =
    (bidirectional, num_buckets, max_distance) (default (not causal, rel_bias.shape[1], 128)):
    the score of query i and key j of sequence b gets rel_bias[h, bucket(j - i')], i' =
    L_b - Sq + i (cache positions, so cache_leftpad shifts nothing); no gradient.
    Forward only (no autograd formula). Returns out (B, Hq, Sq, D) in q's dtype, or (out, lse)
    with return_lse: lse (B, Hq, Sq) float32 (float64 for float64), -inf for rows that see nothing."""
    if cache_seqlens is None:  # the whole cache: its capacity (contiguous S_max, paged pages x size)
        check_tensor("k_cache", k_cache, ndim=4)
        cache_seqlens = k_cache.shape[2] if block_table is None else (
            check_tensor("block_table", block_table, ndim=2, dtypes=(torch.int32,)).shape[1] * k_cache.shape[1])
    if isinstance(cache_seqlens, int) and not isinstance(cache_seqlens, bool):
        check_int("cache_seqlens", cache_seqlens, minimum=0)
        cache_seqlens = torch.full((q.shape[0] if q.dim() else 0,), cache_seqlens, dtype=torch.int32,
                                   device=q.device)
    B, Hq, Hkv, D = _check_inputs(q, k_cache, v_cache, cache_seqlens, block_table, k_new, v_new,
                                  cache_batch_idx, cache_leftpad)
    scale, softcap, (left, right), alibi_slopes = check_attention_options(
        D, B, Hq, q.device, scale=scale, softcap=softcap, causal=causal, window=window,
        alibi_slopes=alibi_slopes)
    rel_vec = None
    if rel_bias is not None:  # one vector by distance over the cache capacity serves every sequence
        bidirectional, nb, max_distance = check_rel_bias(rel_bias, rel_buckets, Hq, q.device, causal)
        rel_vec = rel_bias_by_distance(rel_bias, q.shape[2], kvcache_capacity(k_cache, block_table),
                                       bidirectional, nb, max_distance).to(lse_dtype(q.dtype)).contiguous()
    steps = left >= 0 or right >= 0  # causal or windowed: every query at its own position
    _check_rotary(q, cache_seqlens, k_new, rotary_cos, rotary_sin, steps)
    name = backends.select_attention(FAMILY, backend, q)
    # under torch.compile the values are checked by asserts in the graph (the C++ kernels go into
    # the graph themselves, see backends.call; the op's own body checks them too)
    _check_values(q, k_cache, cache_seqlens, block_table, k_new, cache_batch_idx, cache_leftpad,
                  in_graph=torch.compiler.is_compiling())
    if rotary_cos is not None:
        q = _rotate(q, rotary_cos, rotary_sin, rotary_interleaved, cache_seqlens, steps, name)
        k_new = _rotate(k_new, rotary_cos, rotary_sin, rotary_interleaved, cache_seqlens, True, name)
    out, lse = backends.call(attention_with_kvcache_op, FAMILY, "fwd", name, q, k_cache, v_cache,
                             cache_seqlens, block_table, k_new, v_new, cache_batch_idx, cache_leftpad,
                             scale, left, right, alibi_slopes, softcap, rel_vec)
    return (out, lse) if return_lse else out
