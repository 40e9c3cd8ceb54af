"""RMSNorm and LayerNorm (drop-ins for torch.nn.RMSNorm / torch.nn.LayerNorm on the fused
tk.rms_norm / tk.layer_norm ops) and the norm factory."""
import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import backends
from ..ops import add_rms_norm, layer_norm, rms_norm

try:  # torch's own rule (the one its RMSNorm follows), by the order of x's strides
    from torch._prims_common import suggest_memory_format as _suggest_memory_format
except ImportError:  # pragma: no cover - older/newer torch without it
    def _suggest_memory_format(x: Tensor) -> torch.memory_format:
        for fmt in (torch.channels_last, torch.channels_last_3d):
            if x.is_contiguous(memory_format=fmt) and not x.is_contiguous():
                return fmt
        return torch.contiguous_format


def _default_eps(dtype: torch.dtype) -> float:
    """torch.nn.RMSNorm's eps=None: the machine epsilon of the dtype its kernel computes in
    (ATen's opmath type: float32 for bfloat16 / float16 x, which torch's docs call
    finfo(x.dtype).eps; bfloat16's own 7.8e-3 would change small inputs' outputs by ~90%)."""
    return torch.finfo(torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype).eps


class RMSNorm(nn.RMSNorm):
    """y = x / sqrt(mean(x^2) + eps) * weight over the last len(normalized_shape) dims.

    Same constructor, `weight` parameter, state_dict and results as torch.nn.RMSNorm (eps=None
    means, as there, the epsilon of the computation's dtype: float32's for bfloat16 / float16
    x, torch.finfo(x.dtype).eps otherwise); statistics are computed in float32. A subclass of
    torch.nn.RMSNorm, so isinstance checks (weight-decay groups, weight init) see one. `backend`
    picks the kernel (None: whatever use_backend() / TRUTHGPT_BACKEND / "auto" say)."""

    def __init__(self, normalized_shape, eps: Optional[float] = None,
                 elementwise_affine: bool = True, device=None, dtype=None, *,
                 backend: Optional[str] = None):
        super().__init__(normalized_shape, eps, elementwise_affine, device=device, dtype=dtype)
        self.backend = backend

    def forward(self, x: Tensor) -> Tensor:
        n = len(self.normalized_shape)
        if not isinstance(x, Tensor) or x.dim() < n or tuple(x.shape[x.dim() - n:]) != self.normalized_shape \
                or not x.is_floating_point():  # torch's own exception, as torch.nn.RMSNorm
            return F.rms_norm(x, self.normalized_shape, self.weight, self.eps)
        eps = _default_eps(x.dtype) if self.eps is None else self.eps
        weight = self.weight
        if weight is not None:
            if weight.dtype not in (x.dtype, torch.float32):
                weight = weight.to(x.dtype)
            weight = weight.reshape(-1)
        if n == 1:
            y = rms_norm(x, weight, eps, backend=self.backend)
        else:
            flat = x.reshape(*x.shape[:x.dim() - n], math.prod(self.normalized_shape))
            y = rms_norm(flat, weight, eps, backend=self.backend).reshape(x.shape)
        # torch.nn.RMSNorm's output is dense in x's suggested memory format (channels_last
        # stays channels_last); other layouts come back contiguous, as ours do
        fmt = _suggest_memory_format(x) if x.dim() in (4, 5) else torch.contiguous_format
        return y if fmt == torch.contiguous_format else y.contiguous(memory_format=fmt)

    def extra_repr(self) -> str:
        return f"{self.normalized_shape}, eps={self.eps}, elementwise_affine={self.elementwise_affine}"


_LOW = (torch.bfloat16, torch.float16)


@torch.compiler.assume_constant_result
def _fused_add_rms_norm(backend: Optional[str], device_type: str, dtype: torch.dtype) -> bool:
    """Does the norm's own backend choice land on a kernel that also has add_rms_norm (the C++
    CPU kernels)? Elsewhere (Triton, CUDA, reference) the block adds and normalises apart."""
    try:
        return backends._select("rms_norm", backend, device_type, dtype) == "cpu" and \
            backends.implements("add_rms_norm", "cpu")
    except backends.BackendError:
        return False


