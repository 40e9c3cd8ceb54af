"""Shared parts of the gated activations in Triton (triton/swiglu.py, triton/geglu.py):
out = act(gate) * up and its backward, fp32 math.

Each program processes a (ROWS, BLOCK_N) tile (triton/utils.tile_settings): long rows are split
over several programs along the second grid axis, short rows are packed several to a program,
so any row length works and every program moves a similar amount of data. The kernels are the
ops' own; they take the arguments that fwd / bwd below pass them.
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


def _grid(rows: int, n: int):
    rows_per, block_n, warps = tile_settings(rows, n)
    return (triton.cdiv(rows, rows_per), triton.cdiv(n, block_n)), rows_per, block_n, warps


def fwd(kernel, gate: torch.Tensor, up: torch.Tensor, **consts) -> torch.Tensor:
    """Runs kernel(g, g_stride, u, u_stride, out, rows, n, **consts, ROWS, BLOCK_N)."""
    g, u = as_rows(gate), as_rows(up)
    rows, n = g.shape
    out = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    if out.numel():
        grid, rows_per, block_n, warps = _grid(rows, n)
        kernel[grid](g, g.stride(0), u, u.stride(0), out, rows, n, **consts, ROWS=rows_per,
                     BLOCK_N=block_n, num_warps=warps)
    return out


def bwd(kernel, grad: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, **consts):
    """(dgate, dup) from kernel(dy, dy_stride, g, g_stride, u, u_stride, dg, du, rows, n,
    **consts, ROWS, BLOCK_N)."""
    dy, g, u = as_rows(grad), as_rows(gate), as_rows(up)
    rows, n = g.shape
    dg = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    du = torch.empty(up.shape, dtype=up.dtype, device=up.device)
    if dg.numel():
        grid, rows_per, block_n, warps = _grid(rows, n)
        kernel[grid](dy, dy.stride(0), g, g.stride(0), u, u.stride(0), dg, du, rows, n, **consts,
                     ROWS=rows_per, BLOCK_N=block_n, num_warps=warps)
    return dg, du
