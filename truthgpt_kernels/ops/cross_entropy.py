"""tk.cross_entropy: fused cross-entropy on given logits (Liger-Kernel's LigerCrossEntropyLoss).

How: one pass per row of the logits (the row kernel of tk.linear_cross_entropy, with the logits
given instead of computed chunk by chunk) yields the row's loss, its z-loss term and, when a
gradient is needed, grad_scale * d loss / d logits written into a new (N, V) buffer of the
logits' dtype (Liger writes it over the logits; the user's logits are never written here).
For reduction "mean"/"sum" the forward scales that gradient already (1 / count or 1) and the
backward only multiplies it by the scalar grad_output; for "none" the forward computes the
unscaled per-row gradients and the backward scales row r by grad_output[r]. Either way the
backward runs no kernel, and the logits are not saved (the gradient buffer is).

inplace_backward=True (flash-attn's option): the forward computes the losses only and saves the
logits; the backward runs the row kernel again with the scaled gradient written over the saved
logits (truthgpt::cross_entropy_grad_inplace, mutating them) and returns them as their own
gradient. No (N, V) buffer besides the logits exists at any time (peak memory of the loss is
the logits alone); the logits hold the gradient after the backward.

Logits (..., V) (the class dim last, as Liger and tk.linear_cross_entropy; F.cross_entropy's
(N, C, d1, ...) layout is not taken) with target (...) flattened to (N, V) and (N,).
"""
from typing import List, Optional, Tuple

import torch
from torch import Tensor

from .. import backends
from ..validation import autocast_dtype, check_tensor
from .linear_cross_entropy import check_loss_options
from .reference import LCE_REDUCTIONS

FAMILY = "cross_entropy"
_NONE, _MEAN, _SUM = (LCE_REDUCTIONS.index(r) for r in ("none", "mean", "sum"))


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _loss_dtype(logits: Tensor, fp32_loss: bool) -> torch.dtype:
    """logits' dtype; float32 with fp32_loss (float64 stays float64)."""
    return torch.promote_types(logits.dtype, torch.float32) if fp32_loss else logits.dtype


def _forward_impl(logits, target, row_weight, ignore_index, reduction, label_smoothing, z_loss,
                  softcap, need_grad, backend, fp32_loss):
    """(loss, z-loss term, dlogits): the reduced loss and term in _loss_dtype, and with
    need_grad d loss / d logits (mean/sum: of the reduced loss; none: of each row's own loss,
    row by row), else an empty tensor. row_weight (N,) (ce_weight[target], 0 on ignored rows)
    or None: the rows' losses are multiplied by it and "mean" divides by its sum (torch's
    class weights); the kernels get it in grad_scale, so the gradient is rounded once."""
    N = logits.shape[0]
    acc = _acc(logits.dtype)
    if row_weight is None:
        count = (target != ignore_index).sum().to(acc)
    else:
        row_weight = row_weight.to(acc)
        count = row_weight.sum()
    grad_scale = None
    if need_grad:
        one = torch.ones((), dtype=acc, device=logits.device)
        scale = one / count if reduction == _MEAN else one
        grad_scale = scale.expand(N).contiguous() if row_weight is None else (row_weight * scale).contiguous()
    fn = backends.kernel(FAMILY, backend, "fwd")
    args = (logits, target, grad_scale, ignore_index, label_smoothing, z_loss, softcap)
    if autocast_dtype(logits.device.type) is not None:  # the kernels keep their own dtypes
        with torch.autocast(logits.device.type, enabled=False):
            loss, z, dl = fn(*args)
    else:
        loss, z, dl = fn(*args)
    if row_weight is not None:
        loss, z = loss * row_weight, z * row_weight
    if reduction == _SUM:
        loss, z = loss.sum(), z.sum()
    elif reduction == _MEAN:
        loss, z = loss.sum() / count, z.sum() / count
    out = _loss_dtype(logits, fp32_loss)
    return loss.to(out), z.to(out), dl


@torch.library.custom_op("truthgpt::cross_entropy", mutates_args=())
def cross_entropy_op(logits: Tensor, target: Tensor, row_weight: Optional[Tensor], ignore_index: int,
                     reduction: int, label_smoothing: float, z_loss: float, softcap: float,
                     need_grad: bool, backend: str, fp32_loss: bool,
                     inplace_backward: bool) -> Tuple[Tensor, Tensor, Tensor]:
    return _forward_impl(logits, target, row_weight, ignore_index, reduction, label_smoothing,
                         z_loss, softcap, need_grad and not inplace_backward, backend, fp32_loss)


