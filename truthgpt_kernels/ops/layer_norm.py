"""tk.layer_norm: (x - mean) * rsqrt(var + eps) * weight + bias over the last dim, as the
autograd-aware op truthgpt::layer_norm."""
from typing import Optional, Tuple

import torch
from torch import Tensor

from .. import backends
from ..validation import check_float, check_tensor


def _stat_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


@torch.library.custom_op("truthgpt::layer_norm", mutates_args=())
def layer_norm_op(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float,
                  backend: str) -> Tuple[Tensor, Tensor, Tensor]:
    """Returns (out, mean, rstd); mean and rstd are float32 (float64 for float64 x) of
    x.shape[:-1], saved for the backward."""
    return backends.kernel("layer_norm", backend, "fwd")(x, weight, bias, eps)


@backends.register_fake(layer_norm_op, "layer_norm", "fwd")
def _(x, weight, bias, eps, backend):
    stat = x.new_empty(x.shape[:-1], dtype=_stat_dtype(x.dtype))
    return x.new_empty(x.shape), stat, stat.new_empty(stat.shape)


@torch.library.custom_op("truthgpt::layer_norm_backward", mutates_args=())
def layer_norm_backward_op(grad: Tensor, x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                           mean: Tensor, rstd: Tensor, backend: str) -> Tuple[Tensor, Tensor, Tensor]:
    """Returns (dx, dweight, dbias); dweight / dbias are empty when weight / bias is None."""
    return backends.kernel("layer_norm", backend, "bwd")(grad, x, weight, bias, mean, rstd)


@layer_norm_backward_op.register_fake
def _(grad, x, weight, bias, mean, rstd, backend):
    return (x.new_empty(x.shape), weight.new_empty(weight.shape) if weight is not None else x.new_empty(0),
            bias.new_empty(bias.shape) if bias is not None else x.new_empty(0))


def _setup(ctx, inputs, output):
    x, weight, bias, eps, backend = inputs
    ctx.save_for_backward(*backends.saveable(x, weight, bias, output[1], output[2]))
    ctx.backend, ctx.eps = backend, eps
    ctx.mark_non_differentiable(output[1], output[2])


def _backward(ctx, grad, _grad_mean, _grad_rstd):
    x, weight, bias, mean, rstd = ctx.saved_tensors
    if torch.is_grad_enabled():  # create_graph: a backward that is differentiable itself
        return _composite_backward(ctx, grad, x, weight, bias)
    dx, dweight, dbias = backends.apply(layer_norm_backward_op, grad, x, weight, bias, mean, rstd, ctx.backend)
    return dx, (dweight if weight is not None else None), (dbias if bias is not None else None), None, None


def _composite_backward(ctx, grad, x, weight, bias):
    """The gradients as autograd computes them through the reference's layer norm (plain torch
    ops, statistics in float32 / float64): with create_graph they carry their own graph, so
    double backward (gradient penalties, gradgradcheck) works as with torch's layer_norm."""
    from .reference import layer_norm as composite
    inputs = (x, weight, bias)
    wanted = [i for i, t in enumerate(inputs) if t is not None and ctx.needs_input_grad[i]]
    out = composite(x, weight, bias, ctx.eps)
    grads = torch.autograd.grad(out, [inputs[i] for i in wanted], grad, create_graph=True, allow_unused=True)
    result = [None] * 5
    for i, g in zip(wanted, grads):
        result[i] = g if g is not None else torch.zeros_like(inputs[i])
    return tuple(result)


backends.register_autograd(layer_norm_op, _backward, _setup)


def layer_norm(x: Tensor, weight: Optional[Tensor] = None, bias: Optional[Tensor] = None,
               eps: float = 1e-5, *, backend: Optional[str] = None) -> Tensor:
    """(x - mean) * rsqrt(var + eps) * weight + bias over the last dim (biased variance, as
    F.layer_norm), statistics in float32, output in x's dtype. weight and bias have x's
    dtype or float32."""
    check_tensor("x", x, ndim=range(1, 9))
    for name, p in (("weight", weight), ("bias", bias)):
        if p is not None:
            check_tensor(name, p, ndim=1, device=x.device, shape=(x.shape[-1],),
                         dtypes=(x.dtype, torch.float32))
    eps = check_float("eps", eps, minimum=0.0)
    name = backends.select("layer_norm", backend, x)
    return backends.call(layer_norm_op, "layer_norm", "fwd", name, x, weight, bias, eps)[0]