def add_norm(norm: nn.Module, x: Tensor, residual: Tensor):
    """(norm(h), h) with h = residual + x: the pre-norm residual step, through the fused
    tk.add_rms_norm when `norm` is a 1-D RMSNorm served by the C++ CPU kernels (then norm(h)
    comes in x's dtype: under autocast the projection after it needs no cast), else the add and
    the norm apart (the same values)."""
    if (isinstance(norm, RMSNorm) and len(norm.normalized_shape) == 1 and x.shape == residual.shape
            and (x.dtype == residual.dtype or (residual.dtype == torch.float32 and x.dtype in _LOW))
            and _fused_add_rms_norm(norm.backend, residual.device.type, residual.dtype)):
        eps = _default_eps(residual.dtype) if norm.eps is None else norm.eps
        weight = norm.weight
        if weight is not None and weight.dtype not in (residual.dtype, torch.float32):
            weight = weight.to(residual.dtype)
        return add_rms_norm(x, residual, weight, eps, backend="cpu")
    h = residual + x
    return norm(h), h


class LayerNorm(nn.LayerNorm):
    """y = (x - mean) / sqrt(var + eps) * weight + bias over the last len(normalized_shape)
    dims (biased variance), on the fused tk.layer_norm op.

    A drop-in for torch.nn.LayerNorm: same constructor (normalized_shape, eps, elementwise_affine,
    bias, device, dtype), `weight` / `bias` parameters, state_dict keys, repr and results;
    statistics are computed in float32. A subclass of torch.nn.LayerNorm, so isinstance checks
    (weight-decay groups, transformers' weight init) see one. `backend` picks the kernel (None:
    whatever use_backend() / TRUTHGPT_BACKEND / "auto" say)."""

    def __init__(self, normalized_shape, eps: float = 1e-5, elementwise_affine: bool = True,
                 bias: bool = True, device=None, dtype=None, *, backend: Optional[str] = None):
        super().__init__(normalized_shape, eps, elementwise_affine, bias, device=device, dtype=dtype)
        self.backend = backend

    def forward(self, input: Tensor) -> Tensor:
        x = input
        if isinstance(x, Tensor) and x.is_nested:
            return self._nested_forward(x)
        n = len(self.normalized_shape)
        if not isinstance(x, Tensor) or x.dim() < n or tuple(x.shape[x.dim() - n:]) != self.normalized_shape \
                or not x.is_floating_point() or any(  # torch's own exception, as torch.nn.LayerNorm
                    p is not None and p.dtype != x.dtype and not (p.dtype == torch.float32 and x.dtype in _LOW)
                    for p in (self.weight, self.bias)):  # (mixed: low-precision x, float32 parameters)
            return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        weight, bias = [p.reshape(-1) if p is not None else None for p in (self.weight, self.bias)]
        if n == 1:
            return layer_norm(x, weight, bias, self.eps, backend=self.backend)
        flat = x.reshape(*x.shape[:x.dim() - n], math.prod(self.normalized_shape))
        return layer_norm(flat, weight, bias, self.eps, backend=self.backend).reshape(x.shape)

    def _nested_forward(self, x: Tensor) -> Tensor:
        """A nested (batch, ragged length, ..., normalized dims) tensor, as nn.TransformerEncoder's
        padding fast path passes it: the rows of every component normalised at once."""
        if x.layout == torch.jagged:
            return torch.nested.nested_tensor_from_jagged(self(x.values()), offsets=x.offsets())
        parts = x.unbind()
        out = self(torch.cat([p.reshape(-1, *p.shape[p.dim() - len(self.normalized_shape):])
                              for p in parts]))
        sizes = [p.numel() // math.prod(self.normalized_shape) for p in parts]
        return torch.nested.as_nested_tensor(
            [o.reshape(p.shape) for o, p in zip(out.split(sizes), parts)], layout=x.layout)

    def extra_repr(self) -> str:
        return (f"{self.normalized_shape}, eps={self.eps}, elementwise_affine={self.elementwise_affine}, "
                f"bias={self.bias is not None}")


def make_norm(kind: str, dim: int, eps: float, *, backend: Optional[str] = None,
              device=None, dtype=None) -> nn.Module:
    """"rmsnorm" (RMSNorm) or "layernorm" (LayerNorm, with a bias): ours, on the fused ops, with
    the state_dict keys of torch.nn.RMSNorm / torch.nn.LayerNorm ("weight", "bias")."""
    if kind == "rmsnorm":
        return RMSNorm(dim, eps=eps, backend=backend, device=device, dtype=dtype)
    if kind == "layernorm":
        return LayerNorm(dim, eps=eps, backend=backend, device=device, dtype=dtype)
    raise ValueError(f"norm must be 'rmsnorm' or 'layernorm', got {kind!r}")
