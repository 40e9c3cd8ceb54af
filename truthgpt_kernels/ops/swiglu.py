"""tk.swiglu: silu(gate) * up, as the autograd-aware op truthgpt::swiglu."""
from typing import Optional, Tuple

import torch
from torch import Tensor

from .. import backends
from ..validation import check_gate_up


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
    ctx.save_for_backward(*backends.saveable(gate, up))
    ctx.backend = backend


def _backward(ctx, grad):
    gate, up = ctx.saved_tensors
    dgate, dup = backends.apply(swiglu_backward_op, grad, gate, up, ctx.backend)
    return dgate, dup, None


backends.register_autograd(swiglu_op, _backward, _setup)


# The packed form: gate_up (..., 2n) holds [gate | up] (a fused gate-up projection's output).
# Its own op so that the backward returns the gradient of gate_up as one tensor (written in
# place by the CPU kernel) instead of two halves that autograd would concatenate.
@torch.library.custom_op("truthgpt::swiglu_packed", mutates_args=())
def swiglu_packed_op(gate_up: Tensor, backend: str) -> Tensor:
    return backends.kernel("swiglu", backend, "fwd")(*gate_up.chunk(2, dim=-1))


@swiglu_packed_op.register_fake
def _(gate_up, backend):
    return gate_up.new_empty((*gate_up.shape[:-1], gate_up.shape[-1] // 2))


@torch.library.custom_op("truthgpt::swiglu_packed_backward", mutates_args=())
def swiglu_packed_backward_op(grad: Tensor, gate_up: Tensor, backend: str) -> Tensor:
    return backends.packed_gated_bwd("swiglu", backend, grad, gate_up)


@swiglu_packed_backward_op.register_fake
def _(grad, gate_up, backend):
    return gate_up.new_empty(gate_up.shape)


def _setup_packed(ctx, inputs, output):
    gate_up, backend = inputs
    ctx.save_for_backward(*backends.saveable(gate_up))
    ctx.backend = backend


def _backward_packed(ctx, grad):
    (gate_up,) = ctx.saved_tensors
    return backends.apply(swiglu_packed_backward_op, grad, gate_up, ctx.backend), None


backends.register_autograd(swiglu_packed_op, _backward_packed, _setup_packed)


def swiglu(gate: Tensor, up: Optional[Tensor] = None, *, backend: Optional[str] = None) -> Tensor:
    """silu(gate) * up. With up=None the last dim of gate holds [gate | up] halves (the output
    of a fused gate-up projection)."""
    gate_up = gate if up is None else None
    gate, up = check_gate_up(gate, up)
    name = backends.select("swiglu", backend, gate)
    if gate_up is not None and torch.is_grad_enabled() and gate_up.requires_grad:
        return backends.apply(swiglu_packed_op, gate_up, name)
    return backends.call(swiglu_op, "swiglu", "fwd", name, gate, up)
