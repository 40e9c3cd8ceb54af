"""tk.linear: y = x weight^T + bias (F.linear), as the autograd-aware op truthgpt::linear.

Two cases where torch's CPU GEMM leaves speed behind:
- decoding: for up to 8 rows of x (one token per sequence) the C++ kernel streams the weights
  once, where a GEMM library's kernel reads them at a fraction of the memory bandwidth;
- bfloat16 / float16 on CPUs where torch has no fast GEMM for them (no AVX-512 BW/VL/DQ or AMX
  for bfloat16, no AVX512-FP16 for float16): forward and backward GEMMs run in float32 on
  float32 copies of the operands (exact products, float32 accumulation, one rounding), several
  times to ~100x faster than torch's kernels there.
- float32 on CPUs where torch's BLAS leaves the vector units half idle (MKL runs its AVX2 code on
  AMD CPUs with AVX-512): the forward and backward GEMMs go to oneDNN, which torch also ships,
  ~2.2x faster on an AMD Zen 5 (csrc/cpu/gemm_engine.h: measured once per process; the choice is
  in `tk.explain("linear", x, w)` and `TRUTHGPT_CPU_GEMM=auto|blas|onednn` overrides it).
Otherwise the work is at::linear / at::mm. When a gradient may flow in float32 (elsewhere) /
float64, or on a GPU, tk.linear is F.linear itself (torch's GEMM and autograd)."""
import math
import os
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import _ext, backends
from ..validation import FLOAT_DTYPES, autocast_dtype, check_same_dtype, check_tensor

FAMILY = "linear"


@torch.library.custom_op("truthgpt::linear", mutates_args=())
def linear_op(x: Tensor, weight: Tensor, bias: Optional[Tensor], backend: str) -> Tensor:
    """x (M, K), weight (N, K), bias (N,) or None -> (M, N)."""
    return backends.kernel(FAMILY, backend, "fwd")(x, weight, bias)


@backends.register_fake(linear_op, FAMILY, "fwd")
def _(x, weight, bias, backend):
    return x.new_empty(*x.shape[:-1], weight.shape[0])  # the C++ kernel takes x (..., K)


@torch.library.custom_op("truthgpt::linear_backward", mutates_args=())
def linear_backward_op(grad: Tensor, x: Tensor, weight: Tensor, need_x: bool, need_weight: bool,
                       need_bias: bool, backend: str) -> Tuple[Tensor, Tensor, Tensor]:
    """(dx = grad weight, dweight = grad^T x, dbias = grad summed over rows); each is an empty
    tensor when its flag is false."""
    return backends.kernel(FAMILY, backend, "bwd")(grad, x, weight, need_x, need_weight, need_bias)


@backends.register_fake(linear_backward_op, FAMILY, "bwd")
def _(grad, x, weight, need_x, need_weight, need_bias, backend):
    return (x.new_empty(x.shape if need_x else 0), weight.new_empty(weight.shape if need_weight else 0),
            weight.new_empty(weight.shape[0] if need_bias else 0))


def _setup(ctx, inputs, output):
    x, weight, bias, backend = inputs
    ctx.save_for_backward(*backends.saveable(x, weight))
    ctx.has_bias = bias is not None
    ctx.backend = backend


def _backward(ctx, grad):
    x, weight = ctx.saved_tensors
    need_x, need_weight, need_bias = ctx.needs_input_grad[:3]
    need_bias = need_bias and ctx.has_bias
    dx, dweight, dbias = backends.apply(linear_backward_op, grad, x, weight, need_x, need_weight, need_bias, ctx.backend)
    return dx if need_x else None, dweight if need_weight else None, dbias if need_bias else None, None


backends.register_autograd(linear_op, _backward, _setup)


def _setup_backward(ctx, inputs, output):
    grad, x, weight, need_x, need_weight, need_bias, _backend = inputs
    ctx.save_for_backward(*backends.saveable(grad, x, weight))


def _double_backward(ctx, grad_dx, grad_dweight, grad_dbias):
    """The backward is linear in each input: with u = grad_dx (M, K), v = grad_dweight (N, K),
    c = grad_dbias (N,): d grad = u weight^T + x v^T + c, d x = grad v, d weight = grad^T u
    (a flag that was false has an empty output, whose gradient is then ignored). Written in
    differentiable torch ops, so higher orders are exact too."""
    grad, x, weight = ctx.saved_tensors
    d_grad = torch.zeros_like(grad)
    d_x = d_weight = None
    if grad_dx is not None and grad_dx.shape == x.shape:
        d_grad = d_grad + grad_dx @ weight.t()
        d_weight = grad.t() @ grad_dx
    if grad_dweight is not None and grad_dweight.shape == weight.shape:
        d_grad = d_grad + x @ grad_dweight.t()
        d_x = grad @ grad_dweight
    if grad_dbias is not None and grad_dbias.shape == (weight.shape[0],):
        d_grad = d_grad + grad_dbias
    return d_grad, d_x, d_weight, None, None, None, None


