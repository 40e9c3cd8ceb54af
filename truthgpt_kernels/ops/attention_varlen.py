"""tk.attention_varlen: attention over packed variable-length sequences (flash-attn's
`flash_attn_varlen_func` layout), as the autograd-aware op truthgpt::attention_varlen
(backward: truthgpt::attention_varlen_backward).

q (total_q, Hq, D), k and v (total_k, Hkv, D); sequence b owns rows cu_seqlens_q[b] ..
cu_seqlens_q[b + 1] of q and cu_seqlens_k[b] .. cu_seqlens_k[b + 1] of k and v, and gets exactly
tk.attention's semantics on them (bottom-right causal alignment per sequence, GQA, ALiBi,
window, softcap, T5 relative bias, dropout; a sequence without keys gives zero rows). No padding and no mask across
sequences exist. The relative bias reaches the kernels as one vector by distance
(Hq, max_seqlen_q + max_seqlen_k - 1) (entry (j - i') + max_seqlen_k - 1), of which sequence b
reads the columns from max_seqlen_k - len_k (reference.varlen_rel_slice). Dropout: sequence b draws tk.attention's Philox stream of its own
(1, Hq, len_q, len_k) scores with the key dropout_seed + b * 0x9E3779B97F4A7C15 (mod 2^64)
(reference.varlen_dropout_seed), so a one-sequence batch drops what tk.attention drops. The lengths are read inside the op (never traced), so torch.compile sees one
opaque op whatever the lengths."""
from typing import Optional, Tuple

import torch
from torch import Tensor

from .. import backends
from ..validation import (autocast_qkv, check_attention_options, check_dropout, check_head_dim, check_int,
                          check_rel_bias, check_same_dtype, check_tensor)
from .reference import lse_dtype, rel_bias_by_distance


def _check_lengths(name: str, cu: Tensor, total: int, max_seqlen: int, max_name: str):
    """Reads cu (a host sync on GPUs): 0 first, non-decreasing, last = total, no length above
    max_seqlen. Runs inside the op, before its kernel."""
    c = cu.tolist()
    if c[0] != 0:
        raise ValueError(f"{name} must start at 0, got {c[0]}")
    lengths = [b - a for a, b in zip(c, c[1:])]
    if any(n < 0 for n in lengths):
        i = next(i for i, n in enumerate(lengths) if n < 0)
        raise ValueError(f"{name} must be non-decreasing, got {c[i]} then {c[i + 1]} at {i}")
    if c[-1] != total:
        raise ValueError(f"{name} must end at the packed tensor's length {total}, got {c[-1]}")
    if max(lengths) > max_seqlen:
        raise ValueError(f"{max_name} ({max_seqlen}) is smaller than the longest sequence in "
                         f"{name} ({max(lengths)})")


@torch.library.custom_op("truthgpt::attention_varlen", mutates_args=())
def attention_varlen_op(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor,
                        max_seqlen_q: int, max_seqlen_k: int, scale: float, window_left: int,
                        window_right: int, alibi_slopes: Optional[Tensor], softcap: float,
                        rel_bias: Optional[Tensor], dropout_p: float, dropout_seed: Optional[Tensor],
                        backend: str) -> Tuple[Tensor, Tensor]:
    """Returns (out (Tq, Hq, D) like q, lse float32 (float64 for float64 q) (Hq, Tq)); arguments as normalised by
    `attention_varlen` below (causal folded into window_right)."""
    _check_lengths("cu_seqlens_q", cu_seqlens_q, q.shape[0], max_seqlen_q, "max_seqlen_q")
    _check_lengths("cu_seqlens_k", cu_seqlens_k, k.shape[0], max_seqlen_k, "max_seqlen_k")
    return backends.kernel("attention_varlen", backend, "fwd")(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, window_left,
        window_right, alibi_slopes, softcap, rel_bias, dropout_p, dropout_seed)


@attention_varlen_op.register_fake
def _(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, window_left,
      window_right, alibi_slopes, softcap, rel_bias, dropout_p, dropout_seed, backend):
    return q.new_empty(q.shape), q.new_empty((q.shape[1], q.shape[0]), dtype=lse_dtype(q.dtype))


