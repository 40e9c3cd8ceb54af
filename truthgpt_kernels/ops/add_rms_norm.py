"""tk.add_rms_norm: the pre-norm residual step `h = residual + x; out = rms_norm(h)` as one op,
truthgpt::add_rms_norm (flash-attn's `rms_norm_fn(x, weight, None, residual=..., prenorm=True)`,
vLLM's fused_add_rms_norm).

h keeps residual's dtype (a float32 residual stream beside bfloat16 / float16 sublayer outputs,
as under autocast, or one dtype throughout); out has x's dtype, so under autocast the next
projection takes it without a cast. The backward returns the residual's gradient
rms_norm_backward(grad_out, h) + grad_h in h's dtype and x's in x's dtype, in one pass.
Kernels: the C++ CPU kernel and the reference; the model falls back to the separate add and
rms_norm where no kernel backend has it (see RMSNorm.add_forward).
"""
from typing import Optional, Tuple

import torch
from torch import Tensor

from .. import backends
from ..validation import check_float, check_tensor

FAMILY = "add_rms_norm"
_LOW = (torch.bfloat16, torch.float16)


@torch.library.custom_op("truthgpt::add_rms_norm", mutates_args=())
def add_rms_norm_op(x: Tensor, residual: Tensor, weight: Optional[Tensor], eps: float,
                    backend: str) -> Tuple[Tensor, Tensor, Tensor]:
    """Returns (out in x's dtype, h in residual's dtype, rstd float32 of x.shape[:-1])."""
    return backends.kernel(FAMILY, backend, "fwd")(x, residual, weight, eps)


@backends.register_fake(add_rms_norm_op, FAMILY, "fwd")
def _(x, residual, weight, eps, backend):
    return x.new_empty(x.shape), residual.new_empty(x.shape), x.new_empty(x.shape[:-1], dtype=torch.float32)


@torch.library.custom_op("truthgpt::add_rms_norm_backward", mutates_args=())
def add_rms_norm_backward_op(grad: Tensor, grad_residual: Optional[Tensor], h: Tensor,
                             weight: Optional[Tensor], rstd: Tensor, x_dtype: torch.dtype,
                             backend: str) -> Tuple[Tensor, Tensor, Tensor]:
    """(dh, dx, dweight); dx is empty when x_dtype is h's dtype (then it is dh)."""
    return backends.kernel(FAMILY, backend, "bwd")(grad, grad_residual, h, weight, rstd, x_dtype)


@backends.register_fake(add_rms_norm_backward_op, FAMILY, "bwd")
def _(grad, grad_residual, h, weight, rstd, x_dtype, backend):
    dx = h.new_empty(h.shape, dtype=x_dtype) if x_dtype != h.dtype else h.new_empty(0)
    return h.new_empty(h.shape), dx, (weight.new_empty(weight.shape) if weight is not None else h.new_empty(0))


def _setup(ctx, inputs, output):
    x, residual, weight, eps, backend = inputs
    ctx.save_for_backward(*backends.saveable(output[1], weight, output[2]))
    ctx.x_dtype, ctx.backend = x.dtype, backend
    ctx.mark_non_differentiable(output[2])


def _backward(ctx, grad, grad_h, _grad_rstd):
    h, weight, rstd = ctx.saved_tensors
    if grad is None:
        grad = torch.zeros(h.shape, dtype=ctx.x_dtype, device=h.device)
    dh, dx, dweight = backends.apply(add_rms_norm_backward_op, grad.to(ctx.x_dtype), grad_h, h, weight, rstd, ctx.x_dtype,
                                               ctx.backend)
    return (dx if ctx.x_dtype != h.dtype else dh), dh, (dweight if weight is not None else None), None, None


backends.register_autograd(add_rms_norm_op, _backward, _setup)


def add_rms_norm(x: Tensor, residual: Tensor, weight: Optional[Tensor] = None, eps: float = 1e-6, *,
                 backend: Optional[str] = None) -> Tuple[Tensor, Tensor]:
    """(rms_norm(h, weight, eps) in x's dtype, h) with h = residual + x in residual's dtype.
    x and residual have one shape; residual has x's dtype, or is float32 beside bfloat16 /
    float16 x (a float32 residual stream). weight (x.shape[-1],) has residual's dtype or is
    float32. Statistics in float32 (float64 for float64). Differentiable in x, residual and
    weight (first order)."""
    check_tensor("residual", residual, ndim=range(1, 9))
    check_tensor("x", x, device=residual.device, shape=tuple(residual.shape))
    if x.dtype != residual.dtype and not (residual.dtype == torch.float32 and x.dtype in _LOW):
        raise TypeError(f"x must have residual's dtype ({residual.dtype}), or be bfloat16 / float16 "
                        f"beside a float32 residual; got {x.dtype}")
    if weight is not None:
        check_tensor("weight", weight, ndim=1, device=x.device, shape=(x.shape[-1],),
                     dtypes=(residual.dtype, torch.float32))
    eps = check_float("eps", eps, minimum=0.0)
    name = backends.select(FAMILY, backend, residual)
    out, h, _ = backends.call(add_rms_norm_op, FAMILY, "fwd", name, x, residual, weight, eps)
    return out, h
