"""tk.linear_cross_entropy: the LM head and its cross-entropy loss, fused and chunked over rows
so that no (N, V) logits tensor exists, in the forward or the backward (Liger-Kernel's
fused linear cross-entropy).

How: for each chunk of rows, the kernels compute the chunk's logits (a GEMM, float32
accumulation), then per row the loss and d loss / d logits (in place), then the chunk's
gradient dx_c = dlogits W and dW += dlogits^T x_c (float32 accumulation, chunks in a fixed
order: deterministic). So the forward computes the gradients for reduction "mean"/"sum" and
the backward only scales them by grad_output. Reduction "none" needs one weight per row,
unknown in the forward: its forward computes the losses only, and its backward reruns the
chunked pass with the per-row grad_output (truthgpt::linear_cross_entropy_backward).

The returned z-loss term (return_z_loss=True) is for logging, as in Liger: it is already part
of the loss and no gradient flows through it.

Mixed precision: bfloat16/float16 x with a float32 weight (the master copy, as under autocast)
runs the GEMMs in x's dtype (the weight, and the bias, rounded to it once, inside, as F.linear
under autocast rounds them) and returns the loss and
dweight in float32, dweight accumulated in float32 over the chunks (autocast would round it to
x's dtype first). Under autocast, float32 x and weight take this path with x converted to the
autocast dtype: the same GEMM dtype as F.linear under autocast.
"""
import contextlib
from typing import List, Optional, Tuple

import torch
from torch import Tensor

from .. import backends
from ..validation import autocast_dtype, check_float, check_int, check_same_dtype, check_tensor
from .reference import LCE_REDUCTIONS

FAMILY = "linear_cross_entropy"
_NONE, _MEAN, _SUM = (LCE_REDUCTIONS.index(r) for r in ("none", "mean", "sum"))


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _empty(x: Tensor) -> Tensor:
    return x.new_empty(0)


_LOW = (torch.bfloat16, torch.float16)
# the backends that take a float32 weight with low-precision x themselves (the CPU kernel:
# W converted once, dW accumulated in float32 into its result); the others get the weight in
# x's dtype and their dW converted back
_MIXED_NATIVE = ("cpu",)


def _call_kernel(backend, x, weight, bias, *args):
    """The backend's fwd kernel on (x, weight, bias, *args): (loss, z, dx, dw, db)."""
    mixed = weight.dtype != x.dtype and backend not in _MIXED_NATIVE
    if mixed:
        wdt = weight.dtype
        weight = weight.to(x.dtype)
        bias = bias.to(x.dtype) if bias is not None else None
    fn = backends.kernel(FAMILY, backend, "fwd")
    if autocast_dtype(x.device.type) is not None:  # the dtypes are decided: no casts inside
        with torch.autocast(x.device.type, enabled=False):
            loss, z, dx, dw, db = fn(x, weight, bias, *args)
    else:
        loss, z, dx, dw, db = fn(x, weight, bias, *args)
    if mixed:
        dw, db = dw.to(wdt), db.to(wdt)
    return loss, z, dx, dw, db


def _loss_dtype(x, weight, fp32_loss):
    """x's dtype; float32 for a float32 (master) weight or with fp32_loss; float64 stays."""
    out = torch.promote_types(x.dtype, weight.dtype)
    return torch.promote_types(out, torch.float32) if fp32_loss else out


def _forward_impl(x, weight, bias, target, ignore_index, reduction, label_smoothing, z_loss,
                  softcap, need_grad, need_dweight, chunk_size, backend, fp32_loss):
    """(loss, z_loss, dx, dweight, dbias): the reduced loss and z-loss term in _loss_dtype, and
    for reduction mean/sum with need_grad the gradients of the loss (else empty tensors)."""
    N = x.shape[0]
    acc = _acc(x.dtype)
    valid = target != ignore_index
    count = valid.sum().to(acc)
    grad_scale = None
    if need_grad and reduction != _NONE:
        one = torch.ones((), dtype=acc, device=x.device)
        grad_scale = (one / count if reduction == _MEAN else one).expand(N).contiguous()
    loss, z, dx, dw, db = _call_kernel(
        backend, x, weight, bias, target, grad_scale, ignore_index, label_smoothing, z_loss,
        softcap, need_dweight, chunk_size)
    if reduction == _SUM:
        loss, z = loss.sum(), z.sum()
    elif reduction == _MEAN:
        loss, z = loss.sum() / count, z.sum() / count
    out = _loss_dtype(x, weight, fp32_loss)
    return loss.to(out), z.to(out), dx, dw, db


