"""Fused linear cross-entropy in Triton (truthgpt::linear_cross_entropy_fwd): the chunk loop of
csrc/common/linear_cross_entropy_driver.h with torch GEMMs (cuBLAS), and a Triton row kernel
for the loss and d loss / d logits, written in place over the chunk's logits (as Liger).

The logits have x's dtype (the GEMM accumulates in float32); the row kernel computes in
float32. dW accumulates over chunks in float32, chunks in order (deterministic).
"""
import torch
import triton
import triton.language as tl

from ..validation import check_class_targets

CHUNK_BYTES = 64 << 20  # the chunk's logits take about this much when chunk_size is 0
MAX_BLOCK = 4096


@triton.jit
def _softcapped(z_ptr, b_ptr, cols, mask, cap, HAS_BIAS: tl.constexpr, CAPPED: tl.constexpr):
    z = tl.load(z_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        z += tl.load(b_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    if CAPPED:
        z = cap * (2.0 * tl.sigmoid(2.0 * z / cap) - 1.0)  # cap * tanh(z / cap)
    return z


@triton.jit
def _lce_rows_kernel(L_ptr, ld, G_ptr, ldg, b_ptr, t_ptr, s_ptr, loss_ptr, zr_ptr, V, ignore_index, eps, z_loss,
                     cap, HAS_BIAS: tl.constexpr, CAPPED: tl.constexpr, GRAD: tl.constexpr,
                     BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    z_ptr = L_ptr + row * ld
    g_ptr = G_ptr + row * ldg  # the gradient's row (the logits' own in LCE: in place)
    t = tl.load(t_ptr + row)
    offs = tl.arange(0, BLOCK)
    if t == ignore_index:
        tl.store(loss_ptr + row, 0.0)
        tl.store(zr_ptr + row, 0.0)
        if GRAD:
            for v0 in range(0, V, BLOCK):
                cols = v0 + offs
                tl.store(g_ptr + cols, tl.zeros([BLOCK], tl.float32).to(G_ptr.dtype.element_ty),
                         mask=cols < V)
    else:
        # online max and sum of exp, and the sum of the logits (label smoothing)
        m = float("-inf")
        se = 0.0
        sz = 0.0
        for v0 in range(0, V, BLOCK):
            cols = v0 + offs
            mask = cols < V
            z = _softcapped(z_ptr, b_ptr, cols, mask, cap, HAS_BIAS, CAPPED)
            m_new = tl.maximum(m, tl.max(tl.where(mask, z, float("-inf")), 0))
            se = se * tl.exp(m - m_new) + tl.sum(tl.where(mask, tl.exp(z - m_new), 0.0), 0)
            sz += tl.sum(z, 0)
            m = m_new
        lse = m + tl.log(se)
        zt = _softcapped(z_ptr, b_ptr, t, True, cap, HAS_BIAS, CAPPED)
        zterm = z_loss * lse * lse
        tl.store(zr_ptr + row, zterm)
        # (the smoothing term only with smoothing: a -inf logit makes sz -inf, 0 * -inf is NaN)
        smooth = tl.where(eps != 0.0, eps / V * sz, 0.0)
        tl.store(loss_ptr + row, lse - (1.0 - eps) * zt - smooth + zterm)
        if GRAD:
            s = tl.load(s_ptr + row).to(tl.float32)
            coef = s * (1.0 + 2.0 * z_loss * lse)
            off = s * eps / V
            for v0 in range(0, V, BLOCK):
                cols = v0 + offs
                mask = cols < V
                z = _softcapped(z_ptr, b_ptr, cols, mask, cap, HAS_BIAS, CAPPED)
                g = tl.exp(z - lse) * coef - off - tl.where(cols == t, s * (1.0 - eps), 0.0)
                if CAPPED:
                    u = z / cap
                    g = g * (1.0 - u * u)
                tl.store(g_ptr + cols, g.to(G_ptr.dtype.element_ty), mask=mask)


def _rows(L, bias, target, grad_scale, loss, zrows, ignore_index, eps, z_loss, softcap, out=None):
    """Per row of L (nc, V): loss, z-loss term and, with grad_scale, the scaled gradient written
    into `out` (nc, V) (default: over L, in place). Unit inner strides."""
    nc, V = L.shape
    block = min(triton.next_power_of_2(V), MAX_BLOCK)
    out = L if out is None else out
    _lce_rows_kernel[(nc,)](
        L, L.stride(0), out, out.stride(0), bias if bias is not None else L, target, grad_scale if grad_scale is not None else L,
        loss, zrows, V, ignore_index, eps, z_loss, softcap, HAS_BIAS=bias is not None,
        CAPPED=softcap > 0, GRAD=grad_scale is not None, BLOCK=block, num_warps=8)


def linear_cross_entropy_fwd(x, weight, bias, target, grad_scale, ignore_index, label_smoothing,
                             z_loss, softcap, need_dweight, chunk_size):
    N, d = x.shape
    V = weight.shape[0]
    check_class_targets(target, V, ignore_index)
    acc = torch.float32
    x = x if x.stride(1) == 1 else x.contiguous()
    w = weight if weight.stride(1) == 1 else weight.contiguous()
    target = target.contiguous()
    loss = torch.empty(N, dtype=acc, device=x.device)
    zrows = torch.empty(N, dtype=acc, device=x.device)
    grad = grad_scale is not None
    dwb = grad and need_dweight
    dx = torch.empty_like(x) if grad else x.new_empty(0)
    dw_acc = torch.zeros(V, d, dtype=acc, device=x.device) if dwb else x.new_empty(0)
    db_acc = torch.zeros(V, dtype=acc, device=x.device) if dwb and bias is not None else x.new_empty(0)
    if grad:
        grad_scale = grad_scale.to(acc).contiguous()
    nc_max = max(1, min(chunk_size if chunk_size > 0 else CHUNK_BYTES // (V * 4), max(N, 1)))
    buf = torch.empty(min(nc_max, N), V, dtype=x.dtype, device=x.device)
    for r0 in range(0, N, nc_max):
        nc = min(nc_max, N - r0)
        L, xc = buf[:nc], x[r0:r0 + nc]
        torch.mm(xc, w.t(), out=L)
        _rows(L, bias, target[r0:], grad_scale[r0:] if grad else None, loss[r0:], zrows[r0:],
              ignore_index, float(label_smoothing), float(z_loss), float(softcap))
        if not grad:
            continue
        torch.mm(L, w, out=dx[r0:r0 + nc])
        if dwb:
            if L.dtype == acc:
                dw_acc.addmm_(L.t(), xc)
            else:  # GEMM in the inputs' dtype (float32 inside), the sum over chunks in float32
                dw_acc.add_(torch.mm(L.t(), xc))
            if bias is not None:
                db_acc.add_(L.sum(0, dtype=acc))
    dw = dw_acc.to(weight.dtype) if dwb else dw_acc
    db = db_acc.to(bias.dtype) if db_acc.numel() else db_acc
    return loss, zrows, dx, dw, db
