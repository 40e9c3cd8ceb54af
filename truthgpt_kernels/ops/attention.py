"""tk.attention: flash / causal / GQA / ALiBi / windowed / block-sparse attention, with T5
relative position bias and dropout, as the autograd-aware op truthgpt::attention (backward:
truthgpt::attention_backward)."""
import math
from typing import Optional, Tuple

import torch
from torch import Tensor

from .. import backends
from ..validation import (autocast_qkv, check_attention_options, check_dropout, check_head_dim, check_int,
                          check_rel_bias, check_same_dtype, check_tensor)
from .reference import alibi_slopes  # noqa: F401  (re-exported as tk.alibi_slopes)
from .reference import lse_dtype, rel_bias_by_distance


@torch.library.custom_op("truthgpt::attention", mutates_args=())
def attention_op(q: Tensor, k: Tensor, v: Tensor, scale: float, window_left: int,
                 window_right: int, alibi_slopes: Optional[Tensor], block_mask: Optional[Tensor],
                 block_size: int, key_mask: Optional[Tensor], softcap: float,
                 rel_bias: Optional[Tensor], dropout_p: float, dropout_seed: Optional[Tensor],
                 backend: str) -> Tuple[Tensor, Tensor]:
    """Returns (out (B,Hq,Sq,D) like q, lse float32 (float64 for float64 q) (B,Hq,Sq)). Arguments as normalised by
    `attention` below (causal folded into window_right; rel_bias by distance (Hq, Sq+Sk-1))."""
    return backends.kernel("attention", backend, "fwd")(
        q, k, v, scale, window_left, window_right, alibi_slopes, block_mask, block_size,
        key_mask, softcap, rel_bias, dropout_p, dropout_seed)


@backends.register_fake(attention_op, "attention", "fwd")
def _(q, k, v, scale, window_left, window_right, alibi_slopes, block_mask, block_size, key_mask,
      softcap, rel_bias, dropout_p, dropout_seed, backend):
    return backends.empty_bhsd(q, q.shape, backend), q.new_empty(q.shape[:3], dtype=lse_dtype(q.dtype))


