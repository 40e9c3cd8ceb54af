"""GeGLU in Triton: out = gelu(gate) * up; backward recomputes gelu. fp32 math.

gelu forms as F.gelu: "tanh", written as g * sigmoid(2k) with k = sqrt(2/pi) (g + 0.044715 g^3)
(= g (1 + tanh k) / 2), and "none", g * Phi(g) with Phi(g) = (1 + erf(g / sqrt 2)) / 2.
Tiles and launch as the other gated activations (triton/gated.py).
"""
import torch
import triton
import triton.language as tl

from . import gated
from .gated import _tile

SQRT_2_OVER_PI = tl.constexpr(0.7978845608028654)
CUBIC = tl.constexpr(0.044715)
INV_SQRT2 = tl.constexpr(0.7071067811865476)
INV_SQRT_2PI = tl.constexpr(0.3989422804014327)


@triton.jit
def _gelu(g, TANH: tl.constexpr):
    """(gelu(g), gelu'(g))"""
    if TANH:
        s = tl.sigmoid(g * (2 * SQRT_2_OVER_PI + (2 * SQRT_2_OVER_PI * CUBIC) * g * g))
        d = s + g * s * (1.0 - s) * (2 * SQRT_2_OVER_PI + (6 * SQRT_2_OVER_PI * CUBIC) * g * g)
        return g * s, d
    else:
        cdf = 0.5 * (1.0 + tl.erf(g * INV_SQRT2))
        return g * cdf, cdf + g * tl.exp(-0.5 * g * g) * INV_SQRT_2PI


@triton.jit
def _geglu_fwd_kernel(g_ptr, g_stride, u_ptr, u_stride, o_ptr, rows_count, n, TANH: tl.constexpr,
                      ROWS: tl.constexpr, BLOCK_N: tl.constexpr):
    r, c, mask = _tile(rows_count, n, ROWS, BLOCK_N)
    g = tl.load(g_ptr + r * g_stride + c, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + r * u_stride + c, mask=mask, other=0.0).to(tl.float32)
    act, _ = _gelu(g, TANH)
    tl.store(o_ptr + r * n + c, (act * u).to(o_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _geglu_bwd_kernel(dy_ptr, dy_stride, g_ptr, g_stride, u_ptr, u_stride, dg_ptr, du_ptr,
                      rows_count, n, TANH: tl.constexpr, ROWS: tl.constexpr, BLOCK_N: tl.constexpr):
    r, c, mask = _tile(rows_count, n, ROWS, BLOCK_N)
    dy = tl.load(dy_ptr + r * dy_stride + c, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + r * g_stride + c, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + r * u_stride + c, mask=mask, other=0.0).to(tl.float32)
    act, d = _gelu(g, TANH)
    tl.store(du_ptr + r * n + c, (dy * act).to(du_ptr.dtype.element_ty), mask=mask)
    tl.store(dg_ptr + r * n + c, (dy * u * d).to(dg_ptr.dtype.element_ty), mask=mask)


def geglu_fwd(gate: torch.Tensor, up: torch.Tensor, approximate: str) -> torch.Tensor:
    return gated.fwd(_geglu_fwd_kernel, gate, up, TANH=approximate == "tanh")


def geglu_bwd(grad: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, approximate: str):
    return gated.bwd(_geglu_bwd_kernel, grad, gate, up, TANH=approximate == "tanh")
