"""RMSNorm in Triton (kernel ops rms_norm_fwd / rms_norm_bwd of csrc/registration.cpp).

y = x * rstd * weight, rstd = rsqrt(mean(x^2) + eps) in float32 (saved for the backward);
weight is None, or of x's dtype, or float32. Backward: dx = rstd * (dy w - x rstd^2 mean(dy w x)),
dweight = sum over rows of dy x rstd, reduced deterministically: each program of the backward
owns a fixed chunk of rows and writes its partial sums to its own row of a float32 buffer (no
atomics), and a second kernel sums that buffer over programs in a fixed order.

Rows of up to SINGLE_MAX elements are held whole in registers (short rows are packed several to
a program); longer rows are processed in chunks of CHUNK elements, two passes over the row.
"""
import torch
import triton
import triton.language as tl

from ..backends import triton_interpreted
from .utils import as_rows, calculate_settings, tile_settings

SINGLE_MAX = 8192  # longest row held whole in registers
CHUNK = 4096       # chunk of a longer row


@triton.jit
def _rms_fwd_kernel(x_ptr, sx, w_ptr, o_ptr, r_ptr, M, N, eps, HAS_W: tl.constexpr,
                    ROWS: tl.constexpr, BLOCK: tl.constexpr, SINGLE: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    rmask = rows < M
    x_row = x_ptr + rows[:, None] * sx
    o_row = o_ptr + rows[:, None] * N
    if SINGLE:
        cols = tl.arange(0, BLOCK)
        cmask = cols < N
        m = rmask[:, None] & cmask[None, :]
        x = tl.load(x_row + cols[None, :], mask=m, other=0.0).to(tl.float32)
        r = tl.rsqrt(tl.sum(x * x, axis=1) / N + eps)
        y = x * r[:, None]
        if HAS_W:
            y = y * tl.load(w_ptr + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
        tl.store(o_row + cols[None, :], y.to(o_ptr.dtype.element_ty), mask=m)
    else:
        acc = tl.zeros((ROWS, BLOCK), dtype=tl.float32)
        for start in range(0, N, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            m = rmask[:, None] & (cols < N)[None, :]
            x = tl.load(x_row + cols[None, :], mask=m, other=0.0).to(tl.float32)
            acc += x * x
        r = tl.rsqrt(tl.sum(acc, axis=1) / N + eps)
        for start in range(0, N, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            cmask = cols < N
            m = rmask[:, None] & cmask[None, :]
            y = tl.load(x_row + cols[None, :], mask=m, other=0.0).to(tl.float32) * r[:, None]
            if HAS_W:
                y = y * tl.load(w_ptr + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
            tl.store(o_row + cols[None, :], y.to(o_ptr.dtype.element_ty), mask=m)
    tl.store(r_ptr + rows, r, mask=rmask)


@triton.jit
def _rms_bwd_kernel(dy_ptr, sdy, x_ptr, sx, w_ptr, r_ptr, dx_ptr, part_ptr, M, N, rows_per_prog,
                    HAS_W: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr,
                    SINGLE: tl.constexpr):
    """Program g handles rows [g * rows_per_prog, (g + 1) * rows_per_prog) in order and writes
    its dweight partial sums to row g of part (float32, (programs, N))."""
    g = tl.program_id(0).to(tl.int64)
    first = g * rows_per_prog
    if SINGLE:
        cols = tl.arange(0, BLOCK)
        cmask = cols < N
        if HAS_W:
            w = tl.load(w_ptr + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
        dw = tl.zeros((ROWS, BLOCK), dtype=tl.float32)
        for i in range(0, rows_per_prog, ROWS):
            rows = first + i + tl.arange(0, ROWS)
            rmask = rows < M
            m = rmask[:, None] & cmask[None, :]
            dy = tl.load(dy_ptr + rows[:, None] * sdy + cols[None, :], mask=m, other=0.0).to(tl.float32)
            x = tl.load(x_ptr + rows[:, None] * sx + cols[None, :], mask=m, other=0.0).to(tl.float32)
            r = tl.load(r_ptr + rows, mask=rmask, other=0.0)[:, None]
            if HAS_W:
                dyw = dy * w
            else:
                dyw = dy
            c = r * r * tl.sum(dyw * x, axis=1)[:, None] / N
            dx = r * (dyw - x * c)
            tl.store(dx_ptr + rows[:, None] * N + cols[None, :], dx.to(dx_ptr.dtype.element_ty), mask=m)
            if HAS_W:
                dw += dy * x * r
        if HAS_W:
            tl.store(part_ptr + g * N + cols, tl.sum(dw, axis=0), mask=cmask)
    else:  # ROWS == 1; part is zero-initialised, and row g of it belongs to this program alone
        for i in range(0, tl.minimum(rows_per_prog, M - first)):
            row = first + i
            dy_row = dy_ptr + row * sdy
            x_row = x_ptr + row * sx
            r = tl.load(r_ptr + row)
            acc = tl.zeros((BLOCK,), dtype=tl.float32)
            for start in range(0, N, BLOCK):
                cols = start + tl.arange(0, BLOCK)
                cmask = cols < N
                dyw = tl.load(dy_row + cols, mask=cmask, other=0.0).to(tl.float32)
                if HAS_W:
                    dyw = dyw * tl.load(w_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
                acc += dyw * tl.load(x_row + cols, mask=cmask, other=0.0).to(tl.float32)
            c = r * r * tl.sum(acc, axis=0) / N
            for start in range(0, N, BLOCK):
                cols = start + tl.arange(0, BLOCK)
                cmask = cols < N
                dy = tl.load(dy_row + cols, mask=cmask, other=0.0).to(tl.float32)
                x = tl.load(x_row + cols, mask=cmask, other=0.0).to(tl.float32)
                if HAS_W:
                    w = tl.load(w_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
                    dx = r * (dy * w - x * c)
                    p = part_ptr + g * N + cols
                    tl.store(p, tl.load(p, mask=cmask, other=0.0) + dy * x * r, mask=cmask)
                else:
                    dx = r * (dy - x * c)
                tl.store(dx_ptr + row * N + cols, dx.to(dx_ptr.dtype.element_ty), mask=cmask)


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


def _settings(M: int, N: int):
    """(SINGLE, ROWS, BLOCK, num_warps)."""
    if N <= SINGLE_MAX:
        rows, block, warps = tile_settings(M, N, max_cols=SINGLE_MAX)
        return True, rows, block, warps
    block, warps = calculate_settings(CHUNK)
    return False, 1, block, warps


def rms_norm_fwd(x: torch.Tensor, weight, eps: float):
    N = x.shape[-1]
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    rstd = torch.empty(x.shape[:-1], dtype=torch.float32, device=x.device)
    if x.numel() == 0:
        return out, rstd.fill_(float("nan"))  # the mean of no elements (nothing when no rows)
    x2 = as_rows(x)
    M = x2.shape[0]
    weight = None if weight is None else weight.contiguous()
    single, rows, block, warps = _settings(M, N)
    _rms_fwd_kernel[(triton.cdiv(M, rows),)](
        x2, x2.stride(0), weight if weight is not None else x2, out, rstd, M, N, float(eps),
        HAS_W=weight is not None, ROWS=rows, BLOCK=block, SINGLE=single, num_warps=warps)
    return out, rstd


def _programs(device: torch.device, tiles: int) -> int:
    """Programs of the backward: a few waves of the device's SMs (fixed per device, so the
    dweight reduction order, and with it the result, is reproducible)."""
    if device.type == "cuda" and not triton_interpreted():
        target = 4 * torch.cuda.get_device_properties(device).multi_processor_count
    else:
        target = 8
    return max(1, min(tiles, target))


def rms_norm_bwd(grad: torch.Tensor, x: torch.Tensor, weight, rstd: torch.Tensor):
    N = x.shape[-1]
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    has_w = weight is not None
    if x.numel() == 0:
        return dx, (torch.zeros_like(weight) if has_w else x.new_empty(0))
    x2, dy2 = as_rows(x), as_rows(grad)
    M = x2.shape[0]
    r = rstd.reshape(-1).contiguous()
    w = weight.contiguous() if has_w else None
    single, rows, block, warps = _settings(M, N)
    progs = _programs(x.device, triton.cdiv(M, rows))
    rows_per_prog = triton.cdiv(triton.cdiv(M, progs), rows) * rows
    progs = triton.cdiv(M, rows_per_prog)
    alloc = torch.empty if single else torch.zeros
    part = alloc((progs, N) if has_w else (1,), dtype=torch.float32, device=x.device)
    _rms_bwd_kernel[(progs,)](
        dy2, dy2.stride(0), x2, x2.stride(0), w if has_w else x2, r, dx, part, M, N,
        rows_per_prog, HAS_W=has_w, ROWS=rows, BLOCK=block, SINGLE=single, num_warps=warps)
    if not has_w:
        return dx, x.new_empty(0)
    dw = torch.empty(weight.shape, dtype=weight.dtype, device=weight.device)
    block_g, block_n, red_warps = tile_settings(progs, N, max_cols=256)
    _sum_rows_kernel[(triton.cdiv(N, block_n),)](part, progs, N, dw, BLOCK_G=block_g,
                                                  BLOCK_N=block_n, num_warps=red_warps)
    return dx, dw
