"""SwiGLU in Triton: out = silu(gate) * up; backward recomputes silu. fp32 math."""
import torch
import triton
import triton.language as tl

from .utils import as_rows, calculate_settings


@triton.jit
def _swiglu_fwd_kernel(g_ptr, g_stride, u_ptr, u_stride, o_ptr, n, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n
    g = tl.load(g_ptr + row * g_stride + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + row * u_stride + cols, mask=mask, other=0.0).to(tl.float32)
    out = g * tl.sigmoid(g) * u
    tl.store(o_ptr + row * n + cols, out.to(o_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd_kernel(dy_ptr, dy_stride, g_ptr, g_stride, u_ptr, u_stride, dg_ptr, du_ptr, n,
                       BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n
    dy = tl.load(dy_ptr + row * dy_stride + cols, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + row * g_stride + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + row * u_stride + cols, mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(g)
    tl.store(du_ptr + row * n + cols, (dy * g * sig).to(du_ptr.dtype.element_ty), mask=mask)
    dg = dy * u * sig * (1.0 + g * (1.0 - sig))
    tl.store(dg_ptr + row * n + cols, dg.to(dg_ptr.dtype.element_ty), mask=mask)


def swiglu_fwd(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    g, u = as_rows(gate), as_rows(up)
    rows, n = g.shape
    out = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    if out.numel():
        block, warps = calculate_settings(n)
        _swiglu_fwd_kernel[(rows,)](g, g.stride(0), u, u.stride(0), out, n, BLOCK=block, num_warps=warps)
    return out


def swiglu_bwd(grad: torch.Tensor, gate: torch.Tensor, up: torch.Tensor):
    dy, g, u = as_rows(grad), as_rows(gate), as_rows(up)
    rows, n = g.shape
    dg = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    du = torch.empty(up.shape, dtype=up.dtype, device=up.device)
    if dg.numel():
        block, warps = calculate_settings(n)
        _swiglu_bwd_kernel[(rows,)](dy, dy.stride(0), g, g.stride(0), u, u.stride(0), dg, du, n,
                                    BLOCK=block, num_warps=warps)
    return dg, du
