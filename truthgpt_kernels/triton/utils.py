"""Launch heuristics shared by the Triton kernels."""
import triton

from ..backends import triton_interpreted

MAX_FUSED_SIZE = 65536


def calculate_settings(n: int):
    """(BLOCK_SIZE, num_warps) for a kernel that holds one row of n elements per program."""
    block = triton.next_power_of_2(n)
    if block > MAX_FUSED_SIZE:
        raise ValueError(f"rows of {n} elements exceed the fused limit {MAX_FUSED_SIZE}")
    num_warps = 4
    if block >= 32768:
        num_warps = 32
    elif block >= 8192:
        num_warps = 16
    elif block >= 2048:
        num_warps = 8
    return block, (1 if triton_interpreted() else num_warps)


def as_rows(t):
    """(rows, n) view with unit inner stride; copies only when the layout cannot be viewed."""
    r = t.reshape(-1, t.shape[-1])
    return r if r.stride(1) == 1 or r.shape[1] == 1 else r.contiguous()


def tile_settings(rows: int, n: int, *, max_cols: int = 2048, max_tile: int = 4096):
    """(ROWS, BLOCK_N, num_warps) for a kernel whose programs each process a (ROWS, BLOCK_N)
    tile of a (rows, n) matrix: rows longer than max_cols are split over several programs,
    short rows are packed ROWS to a program so that each holds about max_tile elements.
    Under TRITON_INTERPRET=1 tiles are 16x larger (each program costs Python-level work)."""
    scale = 16 if triton_interpreted() else 1
    block_n = min(triton.next_power_of_2(max(n, 1)), max_cols * scale)
    rows_per = max(1, min((max_tile * scale) // block_n, triton.next_power_of_2(max(rows, 1))))
    return rows_per, block_n, calculate_settings(rows_per * block_n)[1]
