"""SwiGLU in Triton: out = silu(gate) * up; backward recomputes silu. fp32 math.

Each program processes a (ROWS, BLOCK_N) tile (triton/utils.tile_settings): long rows are split
over several programs along the second grid axis, short rows are packed several to a program,
so any row length works and every program moves a similar amount of data.
"""
import torch
import triton
import triton.language as tl

from .utils import as_rows, tile_settings


@triton.jit
def _tile(rows_count, n, ROWS: tl.constexpr, BLOCK_N: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows < rows_count)[:, None] & (cols < n)[None, :]
    return rows[:, None], cols[None, :], mask


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


def _grid(rows: int, n: int):
    rows_per, block_n, warps = tile_settings(rows, n)
    return (triton.cdiv(rows, rows_per), triton.cdiv(n, block_n)), rows_per, block_n, warps


def swiglu_fwd(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    g, u = as_rows(gate), as_rows(up)
    rows, n = g.shape
    out = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    if out.numel():
        grid, rows_per, block_n, warps = _grid(rows, n)
        _swiglu_fwd_kernel[grid](g, g.stride(0), u, u.stride(0), out, rows, n,
                                 ROWS=rows_per, BLOCK_N=block_n, num_warps=warps)
    return out


def swiglu_bwd(grad: torch.Tensor, gate: torch.Tensor, up: torch.Tensor):
    dy, g, u = as_rows(grad), as_rows(gate), as_rows(up)
    rows, n = g.shape
    dg = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    du = torch.empty(up.shape, dtype=up.dtype, device=up.device)
    if dg.numel():
        grid, rows_per, block_n, warps = _grid(rows, n)
        _swiglu_bwd_kernel[grid](dy, dy.stride(0), g, g.stride(0), u, u.stride(0), dg, du, rows, n,
                                 ROWS=rows_per, BLOCK_N=block_n, num_warps=warps)
    return dg, du
