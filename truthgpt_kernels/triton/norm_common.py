"""Shared parts of the row norms in Triton (triton/layer_norm.py, triton/rms_norm.py).

Row tiling: rows of up to SINGLE_MAX elements are held whole in registers (short rows are
packed several to a program); longer rows are processed in chunks of CHUNK elements, a few
passes over the row.

Parameter gradients (dweight, dbias) are reduced deterministically: each program of the
backward owns a fixed chunk of rows and writes its partial sums to its own row of a float32
buffer (no atomics), and a second kernel sums that buffer over programs in a fixed order.
"""
import torch
import triton
import triton.language as tl

from ..backends import triton_interpreted
from .utils import calculate_settings, tile_settings

SINGLE_MAX = 8192  # longest row held whole in registers
CHUNK = 4096       # chunk of a longer row


@triton.jit
def _sum_rows_kernel(part_ptr, G, N, out_ptr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr):
    """out[c] = sum over g of part[g, c], always in the same order."""
    cols = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = cols < N
    acc = tl.zeros((BLOCK_G, BLOCK_N), dtype=tl.float32)
    for g0 in range(0, G, BLOCK_G):
        g = g0 + tl.arange(0, BLOCK_G).to(tl.int64)
        m = (g < G)[:, None] & cmask[None, :]
        acc += tl.load(part_ptr + g[:, None] * N + cols[None, :], mask=m, other=0.0)
    tl.store(out_ptr + cols, tl.sum(acc, axis=0).to(out_ptr.dtype.element_ty), mask=cmask)


@triton.jit
def _row_tile(first, ROWS: tl.constexpr, M, cmask):
    """Rows [first, first + ROWS), their mask (rows < M) and the (ROWS, cols) tile mask."""
    rows = first + tl.arange(0, ROWS)
    rmask = rows < M
    return rows, rmask, rmask[:, None] & cmask[None, :]


@triton.jit
def _load_tile(ptr, rows, stride, cols, m):
    """ptr[rows, cols] (rows `stride` elements apart) in float32, 0 where m is false."""
    return tl.load(ptr + rows[:, None] * stride + cols[None, :], mask=m, other=0.0).to(tl.float32)


def _settings(M: int, N: int):
    """(SINGLE, ROWS, BLOCK, num_warps)."""
    if N <= SINGLE_MAX:
        rows, block, warps = tile_settings(M, N, max_cols=SINGLE_MAX)
        return True, rows, block, warps
    block, warps = calculate_settings(CHUNK)
    return False, 1, block, warps


def _programs(device: torch.device, tiles: int) -> int:
    """Programs of the backward: a few waves of the device's SMs (fixed per device, so the
    dweight reduction order, and with it the result, is reproducible)."""
    if device.type == "cuda" and not triton_interpreted():
        target = 4 * torch.cuda.get_device_properties(device).multi_processor_count
    else:
        target = 8
    return max(1, min(tiles, target))


def bwd_programs(device: torch.device, M: int, rows: int):
    """(programs, rows_per_prog) of the backward for M rows in tiles of `rows`; every program
    has rows to do."""
    progs = _programs(device, triton.cdiv(M, rows))
    rows_per_prog = triton.cdiv(triton.cdiv(M, progs), rows) * rows
    return triton.cdiv(M, rows_per_prog), rows_per_prog


def partials(shape, single: bool, device: torch.device) -> torch.Tensor:
    """The float32 partial-sum buffer: the chunked kernels accumulate into it (zeros), the
    single-tile ones write each row once."""
    return (torch.empty if single else torch.zeros)(shape, dtype=torch.float32, device=device)


def reduce_partials(part, progs: int, N: int, like: torch.Tensor) -> torch.Tensor:
    """The sum over programs of part ((progs, N)), with like's shape, dtype and device."""
    out = torch.empty(like.shape, dtype=like.dtype, device=like.device)
    block_g, block_n, warps = tile_settings(progs, N, max_cols=256)
    _sum_rows_kernel[(triton.cdiv(N, block_n),)](part, progs, N, out, BLOCK_G=block_g,
                                                  BLOCK_N=block_n, num_warps=warps)
    return out
