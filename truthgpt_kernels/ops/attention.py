"""tk.attention: flash / causal / GQA / ALiBi / windowed / block-sparse attention, as the
autograd-aware op truthgpt::attention (backward: truthgpt::attention_backward)."""
import math
from typing import Optional, Tuple

import torch
from torch import Tensor

from .. import backends
from ..validation import check_attention_options, check_head_dim, check_int, check_same_dtype, check_tensor
from .reference import alibi_slopes  # noqa: F401  (re-exported as tk.alibi_slopes)


@torch.library.custom_op("truthgpt::attention", mutates_args=())
def attention_op(q: Tensor, k: Tensor, v: Tensor, scale: float, window_left: int,
                 window_right: int, alibi_slopes: Optional[Tensor], block_mask: Optional[Tensor],
                 block_size: int, key_mask: Optional[Tensor], softcap: float,
                 backend: str) -> Tuple[Tensor, Tensor]:
    """Returns (out (B,Hq,Sq,D) like q, lse float32 (B,Hq,Sq)). Arguments as normalised by
    `attention` below (causal folded into window_right)."""
    return backends.kernel("attention", backend, "fwd")(
        q, k, v, scale, window_left, window_right, alibi_slopes, block_mask, block_size,
        key_mask, softcap)


@attention_op.register_fake
def _(q, k, v, scale, window_left, window_right, alibi_slopes, block_mask, block_size, key_mask,
      softcap, backend):
    return q.new_empty(q.shape), q.new_empty(q.shape[:3], dtype=torch.float32)


@torch.library.custom_op("truthgpt::attention_backward", mutates_args=())
def attention_backward_op(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor,
                          lse: Tensor, scale: float, window_left: int, window_right: int,
                          alibi_slopes: Optional[Tensor], block_mask: Optional[Tensor],
                          block_size: int, key_mask: Optional[Tensor], softcap: float,
                          backend: str) -> Tuple[Tensor, Tensor, Tensor]:
    return backends.kernel("attention", backend, "bwd")(
        grad_out, q, k, v, out, lse, scale, window_left, window_right, alibi_slopes, block_mask,
        block_size, key_mask, softcap)


@attention_backward_op.register_fake
def _(grad_out, q, k, v, out, lse, *args):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup(ctx, inputs, output):
    q, k, v = inputs[:3]
    ctx.save_for_backward(q, k, v, *output)
    ctx.args = inputs[3:]  # scale, window_left, window_right, alibi, block_mask, block_size, key_mask, softcap, backend
    ctx.mark_non_differentiable(output[1])


def _backward(ctx, grad_out, _grad_lse):
    q, k, v, out, lse = ctx.saved_tensors
    dq, dk, dv = attention_backward_op(grad_out, q, k, v, out, lse, *ctx.args)
    return (dq, dk, dv) + (None,) * len(ctx.args)


attention_op.register_autograd(_backward, setup_context=_setup)


def attention(q: Tensor, k: Tensor, v: Tensor, *, causal: bool = False,
              scale: Optional[float] = None, alibi_slopes: Optional[Tensor] = None,
              window=None, block_mask: Optional[Tensor] = None, block_size: int = 64,
              key_mask: Optional[Tensor] = None, softcap: float = 0.0,
              return_lse: bool = False, backend: Optional[str] = None):
    """Attention over q (B, Hq, Sq, D), k and v (B, Hkv, Sk, D), SDPA layout, any strides.
    Semantics: ../shared/DESIGN.md (bottom-right causal alignment, masks combine with AND,
    rows with no visible key give zeros). Returns out, or (out, lse) with return_lse."""
    B, Hq, Sq, D = check_tensor("q", q, ndim=4).shape
    check_tensor("k", k, ndim=4, device=q.device)
    check_tensor("v", v, ndim=4, device=q.device, shape=tuple(k.shape))
    check_same_dtype("q", q, k=k, v=v)
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
    name = backends.select("attention", backend, q)
    out, lse = backends.call(attention_op, "attention", "fwd", name, q, k, v, scale, left, right,
                             alibi_slopes, block_mask, block_size, key_mask, softcap)
    return (out, lse) if return_lse else out
