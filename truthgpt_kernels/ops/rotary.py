"""tk.apply_rotary / tk.apply_rotary_qk / tk.rotary_cos_sin (ops truthgpt::apply_rotary[_qk]).

The backward of a rotation is the rotation by the opposite angle: the same op with sin negated.
"""
from typing import Optional, Tuple

import torch
from torch import Tensor

from .. import backends
from ..validation import check_int, check_same_dtype, check_tensor
from . import reference


@torch.library.custom_op("truthgpt::apply_rotary", mutates_args=())
def rotary_op(x: Tensor, cos: Tensor, sin: Tensor, position_ids: Tensor, interleaved: bool,
              backend: str) -> Tensor:
    return backends.kernel("rotary", backend, "fwd")(x, cos, sin, position_ids, interleaved)


@backends.register_fake(rotary_op, "rotary", "fwd")
def _(x, cos, sin, position_ids, interleaved, backend):
    return backends.empty_bhsd(x, x.shape, backend)


@torch.library.custom_op("truthgpt::apply_rotary_qk", mutates_args=())
def rotary_qk_op(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, position_ids: Tensor,
                 interleaved: bool, backend: str) -> Tuple[Tensor, Tensor]:
    return backends.kernel("rotary", backend, "qk_fwd")(q, k, cos, sin, position_ids, interleaved)


@backends.register_fake(rotary_qk_op, "rotary", "qk_fwd")
def _(q, k, cos, sin, position_ids, interleaved, backend):
    return backends.empty_bhsd(q, q.shape, backend), backends.empty_bhsd(k, k.shape, backend)


def _setup(ctx, inputs, output):
    ctx.cos, ctx.sin, ctx.position_ids, ctx.interleaved, ctx.backend = inputs[-5:]


def _backward(ctx, grad):
    dx = backends.apply(rotary_op, grad, ctx.cos, -ctx.sin, ctx.position_ids, ctx.interleaved, ctx.backend)
    return dx, None, None, None, None, None


def _backward_qk(ctx, grad_q, grad_k):
    dq, dk = backends.apply(rotary_qk_op, grad_q, grad_k, ctx.cos, -ctx.sin, ctx.position_ids, ctx.interleaved,
                          ctx.backend)
    return dq, dk, None, None, None, None, None


backends.register_autograd(rotary_op, _backward, _setup)
backends.register_autograd(rotary_qk_op, _backward_qk, _setup)


def _prepare(x: Tensor, cos: Tensor, sin: Tensor, position_ids, offset) -> Tensor:
    """Validates the shared arguments; returns position ids as int64 (B, S)."""
    B, H, S, D = check_tensor("x", x, ndim=4).shape
    check_tensor("cos", cos, ndim=2, device=x.device)
    check_tensor("sin", sin, ndim=2, device=x.device, shape=tuple(cos.shape))
    check_same_dtype("cos", cos, sin=sin)
    P, half = cos.shape
    if 2 * half > D:
        raise ValueError(f"cos: rotary dim 2 * cos.shape[-1] = {2 * half} exceeds the head dim {D}")
    if half < 1:
        raise ValueError("cos: rotary dim must be >= 2 (cos.shape[-1] >= 1)")
    if position_ids is None:
        check_int("offset", offset, minimum=0)
        if offset + S > P:
            raise ValueError(f"cos/sin cover {P} positions, but offset {offset} + seq {S} needs {offset + S}")
        return torch.arange(offset, offset + S, device=x.device).expand(B, S)
    check_tensor("position_ids", position_ids, ndim=(1, 2), dtypes=(torch.int64, torch.int32),
                 device=x.device)
    if position_ids.shape[-1] != S or (position_ids.dim() == 2 and position_ids.shape[0] not in (1, B)):
        raise ValueError(f"position_ids must have shape ({B}, {S}) or ({S},), got {tuple(position_ids.shape)}")
    # a data-dependent check: skipped while torch.compile traces (the kernels bound-check too)
    if position_ids.numel() and not torch.compiler.is_compiling() and (
            int(position_ids.min()) < 0 or int(position_ids.max()) >= P):
        raise ValueError(f"position_ids must lie in [0, {P}) (the length of cos/sin), "
                         f"got values in [{int(position_ids.min())}, {int(position_ids.max())}]")
    return position_ids.to(torch.int64).expand(B, S)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor, *, interleaved: bool = False,
                 position_ids: Optional[Tensor] = None, offset: int = 0,
                 backend: Optional[str] = None) -> Tensor:
    """Rotary embedding of x (B, H, S, D): the first R = 2 * cos.shape[-1] dims rotate, the
    rest pass through. Pairs (x[d], x[d + R/2]) (NeoX/Llama) or, interleaved, (x[2d], x[2d+1])."""
    pos = _prepare(x, cos, sin, position_ids, offset)
    return backends.call(rotary_op, "rotary", "fwd", backends.select("rotary", backend, x),
                         x, cos, sin, pos, bool(interleaved))


def apply_rotary_qk(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, *, interleaved: bool = False,
                    position_ids: Optional[Tensor] = None, offset: int = 0,
                    backend: Optional[str] = None) -> Tuple[Tensor, Tensor]:
    """apply_rotary on q and k (head counts may differ) in one launch; returns (q, k)."""
    pos = _prepare(q, cos, sin, position_ids, offset)
    check_tensor("k", k, ndim=4, device=q.device)
    check_same_dtype("q", q, k=k)
    if (k.shape[0], k.shape[2], k.shape[3]) != (q.shape[0], q.shape[2], q.shape[3]):
        raise ValueError(f"k must match q in batch, seq and head dim: q {tuple(q.shape)}, k {tuple(k.shape)}")
    return backends.call(rotary_qk_op, "rotary", "qk_fwd", backends.select("rotary", backend, q),
                         q, k, cos, sin, pos, bool(interleaved))


def rotary_cos_sin(seq_len: int, rotary_dim: int, *, base: float = 10000.0, scaling=None,
                   device=None, dtype=torch.float32) -> Tuple[Tensor, Tensor]:
    """(cos, sin), each (seq_len, rotary_dim // 2); see ops.reference.rotary_cos_sin."""
    check_int("seq_len", seq_len, minimum=0)
    check_int("rotary_dim", rotary_dim, minimum=2)
    if rotary_dim % 2:
        raise ValueError(f"rotary_dim must be even, got {rotary_dim}")
    if scaling is not None:
        kinds = ("linear", "ntk", "llama3")
        if not isinstance(scaling, dict) or scaling.get("type") not in kinds:
            raise ValueError(f"scaling must be None or a dict with 'type' in {kinds}, got {scaling!r}")
        if scaling["type"] != "llama3" and "factor" not in scaling:
            raise ValueError(f"scaling of type {scaling['type']!r} needs a 'factor'")
    return reference.rotary_cos_sin(seq_len, rotary_dim, base=base, scaling=scaling,
                                    device=device, dtype=dtype)
