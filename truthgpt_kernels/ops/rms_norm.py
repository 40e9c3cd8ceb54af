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


@backends.register_fake(rms_norm_op, "rms_norm", "fwd")
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
    ctx.save_for_backward(*backends.saveable(x, weight, output[1]))
    ctx.backend = backend
    ctx.mark_non_differentiable(output[1])


def _backward(ctx, grad, _grad_rstd):
    x, weight, rstd = ctx.saved_tensors
    dx, dweight = backends.apply(rms_norm_backward_op, grad, x, weight, rstd, ctx.backend)
    return dx, (dweight if weight is not None else None), None, None


backends.register_autograd(rms_norm_op, _backward, _setup)


class _Rstd(torch.autograd.Function):
    """r = rsqrt(mean(x^2, -1) + eps)[..., None] from its saved value `rstd`, differentiable in x
    to any order: dr/dx = -r^3 x / N needs only r and x (not eps), and r is saved as an output,
    so its own derivative is this function again."""

    @staticmethod
    def forward(ctx, x, rstd):
        r = rstd.to(x.dtype).unsqueeze(-1).clone()
        ctx.save_for_backward(x, r)
        return r

    @staticmethod
    def backward(ctx, grad_r):
        x, r = ctx.saved_tensors
        return grad_r * r.pow(3) * x * (-1.0 / x.shape[-1]), None


def _setup_backward(ctx, inputs, output):
    grad, x, weight, rstd, _backend = inputs
    ctx.save_for_backward(*backends.saveable(grad, x, weight, rstd))


def _double_backward(ctx, grad_dx, grad_dweight):
    """Gradients of (dx, dweight) = rms_norm_backward(g, x, w) in (g, x, w), per row of N:
        a = g w, c = mean(a x), dx = r a - r^3 c x, dweight = sum over rows of g x r.
    With u = grad_dx, v = grad_dweight, U = sum(u x), A = sum(u a), V = sum(v g x):
        d/da = r u - r^3 (U / N) x              (grad g = w d/da + r v x, grad w = sum g d/da)
        d/dx = -r^3 (a U / N + c u) + r v g + (A - 3 r^2 c U + V) dr/dx,  dr/dx = -r^3 x / N.
    Written in differentiable torch ops with r = _Rstd(x), so higher orders are exact too."""
    grad, x, weight, rstd = ctx.saved_tensors
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    g, xf, u = grad.to(acc), x.to(acc), grad_dx.to(acc)
    n = x.shape[-1]
    r = _Rstd.apply(xf, rstd)
    r3 = r.pow(3)
    a = g * weight.to(acc) if weight is not None else g
    c = (a * xf).mean(-1, keepdim=True)
    U = (u * xf).sum(-1, keepdim=True)
    A = (u * a).sum(-1, keepdim=True)
    d_a = r * u - r3 * (U / n) * xf
    d_x = -r3 * (a * (U / n) + c * u)
    coef = A - 3 * r * r * c * U
    d_g = d_a * weight.to(acc) if weight is not None else d_a
    d_w = None
    if weight is not None:
        v = grad_dweight.to(acc)
        d_x = d_x + r * v * g
        coef = coef + (v * g * xf).sum(-1, keepdim=True)
        d_g = d_g + r * v * xf
        d_w = (d_a * g).reshape(-1, n).sum(0).to(weight.dtype)
    d_x = d_x + coef * r3 * xf * (-1.0 / n)
    return d_g.to(grad.dtype), d_x.to(x.dtype), d_w, None, None


backends.register_autograd(rms_norm_backward_op, _double_backward, _setup_backward)


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