@cross_entropy_op.register_fake
def _(logits, target, row_weight, ignore_index, reduction, label_smoothing, z_loss, softcap,
      need_grad, backend, fp32_loss, inplace_backward):
    shape = (logits.shape[0],) if reduction == _NONE else ()
    dl = logits.new_empty(logits.shape) if need_grad and not inplace_backward else logits.new_empty(0)
    out = _loss_dtype(logits, fp32_loss)
    return logits.new_empty(shape, dtype=out), logits.new_empty(shape, dtype=out), dl


def _fake_fwd(logits, target, grad_scale, ignore_index, label_smoothing, z_loss, softcap):
    """The shapes of the C++ kernel truthgpt::cross_entropy_fwd (for opcheck and graphs)."""
    acc = _acc(logits.dtype)
    N = logits.shape[0]
    dl = logits.new_empty(logits.shape) if grad_scale is not None else logits.new_empty(0)
    return logits.new_empty((N,), dtype=acc), logits.new_empty((N,), dtype=acc), dl


if backends._ext.load("_C")[0] is not None and hasattr(torch.ops.truthgpt, "cross_entropy_fwd"):
    torch.library.register_fake("truthgpt::cross_entropy_fwd", _fake_fwd)
if backends._ext.load("_C")[0] is not None and hasattr(torch.ops.truthgpt, "cross_entropy_grad_"):
    torch.library.register_fake("truthgpt::cross_entropy_grad_", lambda logits, *args: None)


@torch.library.custom_op("truthgpt::cross_entropy_grad_inplace", mutates_args=("logits",))
def cross_entropy_grad_inplace_op(logits: Tensor, target: Tensor, grad_scale: Tensor, ignore_index: int,
                                  label_smoothing: float, z_loss: float, softcap: float, backend: str) -> None:
    """d sum_i grad_scale_i loss_i / d logits written over logits (N, V) (unit inner stride)."""
    fn = backends.kernel(FAMILY, backend, "grad_")
    if autocast_dtype(logits.device.type) is not None:
        with torch.autocast(logits.device.type, enabled=False):
            fn(logits, target, grad_scale, ignore_index, label_smoothing, z_loss, softcap)
    else:
        fn(logits, target, grad_scale, ignore_index, label_smoothing, z_loss, softcap)


@cross_entropy_grad_inplace_op.register_fake
def _(logits, target, grad_scale, ignore_index, label_smoothing, z_loss, softcap, backend):
    return None


def _setup(ctx, inputs, output):
    reduction, inplace = inputs[4], inputs[11]
    _, z, dl = output
    ctx.mark_non_differentiable(z, dl)
    ctx.set_materialize_grads(False)  # no zero-filled logits-sized gradient for dl in the backward
    ctx.reduction = reduction
    ctx.inplace = inplace
    if inplace:  # the logits themselves (no copy), to be overwritten by their gradient
        logits, target, row_weight = inputs[:3]
        ctx.args = inputs[3:11]  # ignore_index .. backend
        ctx.has_weight = row_weight is not None
        ctx.save_for_backward(*backends.saveable(logits, target, *([row_weight] if ctx.has_weight else [])))
    else:
        ctx.save_for_backward(*backends.saveable(dl))


def _scaled(saved: Tensor, grad: Tensor, reduction: int) -> Tensor:
    """saved * grad: grad a 0-dim tensor (mean/sum) or one per row (none). In eager CPU code
    with grad == 1 (the usual loss.backward()) the saved gradient itself: no pass over it."""
    if reduction == _NONE:
        return saved * grad.to(saved.dtype)[:, None]
    eager = type(grad) is Tensor and not torch.compiler.is_compiling()  # not traced
    if eager and grad.device.type == "cpu" and bool(grad == 1):
        return saved
    return saved * grad.to(saved.dtype)


_N_INPUTS = 12


def _inplace_backward(ctx, grad):
    """The gradient written over the saved logits: grad_scale_i = grad (scalar, or grad_i for
    "none") x the row's weight / count ("mean") as the forward's own gradient would have it."""
    logits, target, *rw = ctx.saved_tensors
    ignore_index, reduction, eps, z_loss, softcap, need_grad, backend, _ = ctx.args
    if not need_grad:
        return None
    acc = _acc(logits.dtype)
    weight = rw[0].to(acc) if rw else (target != ignore_index).to(acc)
    scale = weight / weight.sum() if reduction == _MEAN else weight
    gs = (scale * grad.to(acc)).contiguous()  # grad: 0-dim (mean / sum) or (N,) (none)
    backends.apply(cross_entropy_grad_inplace_op, logits, target, gs, ignore_index, eps, z_loss, softcap, backend)
    return logits


