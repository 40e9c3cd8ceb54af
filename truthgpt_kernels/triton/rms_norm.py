"""RMSNorm in Triton (kernel ops rms_norm_fwd / rms_norm_bwd of csrc/registration.cpp).

y = x * rstd * weight, rstd = rsqrt(mean(x^2) + eps) in float32 (saved for the backward);
weight is None, or of x's dtype, or float32. Backward: dx = rstd * (dy w - x rstd^2 mean(dy w x)),
dweight = sum over rows of dy x rstd, reduced deterministically. Row tiling and the reduction
as in triton/norm_common.py; long rows take two passes.
"""
import torch
import triton
import triton.language as tl

from .norm_common import CHUNK, SINGLE_MAX  # noqa: F401  (defined here before norm_common.py)
from .norm_common import _load_tile, _row_tile, _settings, bwd_programs, partials, reduce_partials
from .utils import as_rows


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
            rows, rmask, m = _row_tile(first + i, ROWS, M, cmask)
            dy = _load_tile(dy_ptr, rows, sdy, cols, m)
            x = _load_tile(x_ptr, rows, sx, cols, m)
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
    progs, rows_per_prog = bwd_programs(x.device, M, rows)
    part = partials((progs, N) if has_w else (1,), single, x.device)
    _rms_bwd_kernel[(progs,)](
        dy2, dy2.stride(0), x2, x2.stride(0), w if has_w else x2, r, dx, part, M, N,
        rows_per_prog, HAS_W=has_w, ROWS=rows, BLOCK=block, SINGLE=single, num_warps=warps)
    if not has_w:
        return dx, x.new_empty(0)
    return dx, reduce_partials(part, progs, N, weight)
