"""tk.geglu: gelu(gate) * up, as the autograd-aware op truthgpt::geglu."""
from typing import Optional, Tuple

import torch
from torch import Tensor

from .. import backends
from ..validation import check_choice, check_gate_up

APPROXIMATIONS = ("tanh", "none")


@torch.library.custom_op("truthgpt::geglu", mutates_args=())
def geglu_op(gate: Tensor, up: Tensor, approximate: str, backend: str) -> Tensor:
    return backends.kernel("geglu", backend, "fwd")(gate, up, approximate)


@backends.register_fake(geglu_op, "geglu", "fwd")
def _(gate, up, approximate, backend):
    return gate.new_empty(gate.shape)


@torch.library.custom_op("truthgpt::geglu_backward", mutates_args=())
def geglu_backward_op(grad: Tensor, gate: Tensor, up: Tensor, approximate: str,
                      backend: str) -> Tuple[Tensor, Tensor]:
    return backends.kernel("geglu", backend, "bwd")(grad, gate, up, approximate)


@geglu_backward_op.register_fake
def _(grad, gate, up, approximate, backend):
    return gate.new_empty(gate.shape), up.new_empty(up.shape)


def _setup(ctx, inputs, output):
    gate, up, approximate, backend = inputs
    ctx.save_for_backward(*backends.saveable(gate, up))
    ctx.approximate, ctx.backend = approximate, backend


def _backward(ctx, grad):
    gate, up = ctx.saved_tensors
    dgate, dup = backends.apply(geglu_backward_op, grad, gate, up, ctx.approximate, ctx.backend)
    return dgate, dup, None, None


backends.register_autograd(geglu_op, _backward, _setup)


# The packed form (gate_up (..., 2n) = [gate | up]), whose backward returns the gradient of
# gate_up as one tensor (ops/swiglu.py).
@torch.library.custom_op("truthgpt::geglu_packed", mutates_args=())
def geglu_packed_op(gate_up: Tensor, approximate: str, backend: str) -> Tensor:
    return backends.kernel("geglu", backend, "fwd")(*gate_up.chunk(2, dim=-1), approximate)


@geglu_packed_op.register_fake
def _(gate_up, approximate, backend):
    return gate_up.new_empty((*gate_up.shape[:-1], gate_up.shape[-1] // 2))


@torch.library.custom_op("truthgpt::geglu_packed_backward", mutates_args=())
def geglu_packed_backward_op(grad: Tensor, gate_up: Tensor, approximate: str, backend: str) -> Tensor:
    return backends.packed_gated_bwd("geglu", backend, grad, gate_up, approximate)


@geglu_packed_backward_op.register_fake
def _(grad, gate_up, approximate, backend):
    return gate_up.new_empty(gate_up.shape)


def _setup_packed(ctx, inputs, output):
    gate_up, approximate, backend = inputs
    ctx.save_for_backward(*backends.saveable(gate_up))
    ctx.approximate, ctx.backend = approximate, backend


def _backward_packed(ctx, grad):
    (gate_up,) = ctx.saved_tensors
    return backends.apply(geglu_packed_backward_op, grad, gate_up, ctx.approximate, ctx.backend), None, None


backends.register_autograd(geglu_packed_op, _backward_packed, _setup_packed)


def geglu(gate: Tensor, up: Optional[Tensor] = None, approximate: str = "tanh", *,
          backend: Optional[str] = None) -> Tensor:
    """gelu(gate, approximate) * up, approximate "tanh" or "none" (erf) as in F.gelu. With
    up=None the last dim of gate holds [gate | up] halves (a fused gate-up projection)."""
    gate_up = gate if up is None else None
    gate, up = check_gate_up(gate, up)
    approximate = check_choice("approximate", approximate, APPROXIMATIONS)
    name = backends.select("geglu", backend, gate)
    if gate_up is not None and torch.is_grad_enabled() and gate_up.requires_grad:
        return backends.apply(geglu_packed_op, gate_up, approximate, name)
    return backends.call(geglu_op, "geglu", "fwd", name, gate, up, approximate)