def _backward(ctx, grad, grad_z, grad_dl):
    if grad is None:  # the loss itself took no part in what is differentiated
        return (None,) * _N_INPUTS
    if ctx.inplace:
        return (_inplace_backward(ctx, grad),) + (None,) * (_N_INPUTS - 1)
    (dl,) = ctx.saved_tensors
    if dl.dim() == 1:  # the (0,) "not computed" placeholder (need_grad was False)
        return (None,) * _N_INPUTS
    return (_scaled(dl, grad, ctx.reduction),) + (None,) * (_N_INPUTS - 1)


backends.register_autograd(cross_entropy_op, _backward, _setup)


def _check(logits, target, ignore_index, reduction, label_smoothing, z_loss, logit_softcap,
           loss_dtype, ce_weight, inplace_backward):
    check_tensor("logits", logits, ndim=range(1, 9))
    V = logits.shape[-1]
    if V < 1:
        raise ValueError(f"logits must have at least one class (last dim >= 1), got shape {tuple(logits.shape)}")
    check_tensor("target", target, dtypes=(torch.int64,), device=logits.device)
    if target.shape != logits.shape[:-1]:
        raise ValueError(f"target must have shape {tuple(logits.shape[:-1])} (logits' leading dims: "
                         f"class indices, the class dim of logits last), got {tuple(target.shape)}")
    check_loss_options(ignore_index, reduction, label_smoothing, z_loss, logit_softcap, loss_dtype, "logits")
    if not isinstance(inplace_backward, bool):
        raise TypeError(f"inplace_backward must be True or False, got {inplace_backward!r}")
    if ce_weight is not None:
        check_tensor("ce_weight", ce_weight, shape=(V,), device=logits.device)


def _weighted_smoothing(logits, target, ce_weight, ignore_index, reduction, eps, z_loss, softcap,
                        return_z_loss, loss_dtype, backend):
    """ce_weight (w) with label smoothing eps > 0, torch's semantics: per counted row
      loss_i = (1 - eps) w[y_i] (lse_i - z_iy) + (eps / V) sum_c w_c (lse_i - z_ic)
    (+ z_loss w[y_i] lse_i^2, as without smoothing), z the (softcapped) logits, "mean" divided
    by sum_i w[y_i]. The fused op (reduction "none", no smoothing) gives nll_i = lse_i - z_iy, and lse_i = nll_i + z_iy
    (a gather) and sum_c w_c z_ic (a matvec) are plain torch, through which the gradient flows
    (softmax - onehot, plus onehot, is softmax); that path runs on a float32 copy of bfloat16 /
    float16 logits (one more (N, V) float32 tensor, and its gradient)."""
    out_dtype = _loss_dtype(logits, loss_dtype is not None)
    acc = _acc(logits.dtype)
    valid = target != ignore_index
    t = torch.where(valid, target, 0)
    cw = ce_weight.to(acc)
    wy = torch.where(valid, cw[t], 0.0)

    def reduce(r):  # r: weighted rows in acc
        r = r if reduction == "none" else r.sum() if reduction == "sum" else r.sum() / wy.sum()
        return r.to(out_dtype)
    # the logits in acc, once: the fused rows and the terms below read it, so the gradient's
    # three parts (which cancel at the target: (1 - eps) w_y (p - onehot) and the gather's
    # onehot) are summed in float32 and rounded to the logits' dtype once (in bfloat16 apart,
    # each part's rounding would leak into the small difference)
    x = logits.to(acc)
    nll = cross_entropy(x, target, ignore_index=ignore_index, reduction="none",
                        logit_softcap=softcap, backend=backend)
    V = logits.shape[-1]
    z = softcap * torch.tanh(x / softcap) if softcap else x
    zy = z.gather(1, t[:, None])[:, 0]
    wz = z @ cw  # sum_c w_c z_ic
    lse = nll + zy
    rows = (1 - eps) * wy * nll + (eps / V) * torch.where(valid, cw.sum() * lse - wz, 0.0)
    zrows = wy * torch.where(valid, z_loss * lse * lse, 0.0) if z_loss else None
    if zrows is not None:
        rows = rows + zrows
    loss = reduce(rows)
    if not return_z_loss:
        return loss
    return loss, reduce(torch.zeros_like(wy) if zrows is None else zrows.detach())


