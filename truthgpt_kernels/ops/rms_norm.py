"""tk.rms_norm: x * rsqrt(mean(x^2) + eps) * weight, as the autograd-aware op truthgpt::rms_norm."""
from typing import Optional, Tuple

import torch
from torch import Tensor

from .. import backends
from ..validation import check_float, check_tensor


@torch.library.custom_op("truthgpt::rms_norm", mutates_args=())
def rms_norm_op(x: Tensor, weight: Optional[Tensor], eps: float, backend: str) -> Tuple[Tensor, Tensor]:
    """Returns (out, rstd); rstd is float32 of x.shape[:-1], saved for the backward."""
    return backends.kernel("rms_norm", backend, "fwd")(x, weight, eps)


@rms_norm_op.register_fake
def _(x, weight, eps, backend):
    return x.new_empty(x.shape), x.new_empty(x.shape[:-1], dtype=torch.float32)


@torch.library.custom_op("truthgpt::rms_norm_backward", mutates_args=())
def rms_norm_backward_op(grad: Tensor, x: Tensor, weight: Optional[Tensor], rstd: Tensor,
                         backend: str) -> Tuple[Tensor, Tensor]:
    """Returns (dx, dweight); dweight is empty when weight is None."""
    return backends.kernel("rms_norm", backend, "bwd")(grad, x, weight, rstd)


@rms_norm_backward_op.register_fake
def _(grad, x, weight, rstd, backend):
    return x.new_empty(x.shape), (weight.new_empty(weight.shape) if weight is not None else x.new_empty(0))


def _setup(ctx, inputs, output):
    x, weight, eps, backend = inputs
    ctx.save_for_backward(x, weight, output[1])
    ctx.backend = backend
    ctx.mark_non_differentiable(output[1])


def _backward(ctx, grad, _grad_rstd):
    x, weight, rstd = ctx.saved_tensors
    dx, dweight = rms_norm_backward_op(grad, x, weight, rstd, ctx.backend)
    return dx, (dweight if weight is not None else None), None, None


rms_norm_op.register_autograd(_backward, setup_context=_setup)


def rms_norm(x: Tensor, weight: Optional[Tensor] = None, eps: float = 1e-6, *,
             backend: Optional[str] = None) -> Tensor:
    """x * rsqrt(mean(x^2, -1) + eps) * weight, statistics in float32, output in x's dtype.
    weight has x's dtype or float32."""
    check_tensor("x", x, ndim=range(1, 9))
    if weight is not None:
        check_tensor("weight", weight, ndim=1, device=x.device, shape=(x.shape[-1],),
                     dtypes=(x.dtype, torch.float32))
    eps = check_float("eps", eps, minimum=0.0)
    return backends.call(rms_norm_op, "rms_norm", "fwd", backends.select("rms_norm", backend, x), x, weight, eps)[0]
