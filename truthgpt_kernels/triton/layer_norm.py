"""LayerNorm in Triton (kernel ops layer_norm_fwd / layer_norm_bwd of csrc/registration.cpp).

y = (x - mean) * rstd * weight + bias, mean and rstd = rsqrt(var + eps) in float32 (saved for the
backward; biased variance from the deviations, corrected two-pass when the row is processed in
chunks); weight and bias are None, or of x's dtype, or float32. Backward with xhat = (x - mean)
rstd and g = dy w: dx = rstd (g - mean(g) - xhat mean(g xhat)), dweight = sum over rows of
dy xhat, dbias = sum over rows of dy, reduced deterministically. Row tiling and the reduction
as in triton/norm_common.py.
"""
import torch
import triton
import triton.language as tl

from .norm_common import _load_tile, _row_tile, _settings, bwd_programs, partials, reduce_partials
from .utils import as_rows


@triton.jit
def _ln_fwd_kernel(x_ptr, sx, w_ptr, b_ptr, o_ptr, m_ptr, r_ptr, M, N, eps, HAS_W: tl.constexpr,
                   HAS_B: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr,
                   SINGLE: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    rmask = rows < M
    x_row = x_ptr + rows[:, None] * sx
    o_row = o_ptr + rows[:, None] * N
    if SINGLE:
        cols = tl.arange(0, BLOCK)
        cmask = cols < N
        m = rmask[:, None] & cmask[None, :]
        x = tl.load(x_row + cols[None, :], mask=m, other=0.0).to(tl.float32)
        mean = tl.sum(x, axis=1) / N
        d = tl.where(m, x - mean[:, None], 0.0)
        r = tl.rsqrt(tl.sum(d * d, axis=1) / N + eps)
        y = d * r[:, None]
        if HAS_W:
            y = y * tl.load(w_ptr + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
        if HAS_B:
            y = y + tl.load(b_ptr + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
        tl.store(o_row + cols[None, :], y.to(o_ptr.dtype.element_ty), mask=m)
    else:
        acc = tl.zeros((ROWS, BLOCK), dtype=tl.float32)
        for start in range(0, N, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            m = rmask[:, None] & (cols < N)[None, :]
            acc += tl.load(x_row + cols[None, :], mask=m, other=0.0).to(tl.float32)
        mean0 = tl.sum(acc, axis=1) / N
        dsum = tl.zeros((ROWS, BLOCK), dtype=tl.float32)
        qsum = tl.zeros((ROWS, BLOCK), dtype=tl.float32)
        for start in range(0, N, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            m = rmask[:, None] & (cols < N)[None, :]
            x = tl.load(x_row + cols[None, :], mask=m, other=0.0).to(tl.float32)
            d = tl.where(m, x - mean0[:, None], 0.0)
            dsum += d
            qsum += d * d
        dm = tl.sum(dsum, axis=1) / N
        mean = mean0 + dm
        r = tl.rsqrt(tl.maximum(tl.sum(qsum, axis=1) / N - dm * dm, 0.0) + eps)
        for start in range(0, N, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            cmask = cols < N
            m = rmask[:, None] & cmask[None, :]
            x = tl.load(x_row + cols[None, :], mask=m, other=0.0).to(tl.float32)
            y = (x - mean[:, None]) * r[:, None]
            if HAS_W:
                y = y * tl.load(w_ptr + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
            if HAS_B:
                y = y + tl.load(b_ptr + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
            tl.store(o_row + cols[None, :], y.to(o_ptr.dtype.element_ty), mask=m)
    tl.store(m_ptr + rows, mean, mask=rmask)
    tl.store(r_ptr + rows, r, mask=rmask)


@triton.jit
def _ln_bwd_kernel(dy_ptr, sdy, x_ptr, sx, w_ptr, m_ptr, r_ptr, dx_ptr, pw_ptr, pb_ptr, M, N,
                   rows_per_prog, HAS_W: tl.constexpr, HAS_B: tl.constexpr, ROWS: tl.constexpr,
                   BLOCK: tl.constexpr, SINGLE: tl.constexpr):
    """Program g handles rows [g * rows_per_prog, (g + 1) * rows_per_prog) in order and writes
    its dweight / dbias partial sums to row g of pw / pb (float32, (programs, N))."""
    g = tl.program_id(0).to(tl.int64)
    first = g * rows_per_prog
    if SINGLE:
        cols = tl.arange(0, BLOCK)
        cmask = cols < N
        if HAS_W:
            w = tl.load(w_ptr + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
        dw = tl.zeros((ROWS, BLOCK), dtype=tl.float32)
        db = tl.zeros((ROWS, BLOCK), dtype=tl.float32)
        for i in range(0, rows_per_prog, ROWS):
            rows, rmask, m = _row_tile(first + i, ROWS, M, cmask)
            dy = _load_tile(dy_ptr, rows, sdy, cols, m)
            x = _load_tile(x_ptr, rows, sx, cols, m)
            mean = tl.load(m_ptr + rows, mask=rmask, other=0.0)[:, None]
            r = tl.load(r_ptr + rows, mask=rmask, other=0.0)[:, None]
            xhat = tl.where(m, (x - mean) * r, 0.0)
            if HAS_W:
                gy = dy * w
            else:
                gy = dy
            c1 = tl.sum(gy, axis=1)[:, None] / N
            c2 = tl.sum(gy * xhat, axis=1)[:, None] / N
            dx = r * (gy - c1 - xhat * c2)
            tl.store(dx_ptr + rows[:, None] * N + cols[None, :], dx.to(dx_ptr.dtype.element_ty), mask=m)
            if HAS_W:
                dw += dy * xhat
            if HAS_B:
                db += dy
        if HAS_W:
            tl.store(pw_ptr + g * N + cols, tl.sum(dw, axis=0), mask=cmask)
        if HAS_B:
            tl.store(pb_ptr + g * N + cols, tl.sum(db, axis=0), mask=cmask)
    else:  # ROWS == 1; pw / pb are zero-initialised, and their row g belongs to this program alone
        for i in range(0, tl.minimum(rows_per_prog, M - first)):
            row = first + i
            dy_row = dy_ptr + row * sdy
            x_row = x_ptr + row * sx
            mean = tl.load(m_ptr + row)
            r = tl.load(r_ptr + row)
            a1 = tl.zeros((BLOCK,), dtype=tl.float32)
            a2 = tl.zeros((BLOCK,), dtype=tl.float32)
            for start in range(0, N, BLOCK):
                cols = start + tl.arange(0, BLOCK)
                cmask = cols < N
                gy = tl.load(dy_row + cols, mask=cmask, other=0.0).to(tl.float32)
                if HAS_W:
                    gy = gy * tl.load(w_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
                x = tl.load(x_row + cols, mask=cmask, other=0.0).to(tl.float32)
                a1 += gy
                a2 += gy * tl.where(cmask, (x - mean) * r, 0.0)
            c1 = tl.sum(a1, axis=0) / N
            c2 = tl.sum(a2, axis=0) / N
            for start in range(0, N, BLOCK):
                cols = start + tl.arange(0, BLOCK)
                cmask = cols < N
                dy = tl.load(dy_row + cols, mask=cmask, other=0.0).to(tl.float32)
                xhat = (tl.load(x_row + cols, mask=cmask, other=0.0).to(tl.float32) - mean) * r
                if HAS_W:
                    gy = dy * tl.load(w_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
                    p = pw_ptr + g * N + cols
                    tl.store(p, tl.load(p, mask=cmask, other=0.0) + dy * xhat, mask=cmask)
                else:
                    gy = dy
                if HAS_B:
                    p = pb_ptr + g * N + cols
                    tl.store(p, tl.load(p, mask=cmask, other=0.0) + dy, mask=cmask)
                dx = r * (gy - c1 - xhat * c2)
                tl.store(dx_ptr + row * N + cols, dx.to(dx_ptr.dtype.element_ty), mask=cmask)


def _affine(x, weight, bias):
    """weight and bias as the kernels take them: contiguous, and a weight of ones for a bias
    without one (so that one kernel variant serves both)."""
    if weight is None and bias is not None:
        weight = torch.ones(x.shape[-1], dtype=bias.dtype, device=x.device)
    return (weight.contiguous() if weight is not None else None,
            bias.contiguous() if bias is not None else None)


def layer_norm_fwd(x: torch.Tensor, weight, bias, eps: float):
    N = x.shape[-1]
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    mean = torch.empty(x.shape[:-1], dtype=torch.float32, device=x.device)
    rstd = torch.empty(x.shape[:-1], dtype=torch.float32, device=x.device)
    if x.numel() == 0:  # statistics of no elements (nothing when no rows)
        return out, mean.fill_(float("nan")), rstd.fill_(float("nan"))
    x2 = as_rows(x)
    M = x2.shape[0]
    w, b = _affine(x, weight, bias)
    single, rows, block, warps = _settings(M, N)
    _ln_fwd_kernel[(triton.cdiv(M, rows),)](
        x2, x2.stride(0), w if w is not None else x2, b if b is not None else x2, out, mean, rstd,
        M, N, float(eps), HAS_W=w is not None, HAS_B=b is not None, ROWS=rows, BLOCK=block,
        SINGLE=single, num_warps=warps)
    return out, mean, rstd


def layer_norm_bwd(grad: torch.Tensor, x: torch.Tensor, weight, bias, mean: torch.Tensor,
                   rstd: torch.Tensor):
    N = x.shape[-1]
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if x.numel() == 0:
        return (dx, torch.zeros_like(weight) if weight is not None else x.new_empty(0),
                torch.zeros_like(bias) if bias is not None else x.new_empty(0))
    x2, dy2 = as_rows(x), as_rows(grad)
    M = x2.shape[0]
    w, b = _affine(x, weight, bias)
    has_w, has_b = w is not None, b is not None
    single, rows, block, warps = _settings(M, N)
    progs, rows_per_prog = bwd_programs(x.device, M, rows)
    part = partials((2 if has_b else 1, progs, N) if has_w else (1, 1), single, x.device)
    _ln_bwd_kernel[(progs,)](
        dy2, dy2.stride(0), x2, x2.stride(0), w if has_w else x2, mean.reshape(-1).contiguous(),
        rstd.reshape(-1).contiguous(), dx, part[0], part[-1], M, N, rows_per_prog, HAS_W=has_w,
        HAS_B=has_b, ROWS=rows, BLOCK=block, SINGLE=single, num_warps=warps)
    dw = reduce_partials(part[0], progs, N, weight) if weight is not None else x.new_empty(0)
    db = reduce_partials(part[1], progs, N, bias) if has_b else x.new_empty(0)
    return dx, dw, db