backends.register_autograd(linear_backward_op, _double_backward, _setup_backward)


_ONEDNN_FP32 = {}  # TRUTHGPT_CPU_GEMM value -> does the C++ kernel send float32 GEMMs to oneDNN?


@torch.compiler.assume_constant_result
def uses_onednn_fp32() -> bool:
    """Do float32 GEMMs of tk.linear on the CPU run on oneDNN here (csrc/cpu/gemm_engine.h)?
    A constant of the process to torch.compile, which calls it while tracing (a graph compiled
    before TRUTHGPT_CPU_GEMM changes keeps the choice it saw)."""
    env = os.environ.get("TRUTHGPT_CPU_GEMM")
    if env not in _ONEDNN_FP32:
        ext = _ext.load("_C")[0]
        _ONEDNN_FP32[env] = ext is not None and bool(torch.ops.truthgpt_info.cpu_gemm_onednn())
    return _ONEDNN_FP32[env]


def own_cpu_backward(x: Tensor) -> bool:
    """Do the gradients of a call on tensors like x go through linear_backward rather than
    F.linear's? bfloat16 / float16 on the CPU (see the module docstring), and float32 on CPUs
    where oneDNN's GEMM beats torch's BLAS (csrc/cpu/gemm_engine.h: AMD CPUs with AVX-512)."""
    if x.device.type != "cpu":
        return False
    return x.dtype in (torch.bfloat16, torch.float16) or (x.dtype == torch.float32 and uses_onednn_fp32())


def _direct_call(x, weight, bias) -> bool:
    """Can this call skip validation and the custom op, going straight to the C++ CPU kernel?
    Only when each check of the full path below would pass, in plain comparisons (a decoding
    step calls tk.linear ~30 times a token, where those checks cost ~20 us a call): CPU tensors
    of one float dtype and matching shapes, no gradient to track, no autocast, not tracing."""
    if not (isinstance(x, Tensor) and isinstance(weight, Tensor) and x.is_cpu and weight.is_cpu) or x.is_nested:
        return False
    dt = x.dtype
    if weight.dtype != dt or dt not in FLOAT_DTYPES or weight.dim() != 2 \
            or not 1 <= x.dim() <= 8 or x.shape[-1] != weight.shape[1]:
        return False
    if bias is not None and not (isinstance(bias, Tensor) and bias.is_cpu and bias.dtype == dt
                                 and bias.dim() == 1 and bias.shape[0] == weight.shape[0]):
        return False
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                    or (bias is not None and bias.requires_grad)):
        return False
    return not torch.is_autocast_enabled("cpu") and not torch.compiler.is_compiling()


def linear(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, *,
           backend: Optional[str] = None) -> Tensor:
    """F.linear(x, weight, bias): x (..., K), weight (N, K), bias (N,) -> (..., N); under
    autocast in the autocast dtype, as F.linear."""
    if _direct_call(x, weight, bias) and backends.select(FAMILY, backend, x) == "cpu":
        return backends.kernel(FAMILY, "cpu", "fwd")(x, weight, bias)  # (..., N)
    if isinstance(x, Tensor) and x.is_nested:  # (nn.TransformerEncoder's padding fast path)
        return F.linear(x, weight, bias)
    check_tensor("x", x, ndim=range(1, 9))
    K = x.shape[-1]
    check_tensor("weight", weight, ndim=2, device=x.device, shape=(None, K))
    if bias is not None:
        check_tensor("bias", bias, ndim=1, device=x.device, shape=(weight.shape[0],))
    dt = autocast_dtype(x.device.type)
    if dt is not None:
        x, weight = x.to(dt), weight.to(dt)
        bias = None if bias is None else bias.to(dt)
    check_same_dtype("x", x, weight=weight, bias=bias)
    if (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias))
            and not own_cpu_backward(x)):
        return F.linear(x, weight, bias)
    name = backends.select(FAMILY, backend, x)
    rows = math.prod(x.shape[:-1])  # (not -1: K may be 0; not Size.numel(), which specialises
    # symbolic sizes: torch.export / compile(dynamic=True) would fix the row count)
    out = backends.call(linear_op, FAMILY, "fwd", name, x.reshape(rows, K), weight, bias)
    return out.view(*x.shape[:-1], weight.shape[0])