@torch.library.custom_op("truthgpt::linear_cross_entropy", mutates_args=())
def linear_cross_entropy_op(x: Tensor, weight: Tensor, bias: Optional[Tensor], target: Tensor,
                            ignore_index: int, reduction: int, label_smoothing: float,
                            z_loss: float, softcap: float, need_grad: bool, need_dweight: bool,
                            chunk_size: int, backend: str,
                            fp32_loss: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    return _forward_impl(x, weight, bias, target, ignore_index, reduction, label_smoothing,
                         z_loss, softcap, need_grad, need_dweight, chunk_size, backend, fp32_loss)


@linear_cross_entropy_op.register_fake
def _(x, weight, bias, target, ignore_index, reduction, label_smoothing, z_loss, softcap,
      need_grad, need_dweight, chunk_size, backend, fp32_loss):
    shape = (x.shape[0],) if reduction == _NONE else ()
    grads = need_grad and reduction != _NONE
    dx = x.new_empty(x.shape) if grads else _empty(x)
    dw = weight.new_empty(weight.shape) if grads and need_dweight else _empty(x)
    db = bias.new_empty(bias.shape) if grads and need_dweight and bias is not None else _empty(x)
    out = _loss_dtype(x, weight, fp32_loss)
    return x.new_empty(shape, dtype=out), x.new_empty(shape, dtype=out), dx, dw, db


@torch.library.custom_op("truthgpt::linear_cross_entropy_backward", mutates_args=())
def linear_cross_entropy_backward_op(grad: Tensor, x: Tensor, weight: Tensor,
                                     bias: Optional[Tensor], target: Tensor, ignore_index: int,
                                     label_smoothing: float, z_loss: float, softcap: float,
                                     need_dweight: bool, chunk_size: int,
                                     backend: str) -> Tuple[Tensor, Tensor, Tensor]:
    """Gradients of sum_i grad_i * loss_i (reduction "none"): reruns the chunked pass."""
    _, _, dx, dw, db = _call_kernel(
        backend, x, weight, bias, target, grad.to(_acc(x.dtype)).contiguous(), ignore_index,
        label_smoothing, z_loss, softcap, need_dweight, chunk_size)
    return dx, dw, db


@linear_cross_entropy_backward_op.register_fake
def _(grad, x, weight, bias, target, ignore_index, label_smoothing, z_loss, softcap,
      need_dweight, chunk_size, backend):
    dw = weight.new_empty(weight.shape) if need_dweight else _empty(x)
    db = bias.new_empty(bias.shape) if need_dweight and bias is not None else _empty(x)
    return x.new_empty(x.shape), dw, db


def _setup(ctx, inputs, output):
    (x, weight, bias, target, ignore_index, reduction, label_smoothing, z_loss, softcap,
     need_grad, need_dweight, chunk_size, backend, fp32_loss) = inputs
    _, z, dx, dw, db = output
    ctx.mark_non_differentiable(z, dx, dw, db)
    ctx.set_materialize_grads(False)  # no zero-filled (V, d) gradient for dw in the backward
    ctx.reduction = reduction
    ctx.has_bias = bias is not None
    ctx.options = (ignore_index, label_smoothing, z_loss, softcap, need_dweight, chunk_size, backend)
    if reduction == _NONE:
        ctx.save_for_backward(*backends.saveable(x, weight, bias, target))
    else:
        ctx.save_for_backward(*backends.saveable(dx, dw, db))


def _scaled(saved: Tensor, grad: Tensor) -> Tensor:
    """saved * grad (a 0-dim tensor). In eager CPU code, grad == 1 (the usual loss.backward())
    returns saved itself: no pass over dweight and no second copy of it in memory."""
    if saved.numel() == 0 and saved.dim() == 1:  # the (0,) "not computed" placeholder
        return None  # (a real dx of an empty batch is (0, d): returned, as PyTorch does)
    eager = type(grad) is Tensor and not torch.compiler.is_compiling()  # not traced
    if eager and grad.device.type == "cpu" and bool(grad == 1):
        return saved
    return saved * grad.to(saved.dtype)


def _backward(ctx, grad, grad_z, grad_dx, grad_dw, grad_db):
    if grad is None:  # the loss itself took no part in what is differentiated
        return (None,) * 14
    ignore_index, label_smoothing, z_loss, softcap, need_dweight, chunk_size, backend = ctx.options
    if ctx.reduction == _NONE:
        x, weight, bias, target = ctx.saved_tensors
        dx, dw, db = backends.apply(linear_cross_entropy_backward_op, 
            grad, x, weight, bias, target, ignore_index, label_smoothing, z_loss, softcap,
            need_dweight, chunk_size, backend)
        dw = dw if dw.numel() else None
        db = db if db.numel() else None
    else:
        sdx, sdw, sdb = ctx.saved_tensors
        dx, dw, db = _scaled(sdx, grad), _scaled(sdw, grad), _scaled(sdb, grad)
    return (dx, dw, db if ctx.has_bias else None) + (None,) * 11


backends.register_autograd(linear_cross_entropy_op, _backward, _setup)


def _check(x, weight, target, bias, ignore_index, reduction, label_smoothing, z_loss,
           logit_softcap, chunk_size, loss_dtype):
    check_tensor("x", x, ndim=2)
    check_tensor("weight", weight, ndim=2, device=x.device)
    if not (weight.dtype == torch.float32 and x.dtype in _LOW):  # else a float32 master weight
        check_same_dtype("x", x, weight=weight)
    check_same_dtype("weight", weight, bias=bias)
    check_tensor("target", target, ndim=1, dtypes=(torch.int64,), device=x.device)
    N, d = x.shape
    if d < 1:
        raise ValueError(f"x must have at least one feature (shape (N, d) with d >= 1), got {tuple(x.shape)}")
    if weight.shape[1] != d:
        raise ValueError(f"weight must have shape (V, {d}) to match x {tuple(x.shape)}, got {tuple(weight.shape)}")
    V = weight.shape[0]
    if V < 1:
        raise ValueError(f"weight must have at least one row (class), got shape {tuple(weight.shape)}")
    if target.shape[0] != N:
        raise ValueError(f"target must have shape ({N},) (one class per row of x), got {tuple(target.shape)}")
    if bias is not None:
        check_tensor("bias", bias, shape=(V,), device=x.device)
    check_loss_options(ignore_index, reduction, label_smoothing, z_loss, logit_softcap, loss_dtype, "x")
    if chunk_size is not None:
        check_int("chunk_size", chunk_size, minimum=1)


def check_loss_options(ignore_index, reduction, label_smoothing, z_loss, logit_softcap, loss_dtype, input_name):
    """The options linear_cross_entropy and cross_entropy share (input_name: the tensor whose
    dtype the loss takes by default)."""
    check_int("ignore_index", ignore_index)
    if reduction not in LCE_REDUCTIONS:
        raise ValueError(f"reduction must be one of {', '.join(LCE_REDUCTIONS)}; got {reduction!r}")
    ls = check_float("label_smoothing", label_smoothing, minimum=0.0)
    if ls > 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {ls}")
    check_float("z_loss", z_loss, minimum=0.0)
    check_float("logit_softcap", logit_softcap, minimum=0.0)
    if loss_dtype not in (None, torch.float32):
        raise TypeError(f"loss_dtype must be None (the loss in {input_name}'s dtype) or torch.float32, "
                        f"got {loss_dtype!r}")


def _as_kernel_reads(t: Tensor, dtype: torch.dtype, acc: torch.dtype) -> Tensor:
    """t (the weight or bias, or rows of it) in acc with the values the kernels use: rounded to
    x's dtype first where it is a float32 master copy; the gradient passes unrounded (in float32,
    as the kernels' dweight)."""
    r = t.to(dtype).to(acc)
    if t.dtype == dtype:
        return r
    t = t.to(acc)
    return t + (r - t).detach()


def _weighted_classes(weight: Tensor, cw: Tensor, dtype: torch.dtype, acc: torch.dtype) -> Tensor:
    """weight^T cw, (d,) in acc, with weight as the kernels read it; a weight of another dtype is
    converted in blocks of rows (about 64 MiB in float32), never whole."""
    V, d = weight.shape
    if weight.dtype == dtype == acc:
        return cw @ weight
    rows = max(1, (1 << 24) // d)
    out = None
    for s in range(0, V, rows):
        part = cw[s:s + rows] @ _as_kernel_reads(weight[s:s + rows], dtype, acc)
        out = part if out is None else out + part
    return out


def _weighted_smoothing(x, weight, target, bias, ce_weight, ignore_index, reduction, eps, z_loss,
                        return_z_loss, chunk_size, loss_dtype, backend):
    """ce_weight with label_smoothing eps > 0, torch's semantics: per counted row i (w = ce_weight,
    z_i the logits, lse_i their logsumexp, V classes)
      loss_i = (1 - eps) w[y_i] (lse_i - z_iy) + (eps / V) sum_c w_c (lse_i - z_ic)
               (+ z_loss w[y_i] lse_i^2, as without smoothing),
    "mean" divided by sum_i w[y_i]. The fused op (reduction "none", no smoothing) gives
    nll_i = lse_i - z_iy; z_iy = x_i . W[y_i] + b[y_i] (a gather-dot) gives lse_i = nll_i + z_iy;
    sum_c w_c z_ic = x_i . (W^T w) + b . w is linear in x, W, b: O(N d + V d) more work, no
    (N, V) logits, no new kernel. Gradients flow through all three (the kernels' softmax - onehot
    plus the gather's onehot is softmax). z_iy and W^T w use W and b as the kernels read them
    (rounded to x's dtype for a float32 master weight), in float32 (float64 for float64), so
    lse_i is the kernels' own up to float32 rounding. Extra memory: two (N, d) float32 tensors
    (x and the gathered W rows, saved for the backward)."""
    dt = autocast_dtype(x.device.type)
    if dt in _LOW and x.dtype == torch.float32 == weight.dtype:
        x = x.to(dt)  # as linear_cross_entropy converts it: the logits' dtype is decided here
    out_dtype = _loss_dtype(x, weight, loss_dtype is not None)
    # the float32 rows for bfloat16/float16 x: not rounded to x's dtype before the sums below
    nll = linear_cross_entropy(x, weight, target, bias=bias, ignore_index=ignore_index,
                               reduction="none", chunk_size=chunk_size, loss_dtype=torch.float32,
                               backend=backend)
    acc = _acc(x.dtype)
    V = weight.shape[0]
    no_autocast = (torch.autocast(x.device.type, enabled=False) if dt is not None
                   else contextlib.nullcontext())
    with no_autocast:  # (the products below in acc, not in the autocast dtype)
        valid = target != ignore_index
        t = torch.where(valid, target, 0)
        cw = ce_weight.to(acc)
        wy = torch.where(valid, cw[t], 0.0)
        xa = x.to(acc)  # (one tensor: x's gradient summed in acc, converted once)
        zy = (xa * _as_kernel_reads(weight[t], x.dtype, acc)).sum(-1)
        wz = xa @ _weighted_classes(weight, cw, x.dtype, acc)  # sum_c w_c z_ic
        if bias is not None:
            b = _as_kernel_reads(bias, x.dtype, acc)
            zy = zy + b[t]
            wz = wz + b @ cw
        lse = nll + zy
        rows = (1 - eps) * wy * nll + (eps / V) * torch.where(valid, cw.sum() * lse - wz, 0.0)
        zrows = wy * torch.where(valid, z_loss * lse * lse, 0.0) if z_loss else None
        if zrows is not None:
            rows = rows + zrows

        def reduce(r):
            r = r if reduction == "none" else r.sum() if reduction == "sum" else r.sum() / wy.sum()
            return r.to(out_dtype)
        loss = reduce(rows)
        if not return_z_loss:
            return loss
        return loss, reduce(torch.zeros_like(wy) if zrows is None else zrows.detach())


def linear_cross_entropy(x: Tensor, weight: Tensor, target: Tensor, *, bias: Optional[Tensor] = None,
                         ignore_index: int = -100, reduction: str = "mean",
                         label_smoothing: float = 0.0, z_loss: float = 0.0,
                         logit_softcap: float = 0.0, return_z_loss: bool = False,
                         chunk_size: Optional[int] = None, loss_dtype: Optional[torch.dtype] = None,
                         ce_weight: Optional[Tensor] = None, backend: Optional[str] = None):
    """F.cross_entropy(F.linear(x, weight, bias), target, ignore_index=, reduction=,
    label_smoothing=) without materialising the (N, V) logits.

    x (N, d); weight (V, d) and bias (V,) of x's dtype, or float32 with bfloat16/float16 x
    (GEMMs in x's dtype, loss and dweight in float32; under autocast float32 x is converted to
    the autocast dtype first, as F.linear would be); target (N,) int64, each a class in
    [0, V) or ignore_index (a row that adds nothing, and is not counted by "mean").
    z_loss > 0 adds z_loss * logsumexp(logits)^2 to each counted row's loss (PaLM; Liger's
    lse_square_scale); logit_softcap > 0 replaces the logits by
    logit_softcap * tanh(logits / logit_softcap) first (Gemma 2). Returns the loss in x's
    dtype (float32 for a float32 weight), a scalar or (N,) for reduction "none", or (loss,
    z_loss_term) with return_z_loss=True (the term reduced like the loss, no gradient: as Liger).
    loss_dtype=torch.float32 returns them in float32 for bfloat16/float16 x too (the rows'
    float32 losses reduced in float32 and never rounded to x's dtype: what Liger returns and
    transformers' ForCausalLMLoss computes from upcast logits; float64 stays float64).
    chunk_size: rows per chunk (default: one chunk's logits take about 64 MiB in float32 on
    GPUs; on the CPU 128 MiB in the dtype they are kept in, for bf16/fp16 at d > 1024
    d / 512 x 64 MiB, at most 256 MiB). Gradients flow to x, weight and bias.
    ce_weight (V,): F.cross_entropy's `weight` (Liger's ce_weight), a float weight per class:
    each row's loss (z-loss term included) is scaled by ce_weight[target], and "mean" divides
    by the sum of those weights over the counted rows, as torch does. It runs the rows' losses
    (reduction "none") and weights them: the backward recomputes the logits. With
    label_smoothing, torch's weighted smoothing term (eps / V) sum_c ce_weight[c] (-log p_c)
    comes from the rows' logsumexp and the linear sum_c ce_weight[c] logit_c (see
    _weighted_smoothing); not with logit_softcap (the logits are then not linear in weight)."""
    _check(x, weight, target, bias, ignore_index, reduction, label_smoothing, z_loss,
           logit_softcap, chunk_size, loss_dtype)
    if ce_weight is not None:
        check_tensor("ce_weight", ce_weight, shape=(weight.shape[0],), device=x.device)
        if label_smoothing:
            if logit_softcap:
                raise ValueError("ce_weight with label_smoothing > 0 and logit_softcap > 0 is not "
                                 "supported (torch's weighted smoothing term of softcapped logits "
                                 "needs every logit); drop one of ce_weight, label_smoothing, "
                                 "logit_softcap")
            return _weighted_smoothing(x, weight, target, bias, ce_weight, ignore_index, reduction,
                                       float(label_smoothing), float(z_loss), return_z_loss,
                                       chunk_size, loss_dtype, backend)
        rows, zrows = linear_cross_entropy(
            x, weight, target, bias=bias, ignore_index=ignore_index, reduction="none", z_loss=z_loss,
            logit_softcap=logit_softcap, return_z_loss=True, chunk_size=chunk_size, loss_dtype=loss_dtype,
            backend=backend)
        acc = torch.float64 if rows.dtype == torch.float64 else torch.float32
        valid = target != ignore_index
        w = torch.where(valid, ce_weight.to(acc)[torch.where(valid, target, 0)], 0.0)

        def reduce(r):
            r = r.to(acc) * w
            r = r if reduction == "none" else r.sum() if reduction == "sum" else r.sum() / w.sum()
            return r.to(rows.dtype)
        loss = reduce(rows)
        return (loss, reduce(zrows)) if return_z_loss else loss
    dt = autocast_dtype(x.device.type)
    if dt is not None and x.dtype == torch.float32 == weight.dtype:
        if dt in _LOW:
            x = x.to(dt)
    name = backends.select(FAMILY, backend, x)
    args = (x, weight, bias, target, ignore_index, LCE_REDUCTIONS.index(reduction),
            float(label_smoothing), float(z_loss), float(logit_softcap))
    need_dweight = weight.requires_grad or (bias is not None and bias.requires_grad)
    need_grad = torch.is_grad_enabled() and (x.requires_grad or need_dweight)
    fp32_loss = loss_dtype is not None
    if need_grad or torch.compiler.is_compiling():
        out = backends.apply(linear_cross_entropy_op, *args, need_grad, need_dweight, chunk_size or 0,
                             name, fp32_loss)
    else:  # no autograd: the same implementation without the custom-op dispatcher
        out = _forward_impl(*args, False, False, chunk_size or 0, name, fp32_loss)
    return (out[0], out[1]) if return_z_loss else out[0]


__all__: List[str] = ["linear_cross_entropy"]
