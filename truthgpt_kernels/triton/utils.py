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