@torch.library.custom_op("truthgpt::attention_backward", mutates_args=())
def attention_backward_op(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor,
                          lse: Tensor, scale: float, window_left: int, window_right: int,
                          alibi_slopes: Optional[Tensor], block_mask: Optional[Tensor],
                          block_size: int, key_mask: Optional[Tensor], softcap: float,
                          rel_bias: Optional[Tensor], dropout_p: float,
                          dropout_seed: Optional[Tensor],
                          backend: str) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dq, dk, dv, d rel_bias) (the last empty when rel_bias is None)."""
    return backends.kernel("attention", backend, "bwd")(
        grad_out, q, k, v, out, lse, scale, window_left, window_right, alibi_slopes, block_mask,
        block_size, key_mask, softcap, rel_bias, dropout_p, dropout_seed)


@attention_backward_op.register_fake
def _(grad_out, q, k, v, out, lse, scale, window_left, window_right, alibi_slopes, block_mask,
      block_size, key_mask, softcap, rel_bias, *args):
    drel = rel_bias.new_empty(rel_bias.shape) if rel_bias is not None else q.new_empty(0, dtype=torch.float32)
    backend = args[-1]
    return (backends.empty_bhsd(q, q.shape, backend), backends.empty_bhsd(k, k.shape, backend),
            backends.empty_bhsd(v, v.shape, backend), drel)


_REL = 11  # position of rel_bias in attention_op's inputs


def _setup(ctx, inputs, output):
    q, k, v = inputs[:3]
    ctx.save_for_backward(*backends.saveable(q, k, v, *output))
    ctx.args = inputs[3:]  # scale .. softcap, rel_bias, dropout_p, dropout_seed, backend
    ctx.mark_non_differentiable(output[1])


def _backward(ctx, grad_out, _grad_lse):
    q, k, v, out, lse = ctx.saved_tensors
    dq, dk, dv, drel = backends.apply(attention_backward_op, grad_out, q, k, v, out, lse, *ctx.args)
    grads = [dq, dk, dv] + [None] * len(ctx.args)
    if ctx.args[_REL - 3] is not None:
        grads[_REL] = drel
    return tuple(grads)


backends.register_autograd(attention_op, _backward, _setup)


def attention(q: Tensor, k: Tensor, v: Tensor, *, causal: bool = False,
              scale: Optional[float] = None, alibi_slopes: Optional[Tensor] = None,
              window=None, block_mask: Optional[Tensor] = None, block_size: int = 64,
              key_mask: Optional[Tensor] = None, softcap: float = 0.0,
              rel_bias: Optional[Tensor] = None, rel_buckets: Optional[Tuple[bool, int, int]] = None,
              dropout_p: float = 0.0, dropout_seed: Optional[int] = None,
              return_lse: bool = False, backend: Optional[str] = None):
    """Attention over q (B, Hq, Sq, D), k and v (B, Hkv, Sk, D), SDPA layout, any strides.
    Semantics: DESIGN.md (bottom-right causal alignment, masks combine with AND,
    rows with no visible key give zeros). Returns out, or (out, lse) with return_lse.

    rel_bias: T5 relative position bias, float32 (Hq, num_buckets), added to the score of
    (i, j) at bucket(j - i') with rel_buckets = (bidirectional, num_buckets, max_distance)
    (default (not causal, rel_bias.shape[1], 128), T5's decoder / encoder choice); it gets a
    gradient. dropout_p: attention dropout (applied whenever > 0, as in SDPA and flash-attn;
    modules pass 0 in eval), mask from Philox with `dropout_seed` (default: drawn from torch's
    CPU generator, so torch.manual_seed makes it reproducible); the backward regenerates it."""
    B, Hq, Sq, D = check_tensor("q", q, ndim=4).shape
    check_tensor("k", k, ndim=4, device=q.device)
    check_tensor("v", v, ndim=4, device=q.device, shape=tuple(k.shape))
    check_same_dtype("q", q, k=k, v=v)
    q, k, v = autocast_qkv(q, k, v)
    Bk, Hkv, Sk, Dk = k.shape
    if Bk != B:
        raise ValueError(f"k and v must have the batch size of q ({B}), got {Bk}")
    if Dk != D:
        raise ValueError(f"k and v must have the head dim of q ({D}), got {Dk}")
    if Hkv < 1 or Hq % Hkv:
        raise ValueError(f"q heads ({Hq}) must be a multiple of k/v heads ({Hkv}) (GQA/MQA)")
    check_head_dim("q", D)
    scale, softcap, (left, right), alibi_slopes = check_attention_options(
        D, B, Hq, q.device, scale=scale, softcap=softcap, causal=causal, window=window,
        alibi_slopes=alibi_slopes)
    check_int("block_size", block_size, minimum=1)
    if block_mask is not None:
        nq, nk = math.ceil(Sq / block_size), math.ceil(Sk / block_size)
        check_tensor("block_mask", block_mask, ndim=4, dtypes=(torch.bool,), device=q.device)
        bB, bH, bq, bk = block_mask.shape
        if bB not in (1, B) or bH not in (1, Hq) or (bq, bk) != (nq, nk):
            raise ValueError(f"block_mask must have shape ({B} or 1, {Hq} or 1, {nq}, {nk}) for "
                             f"Sq={Sq}, Sk={Sk}, block_size={block_size}; got {tuple(block_mask.shape)}")
        block_mask = block_mask.expand(B, Hq, nq, nk)
    if key_mask is not None:
        check_tensor("key_mask", key_mask, ndim=2, dtypes=(torch.bool,), device=q.device, shape=(B, Sk))
    rel_vec = None
    if rel_bias is not None:
        bidirectional, nb, max_distance = check_rel_bias(rel_bias, rel_buckets, Hq, q.device, causal)
        rel_vec = rel_bias_by_distance(rel_bias, Sq, Sk, bidirectional, nb, max_distance).to(
            torch.float64 if q.dtype == torch.float64 else torch.float32).contiguous()
    dropout_p, seed = check_dropout(dropout_p, dropout_seed)
    name = backends.select_attention("attention", backend, q)
    out, lse = backends.call(attention_op, "attention", "fwd", name, q, k, v, scale, left, right,
                             alibi_slopes, block_mask, block_size, key_mask, softcap, rel_vec,
                             dropout_p, seed)
    return (out, lse) if return_lse else out
