"""Loss modules on the truthgpt_kernels ops."""
from typing import Optional

import torch
from torch import Tensor, nn

from ..ops.cross_entropy import cross_entropy
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


class CrossEntropyLoss(nn.Module):
    """Drop-in for torch.nn.CrossEntropyLoss(weight=None, ignore_index=-100, reduction="mean",
    label_smoothing=0.0) on tk.cross_entropy (Liger-Kernel's LigerCrossEntropyLoss), with class-
    index targets, plus the keyword extras z_loss (Liger's lse_square_scale), logit_softcap
    (Liger's softcap), return_z_loss, loss_dtype, inplace_backward (flash-attn's: the backward
    writes the gradient over the logits, no (N, V) buffer; see tk.cross_entropy) and backend.

    Input layouts: (N, C) with target (N,); (C,) with target (); (..., C) with target (...) (the
    class dim last, as LM logits (B, S, V): an extension, torch reads a 3-D input as (N, C, d1));
    and torch's (N, C, d1, ...) with target (N, d1, ...), where the class dim is moved last (a
    copy of the input) and a "none" loss comes back as (N, d1, ...). An input whose leading dims
    match target's is read class-last. Class-probability (float) targets raise ValueError."""

    def __init__(self, weight: Optional[Tensor] = None, size_average=None, ignore_index: int = -100,
                 reduce=None, reduction: str = "mean", label_smoothing: float = 0.0, *,
                 z_loss: float = 0.0, logit_softcap: float = 0.0, return_z_loss: bool = False,
                 loss_dtype: Optional[torch.dtype] = None, inplace_backward: bool = False,
                 backend: Optional[str] = None):
        super().__init__()
        if size_average is not None or reduce is not None:  # torch's deprecated pair
            reduction = torch.nn.modules.loss._Reduction.legacy_get_string(size_average, reduce)
        self.register_buffer("weight", weight)
        self.ignore_index, self.reduction, self.label_smoothing = ignore_index, reduction, label_smoothing
        self.z_loss, self.logit_softcap, self.return_z_loss = z_loss, logit_softcap, return_z_loss
        self.loss_dtype, self.inplace_backward, self.backend = loss_dtype, inplace_backward, backend

    def forward(self, input: Tensor, target: Tensor):
        if isinstance(target, Tensor) and target.is_floating_point():
            raise ValueError("CrossEntropyLoss (truthgpt_kernels) takes class-index targets (int64); "
                             "class-probability (float) targets are not supported: use "
                             "torch.nn.CrossEntropyLoss")
        if (isinstance(input, Tensor) and isinstance(target, Tensor) and input.dim() > 2
                and target.shape != input.shape[:-1]):
            if target.shape != input.shape[:1] + input.shape[2:]:
                raise ValueError(f"target must have shape {tuple(input.shape[:-1])} (input's leading "
                                 f"dims, classes last) or {tuple(input.shape[:1] + input.shape[2:])} "
                                 f"(torch's (N, C, d1, ...) layout), got {tuple(target.shape)}")
            input = input.movedim(1, -1)  # torch's (N, C, d1, ...): classes last
        return cross_entropy(
            input, target, ignore_index=self.ignore_index, reduction=self.reduction,
            label_smoothing=self.label_smoothing, z_loss=self.z_loss,
            logit_softcap=self.logit_softcap, return_z_loss=self.return_z_loss,
            ce_weight=self.weight, loss_dtype=self.loss_dtype, inplace_backward=self.inplace_backward,
            backend=self.backend)

    def extra_repr(self) -> str:
        return (f"reduction={self.reduction!r}, ignore_index={self.ignore_index}, "
                f"label_smoothing={self.label_smoothing}, z_loss={self.z_loss}, "
                f"logit_softcap={self.logit_softcap}")


__all__ = ["FusedLinearCrossEntropyLoss", "CrossEntropyLoss"]
