"""SwiGLU in Triton: out = silu(gate) * up; backward recomputes silu. fp32 math.

Tiles and launch as the other gated activations (triton/gated.py).
"""
import torch
import triton
import triton.language as tl

from . import gated
from .gated import _tile


@triton.jit
def _swiglu_fwd_kernel(g_ptr, g_stride, u_ptr, u_stride, o_ptr, rows_count, n,
                       ROWS: tl.constexpr, BLOCK_N: tl.constexpr):
    r, c, mask = _tile(rows_count, n, ROWS, BLOCK_N)
    g = tl.load(g_ptr + r * g_stride + c, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + r * u_stride + c, mask=mask, other=0.0).to(tl.float32)
    out = g * tl.sigmoid(g) * u
    tl.store(o_ptr + r * n + c, out.to(o_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd_kernel(dy_ptr, dy_stride, g_ptr, g_stride, u_ptr, u_stride, dg_ptr, du_ptr,
                       rows_count, n, ROWS: tl.constexpr, BLOCK_N: tl.constexpr):
    r, c, mask = _tile(rows_count, n, ROWS, BLOCK_N)
    dy = tl.load(dy_ptr + r * dy_stride + c, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + r * g_stride + c, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + r * u_stride + c, mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(g)
    tl.store(du_ptr + r * n + c, (dy * g * sig).to(du_ptr.dtype.element_ty), mask=mask)
    dg = dy * u * sig * (1.0 + g * (1.0 - sig))
    tl.store(dg_ptr + r * n + c, dg.to(dg_ptr.dtype.element_ty), mask=mask)


def swiglu_fwd(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return gated.fwd(_swiglu_fwd_kernel, gate, up)


def swiglu_bwd(grad: torch.Tensor, gate: torch.Tensor, up: torch.Tensor):
    return gated.bwd(_swiglu_bwd_kernel, grad, gate, up)
