"""tk.swiglu: silu(gate) * up, as the autograd-aware op truthgpt::swiglu."""
from typing import Optional, Tuple

import torch
from torch import Tensor

from .. import backends
from ..validation import check_same_dtype, check_tensor


@torch.library.custom_op("truthgpt::swiglu", mutates_args=())
def swiglu_op(gate: Tensor, up: Tensor, backend: str) -> Tensor:
    return backends.kernel("swiglu", backend, "fwd")(gate, up)


@backends.register_fake(swiglu_op, "swiglu", "fwd")
def _(gate, up, backend):
    return gate.new_empty(gate.shape)


@torch.library.custom_op("truthgpt::swiglu_backward", mutates_args=())
def swiglu_backward_op(grad: Tensor, gate: Tensor, up: Tensor, backend: str) -> Tuple[Tensor, Tensor]:
    return backends.kernel("swiglu", backend, "bwd")(grad, gate, up)


@swiglu_backward_op.register_fake
def _(grad, gate, up, backend):
    return gate.new_empty(gate.shape), up.new_empty(up.shape)


def _setup(ctx, inputs, output):
    gate, up, backend = inputs
    ctx.save_for_backward(gate, up)
    ctx.backend = backend


def _backward(ctx, grad):
    gate, up = ctx.saved_tensors
    dgate, dup = swiglu_backward_op(grad, gate, up, ctx.backend)
    return dgate, dup, None


swiglu_op.register_autograd(_backward, setup_context=_setup)


def swiglu(gate: Tensor, up: Optional[Tensor] = None, *, backend: Optional[str] = None) -> Tensor:
    """silu(gate) * up. With up=None the last dim of gate holds [gate | up] halves (the output
    of a fused gate-up projection)."""
    check_tensor("gate", gate, ndim=range(1, 9))
    if up is None:
        if gate.shape[-1] % 2:
            raise ValueError(f"gate: a packed [gate | up] input needs an even last dim, got {gate.shape[-1]}")
        gate, up = gate.chunk(2, dim=-1)
    else:
        check_tensor("up", up, device=gate.device)
        check_same_dtype("gate", gate, up=up)
        if up.shape != gate.shape:
            raise ValueError(f"up must have the shape of gate {tuple(gate.shape)}, got {tuple(up.shape)}")
    return backends.call(swiglu_op, "swiglu", "fwd", backends.select("swiglu", backend, gate), gate, up)
