"""Fused cross-entropy on given logits in Triton (truthgpt::cross_entropy_fwd): the row kernel
of the fused linear cross-entropy (triton/linear_cross_entropy.py), reading the logits and
writing the gradient into a new buffer (the logits are never written). Math in float32."""
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
