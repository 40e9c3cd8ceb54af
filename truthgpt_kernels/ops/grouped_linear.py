"""tk.ops.grouped_linear: the GEMMs of routed MoE experts, as the autograd-aware op
truthgpt::grouped_linear.

x (N, K) holds the routed rows sorted by group (expert); group e owns rows offsets[e - 1] ..
offsets[e] (offsets: (E,) int32 / int64 cumulative ends, as torch's grouped_mm takes them) and
gets x_e weight[e]^T, weight (E, M, K): the same result as
`torch.nn.functional.grouped_mm(x, weight.transpose(-2, -1), offs=offsets)`. Rows past the last
end are zero in the output and get zero gradients (grouped_mm leaves them undefined).

Why an op: on the CPU, one GEMM per group through tk.linear's engine (oneDNN for float32 where
it beats torch's BLAS, float32 GEMMs for bfloat16 / float16 where torch has no fast kernel for
them: csrc/cpu/gemm_engine.h) writes into one output, and the backward writes dx and the
(E, M, K) weight gradient in place, all three from the C++ kernels' cached allocator, where a
linear per expert has autograd concatenate the outputs and stack the weight gradients into
fresh tensors whose first touch costs as much as the copies (csrc/cpu/linear.cpp). The CPU
kernel and the reference are the backends; validation reads offsets on the host."""
from typing import Optional, Tuple

import torch
from torch import Tensor

from .. import backends
from ..validation import autocast_dtype, check_same_dtype, check_tensor

FAMILY = "grouped_linear"


@torch.library.custom_op("truthgpt::grouped_linear", mutates_args=())
def grouped_linear_op(x: Tensor, weight: Tensor, offsets: Tensor, backend: str) -> Tensor:
    """x (N, K), weight (E, M, K), offsets (E,) -> (N, M)."""
    return backends.kernel(FAMILY, backend, "fwd")(x, weight, offsets)


@backends.register_fake(grouped_linear_op, FAMILY, "fwd")
def _(x, weight, offsets, backend):
    return x.new_empty(x.shape[0], weight.shape[1])


@torch.library.custom_op("truthgpt::grouped_linear_backward", mutates_args=())
def grouped_linear_backward_op(grad: Tensor, x: Tensor, weight: Tensor, offsets: Tensor, need_x: bool,
                               need_weight: bool, backend: str) -> Tuple[Tensor, Tensor]:
    """(dx (N, K), dweight (E, M, K)); each an empty tensor when its flag is false."""
    return backends.kernel(FAMILY, backend, "bwd")(grad, x, weight, offsets, need_x, need_weight)


@backends.register_fake(grouped_linear_backward_op, FAMILY, "bwd")
def _(grad, x, weight, offsets, need_x, need_weight, backend):
    return x.new_empty(x.shape if need_x else 0), weight.new_empty(weight.shape if need_weight else 0)


def _setup(ctx, inputs, output):
    x, weight, offsets, backend = inputs
    ctx.save_for_backward(*backends.saveable(x, weight, offsets))
    ctx.backend = backend


def _backward(ctx, grad):
    x, weight, offsets = ctx.saved_tensors
    need_x, need_weight = ctx.needs_input_grad[:2]
    dx, dweight = backends.apply(grouped_linear_backward_op, grad, x, weight, offsets, need_x, need_weight,
                                 ctx.backend)
    return dx if need_x else None, dweight if need_weight else None, None, None


backends.register_autograd(grouped_linear_op, _backward, _setup)


def _check_offsets(offsets: Tensor, rows: int) -> None:
    """Non-decreasing ends within [0, rows] (read on the host; not while compiling, where the
    values are not known: the kernel checks them again)."""
    if offsets.numel() == 0 or torch.compiler.is_compiling() or offsets.device.type == "meta":
        return  # (meta tensors, shape inference: no values)
    o = offsets.detach().to("cpu", torch.int64)
    if int(o[0]) < 0 or bool((o[1:] < o[:-1]).any()) or int(o[-1]) > rows:
        raise ValueError(f"offsets must be non-decreasing group ends in [0, {rows}] (the rows of x), "
                         f"got {o.tolist()}")


def grouped_linear(x: Tensor, weight: Tensor, offsets: Tensor, *, backend: Optional[str] = None) -> Tensor:
    """Row group e of x (rows offsets[e - 1] .. offsets[e]) times weight[e]^T: x (N, K), weight
    (E, M, K), offsets (E,) int32 / int64 -> (N, M); rows past offsets[-1] are zero. Under
    autocast x and weight are cast to the autocast dtype, as F.linear's are."""
    check_tensor("x", x, ndim=2)
    check_tensor("weight", weight, ndim=3, device=x.device, shape=(None, None, x.shape[1]))
    check_tensor("offsets", offsets, ndim=1, dtypes=(torch.int32, torch.int64), device=x.device,
                 shape=(weight.shape[0],))
    _check_offsets(offsets, x.shape[0])
    dt = autocast_dtype(x.device.type)
    if dt is not None:
        x, weight = x.to(dt), weight.to(dt)
    check_same_dtype("x", x, weight=weight)
    name = backends.select(FAMILY, backend, x)
    return backends.apply(grouped_linear_op, x, weight, offsets, name)
