"""Loss modules on the truthgpt_kernels ops."""
from typing import Optional

import torch
from torch import Tensor, nn

from ..ops.linear_cross_entropy import linear_cross_entropy


class FusedLinearCrossEntropyLoss(nn.Module):
    """The LM head and its cross-entropy loss in one op that never materialises the (N, V)
    logits: `loss = FusedLinearCrossEntropyLoss()(hidden, lm_head.weight, labels)` equals
    `F.cross_entropy(F.linear(hidden, lm_head.weight), labels)` (see tk.linear_cross_entropy).

    Named and configured like Liger-Kernel's LigerFusedLinearCrossEntropyLoss (z_loss is its
    lse_square_scale, logit_softcap its softcap), but forward takes (x, weight, target, bias)
    in the order of tk.linear_cross_entropy. Leading dims of x and target are flattened:
    x (..., d) with target (...)."""

    def __init__(self, *, ignore_index: int = -100, reduction: str = "mean",
                 label_smoothing: float = 0.0, z_loss: float = 0.0, logit_softcap: float = 0.0,
                 return_z_loss: bool = False, chunk_size: Optional[int] = None,
                 loss_dtype: Optional[torch.dtype] = None, ce_weight: Optional[Tensor] = None,
                 backend: Optional[str] = None):
        super().__init__()
        self.register_buffer("ce_weight", ce_weight)  # (as nn.CrossEntropyLoss's weight)
        self.ignore_index, self.reduction = ignore_index, reduction
        self.label_smoothing, self.z_loss, self.logit_softcap = label_smoothing, z_loss, logit_softcap
        self.return_z_loss, self.chunk_size, self.backend = return_z_loss, chunk_size, backend
        self.loss_dtype = loss_dtype

    def forward(self, x: Tensor, weight: Tensor, target: Tensor, bias: Optional[Tensor] = None):
        if isinstance(x, Tensor) and isinstance(target, Tensor) and x.dim() != 2:
            if x.shape[:-1] != target.shape:
                raise ValueError(f"target must have shape {tuple(x.shape[:-1])} (x's leading dims), "
                                 f"got {tuple(target.shape)}")
            x, target = x.reshape(-1, x.shape[-1]), target.reshape(-1)
        return linear_cross_entropy(
            x, weight, target, bias=bias, ignore_index=self.ignore_index, reduction=self.reduction,
            label_smoothing=self.label_smoothing, z_loss=self.z_loss,
            logit_softcap=self.logit_softcap, return_z_loss=self.return_z_loss,
            chunk_size=self.chunk_size, loss_dtype=self.loss_dtype, ce_weight=self.ce_weight,
            backend=self.backend)

    def extra_repr(self) -> str:
        return (f"reduction={self.reduction!r}, ignore_index={self.ignore_index}, "
                f"label_smoothing={self.label_smoothing}, z_loss={self.z_loss}, "
                f"logit_softcap={self.logit_softcap}")


__all__ = ["FusedLinearCrossEntropyLoss"]