def cross_entropy(logits: Tensor, target: Tensor, *, ignore_index: int = -100,
                  reduction: str = "mean", label_smoothing: float = 0.0, z_loss: float = 0.0,
                  logit_softcap: float = 0.0, return_z_loss: bool = False,
                  ce_weight: Optional[Tensor] = None, loss_dtype: Optional[torch.dtype] = None,
                  inplace_backward: bool = False, backend: Optional[str] = None):
    """F.cross_entropy(logits, target, weight=ce_weight, ignore_index=, reduction=,
    label_smoothing=) with the loss and its gradient computed in one fused pass per row
    (Liger-Kernel's LigerCrossEntropyLoss), and the options of tk.linear_cross_entropy.

    logits (..., V) float32/bfloat16/float16/float64, the class dim last; target (...) int64
    (logits' leading dims), each a class in [0, V) or ignore_index (a row that adds nothing and
    is not counted by "mean"; "mean" over no counted row is nan, as torch). z_loss > 0 adds
    z_loss * logsumexp(logits)^2 to each counted row's loss (PaLM; Liger's lse_square_scale);
    logit_softcap > 0 replaces the logits by logit_softcap * tanh(logits / logit_softcap) first
    (Gemma 2). Returns the loss in logits' dtype, a scalar or of target's shape for reduction
    "none", or (loss, z_loss_term) with return_z_loss=True (the term reduced like the loss, no
    gradient: as Liger). loss_dtype=torch.float32 returns them in float32 for bfloat16/float16
    logits (the float32 row losses reduced in float32; float64 stays float64). Math in float32
    (float64 for float64). The gradient flows to logits (first order), in logits' dtype.
    ce_weight (V,): F.cross_entropy's `weight`, with every option: each counted row's loss
    (z-loss term included) is ce_weight[target] times its own and "mean" divides by the sum of
    those weights (as tk.linear_cross_entropy); without smoothing the kernels take the row
    weights in their gradient scale, with smoothing see _weighted_smoothing. No gradient flows
    to ce_weight. inplace_backward=True (flash-attn's option): the backward writes the gradient
    over the logits (which then hold it) instead of keeping an (N, V) gradient buffer from the
    forward: the loss's peak memory is the logits alone, at the cost of a second pass over them
    in the backward; a second backward through the same graph is wrong, and the logits must not
    be needed by anything else after the backward (an op that saved them for its own backward
    raises on the version change). Not with ce_weight + label_smoothing (that path is torch);
    logits without unit inner stride take the default path."""
    _check(logits, target, ignore_index, reduction, label_smoothing, z_loss, logit_softcap,
           loss_dtype, ce_weight, inplace_backward)
    shape = target.shape
    logits2, target = logits.reshape(-1, logits.shape[-1]), target.reshape(-1)
    if ce_weight is not None and label_smoothing:
        out = _weighted_smoothing(logits2, target, ce_weight, ignore_index, reduction, float(label_smoothing),
                        float(z_loss), float(logit_softcap), return_z_loss, loss_dtype, backend)
    else:
        name = backends.select(FAMILY, backend, logits2)
        row_weight = None
        if ce_weight is not None:  # torch's class weights: a weight per row
            valid = target != ignore_index
            row_weight = torch.where(valid, ce_weight.to(_acc(logits.dtype))[torch.where(valid, target, 0)], 0.0)
        args = (logits2, target, row_weight, ignore_index, LCE_REDUCTIONS.index(reduction),
                float(label_smoothing), float(z_loss), float(logit_softcap))
        need_grad = torch.is_grad_enabled() and logits.requires_grad
        fp32_loss = loss_dtype is not None
        inplace = inplace_backward and need_grad and (logits2.stride(-1) == 1 or logits2.shape[-1] <= 1)
        if need_grad or torch.compiler.is_compiling():
            out = backends.apply(cross_entropy_op, *args, need_grad, name, fp32_loss, inplace)
        else:  # no autograd: the same implementation without the custom-op dispatcher
            out = _forward_impl(*args, False, name, fp32_loss)
        out = out[:2]
    if not isinstance(out, tuple):
        out = (out, None)
    if reduction == "none":
        out = tuple(o.reshape(shape) if o is not None else None for o in out)
    return (out[0], out[1]) if return_z_loss else out[0]


__all__: List[str] = ["cross_entropy"]