@torch.library.custom_op("truthgpt::attention_varlen_backward", mutates_args=())
def attention_varlen_backward_op(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor,
                                 lse: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor,
                                 max_seqlen_q: int, max_seqlen_k: int, scale: float,
                                 window_left: int, window_right: int,
                                 alibi_slopes: Optional[Tensor], softcap: float,
                                 rel_bias: Optional[Tensor], dropout_p: float, dropout_seed: Optional[Tensor],
                                 backend: str) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dq, dk, dv, d rel_bias) (the last empty when rel_bias is None)."""
    return backends.kernel("attention_varlen", backend, "bwd")(
        grad_out, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
        scale, window_left, window_right, alibi_slopes, softcap, rel_bias, dropout_p, dropout_seed)


@attention_varlen_backward_op.register_fake
def _(grad_out, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale,
      window_left, window_right, alibi_slopes, softcap, rel_bias, *args):
    drel = rel_bias.new_empty(rel_bias.shape) if rel_bias is not None else q.new_empty(0, dtype=torch.float32)
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), drel


def _setup(ctx, inputs, output):
    q, k, v, cu_q, cu_k = inputs[:5]
    ctx.save_for_backward(*backends.saveable(q, k, v, *output, cu_q, cu_k))
    ctx.args = inputs[5:]  # max_q, max_k, scale, window_left, window_right, alibi, softcap, rel_bias,
    #                        dropout_p, dropout_seed, backend
    ctx.mark_non_differentiable(output[1])


_REL = 12  # position of rel_bias in attention_varlen_op's inputs


def _backward(ctx, grad_out, _grad_lse):
    q, k, v, out, lse, cu_q, cu_k = ctx.saved_tensors
    dq, dk, dv, drel = backends.apply(attention_varlen_backward_op, grad_out.contiguous(), q, k, v, out, lse,
                                      cu_q, cu_k, *ctx.args)
    grads = [dq, dk, dv, None, None] + [None] * len(ctx.args)
    if ctx.args[_REL - 5] is not None:
        grads[_REL] = drel
    return tuple(grads)


backends.register_autograd(attention_varlen_op, _backward, _setup)


def _unit_rows(t: Tensor) -> Tensor:
    return t if t.shape[-1] <= 1 or t.stride(-1) == 1 else t.contiguous()


def _gather_pages(k: Tensor, v: Tensor, cu_seqlens_k: Tensor, block_table: Tensor, max_seqlen_k: int):
    """Keys and values of a paged cache (num_pages, page_size, Hkv, D), sequence b's token t in
    page block_table[b, t // page_size], slot t % page_size, gathered into the packed
    (total_k, Hkv, D) layout (one copy; index_select, so gradients reach the pages). Checks
    cu_seqlens_k and the block_table entries the tokens use first (reads them: a host sync)."""
    num_pages, page_size = k.shape[0], k.shape[1]
    B = cu_seqlens_k.shape[0] - 1
    check_tensor("block_table", block_table, ndim=2, dtypes=(torch.int32,), device=k.device, shape=(B, None))
    cu = cu_seqlens_k.long()
    _check_lengths("cu_seqlens_k", cu_seqlens_k, int(cu[-1]), max_seqlen_k, "max_seqlen_k")
    capacity = block_table.shape[1] * page_size
    if max_seqlen_k > capacity:
        raise ValueError(f"max_seqlen_k ({max_seqlen_k}) exceeds what block_table can address: "
                         f"{block_table.shape[1]} pages of {page_size} tokens")
    total = int(cu[-1])
    t = torch.arange(total, device=k.device)
    b = torch.searchsorted(cu[1:], t, right=True)  # the sequence of each packed key row
    pos = t - cu[b]
    page = block_table.long()[b, pos // page_size]
    bad = (page < 0) | (page >= num_pages)
    if bool(bad.any()):
        r = int(bad.nonzero()[0, 0])
        raise ValueError(f"block_table[{int(b[r])}, {int(pos[r]) // page_size}] = {int(page[r])} is not a page "
                         f"index in [0, {num_pages})")
    flat = page * page_size + pos % page_size
    return k.flatten(0, 1).index_select(0, flat), v.flatten(0, 1).index_select(0, flat)


def attention_varlen(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor,
                     max_seqlen_q: int, max_seqlen_k: int, *, causal: bool = False,
                     scale: Optional[float] = None, window=None,
                     alibi_slopes: Optional[Tensor] = None, softcap: float = 0.0,
                     rel_bias: Optional[Tensor] = None, rel_buckets: Optional[Tuple[bool, int, int]] = None,
                     dropout_p: float = 0.0, dropout_seed: Optional[int] = None,
                     block_table: Optional[Tensor] = None,
                     return_lse: bool = False, backend: Optional[str] = None):
    """Attention over packed sequences: q (total_q, Hq, D), k and v (total_k, Hkv, D),
    cu_seqlens_q / cu_seqlens_k int32 (B + 1,) cumulative lengths (0 first, total last),
    max_seqlen_q / max_seqlen_k at least the longest length. Per sequence the semantics of
    tk.attention (options alike; alibi_slopes float32 (Hq,) or (B, Hq); rel_bias / rel_buckets a
    T5 table (Hq, num_buckets) shared by the sequences, each bucketing its own j - i';
    dropout_p / dropout_seed
    as tk.attention's, sequence b drawing with the key dropout_seed + b * 0x9E3779B97F4A7C15).
    block_table int32 (B, max_pages) (flash-attn's paged varlen): k and v are a paged cache
    (num_pages, page_size, Hkv, D) and sequence b's keys are its first
    cu_seqlens_k[b + 1] - cu_seqlens_k[b] tokens there; they are gathered into the packed layout
    first (one copy of the keys and values; gradients flow back to the pages).
    Returns out
    (total_q, Hq, D), or (out, lse) with lse float32 (float64 for float64 q) (Hq, total_q) when
    return_lse."""
    Tq, Hq, D = check_tensor("q", q, ndim=3).shape
    paged = block_table is not None  # k, v (num_pages, page_size, Hkv, D)
    check_tensor("k", k, ndim=4 if paged else 3, device=q.device)
    check_tensor("v", v, ndim=k.dim(), device=q.device, shape=tuple(k.shape))
    check_same_dtype("q", q, k=k, v=v)
    Hkv, Dk = k.shape[-2:]
    if Dk != D:
        raise ValueError(f"k and v must have the head dim of q ({D}), got {Dk}")
    if Hkv < 1 or Hq % Hkv:
        raise ValueError(f"q heads ({Hq}) must be a multiple of k/v heads ({Hkv}) (GQA/MQA)")
    check_head_dim("q", D)
    check_tensor("cu_seqlens_q", cu_seqlens_q, ndim=1, dtypes=(torch.int32,), device=q.device)
    n = cu_seqlens_q.shape[0]
    if n < 2:
        raise ValueError(f"cu_seqlens_q must hold B + 1 >= 2 offsets, got shape {tuple(cu_seqlens_q.shape)}")
    check_tensor("cu_seqlens_k", cu_seqlens_k, ndim=1, dtypes=(torch.int32,), device=q.device, shape=(n,))
    check_int("max_seqlen_q", max_seqlen_q, minimum=0)
    check_int("max_seqlen_k", max_seqlen_k, minimum=0)
    if paged:
        k, v = _gather_pages(k, v, cu_seqlens_k, block_table, max_seqlen_k)
    q, k, v = autocast_qkv(q, k, v)
    scale, softcap, (left, right), alibi_slopes = check_attention_options(
        D, n - 1, Hq, q.device, scale=scale, softcap=softcap, causal=causal, window=window,
        alibi_slopes=alibi_slopes)
    rel_vec = None
    if rel_bias is not None:
        bidirectional, nb, max_distance = check_rel_bias(rel_bias, rel_buckets, Hq, q.device, causal)
        rel_vec = rel_bias_by_distance(rel_bias, max_seqlen_q, max_seqlen_k, bidirectional, nb, max_distance).to(
            torch.float64 if q.dtype == torch.float64 else torch.float32).contiguous()
    dropout_p, seed = check_dropout(dropout_p, dropout_seed)
    name = backends.select_attention("attention_varlen", backend, q)
    out, lse = backends.apply(attention_varlen_op, _unit_rows(q), _unit_rows(k), _unit_rows(v), cu_seqlens_q,
                              cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, left, right,
                              alibi_slopes, softcap, rel_vec, dropout_p, seed, name)
    return (out, lse) if return_lse else out
