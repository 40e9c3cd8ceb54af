"""Fused cross-entropy on given logits in Triton (truthgpt::cross_entropy_fwd): the row kernel
of the fused linear cross-entropy (triton/linear_cross_entropy.py), reading the logits and
writing the gradient into a new buffer (cross_entropy_fwd: the logits are never written) or over
the logits themselves (cross_entropy_grad_, flash-attn's inplace_backward). Math in float32."""
import torch

from ..validation import check_class_targets
from .linear_cross_entropy import _rows


def cross_entropy_fwd(logits, target, grad_scale, ignore_index, label_smoothing, z_loss, softcap):
    N, V = logits.shape
    check_class_targets(target, V, ignore_index)
    L = logits if logits.stride(1) == 1 or V <= 1 else logits.contiguous()
    acc = torch.float32
    loss = torch.empty(N, dtype=acc, device=logits.device)
    zrows = torch.empty(N, dtype=acc, device=logits.device)
    grad = grad_scale is not None
    dl = torch.empty((N, V), dtype=logits.dtype, device=logits.device) if grad else logits.new_empty(0)
    if N:
        _rows(L, None, target.contiguous(), grad_scale.to(acc).contiguous() if grad else None, loss,
              zrows, ignore_index, float(label_smoothing), float(z_loss), float(softcap),
              out=dl if grad else None)
    return loss, zrows, dl


def cross_entropy_grad_(logits, target, grad_scale, ignore_index, label_smoothing, z_loss, softcap):
    N, V = logits.shape
    check_class_targets(target, V, ignore_index)
    if logits.stride(1) != 1 and V > 1:
        raise ValueError("cross_entropy_grad_: logits must have unit inner stride")
    if N:
        acc = torch.float32
        scratch = torch.empty(2, N, dtype=acc, device=logits.device)  # the losses, not needed here
        _rows(logits, None, target.contiguous(), grad_scale.to(acc).contiguous(), scratch[0], scratch[1],
              ignore_index, float(label_smoothing), float(z_loss), float(softcap))
