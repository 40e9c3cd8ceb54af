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
    ctx.save_for_backward(gate, up)
    ctx.approximate, ctx.backend = approximate, backend


def _backward(ctx, grad):
    gate, up = ctx.saved_tensors
    dgate, dup = geglu_backward_op(grad, gate, up, ctx.approximate, ctx.backend)
    return dgate, dup, None, None


geglu_op.register_autograd(_backward, setup_context=_setup)


def geglu(gate: Tensor, up: Optional[Tensor] = None, approximate: str = "tanh", *,
          backend: Optional[str] = None) -> Tensor:
    """gelu(gate, approximate) * up, approximate "tanh" or "none" (erf) as in F.gelu. With
    up=None the last dim of gate holds [gate | up] halves (a fused gate-up projection)."""
    gate, up = check_gate_up(gate, up)
    approximate = check_choice("approximate", approximate, APPROXIMATIONS)
    return backends.call(geglu_op, "geglu", "fwd", backends.select("geglu", backend, gate), gate, up,
                         approximate)
