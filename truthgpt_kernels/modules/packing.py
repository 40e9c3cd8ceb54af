"""Packed batches: several documents laid end to end in the rows of a (B, S) token batch,
attending only within their own document (tk.attention_varlen), with positions restarting at
each document. What `Transformer.forward(..., position_ids=...)` / `cu_seqlens=` builds."""
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class Packed:
    """cu_seqlens int32 (N + 1,): document boundaries over the B * S flattened tokens (every
    row start is one); max_seqlen: the longest document; position_ids int64 (B, S): each
    token's position within its document."""
    cu_seqlens: Tensor
    max_seqlen: int
    position_ids: Tensor

    @staticmethod
    def from_position_ids(position_ids: Tensor) -> "Packed":
        """Documents start where the position restarts (is not the previous one + 1) and at
        every row start, as transformers' packed-sequence detection does."""
        if not isinstance(position_ids, Tensor) or position_ids.dim() != 2 or \
                position_ids.dtype not in (torch.int32, torch.int64):
            raise ValueError("position_ids must be an integer tensor of shape (batch, seq), got "
                             f"{getattr(position_ids, 'shape', type(position_ids).__name__)}")
        B, S = position_ids.shape
        pos = position_ids.long()
        starts = torch.ones_like(pos, dtype=torch.bool)
        starts[:, 1:] = pos[:, 1:] != pos[:, :-1] + 1
        idx = starts.flatten().nonzero().flatten()
        cu = torch.cat([idx, idx.new_tensor([B * S])]).to(torch.int32)
        return Packed(cu, int((cu[1:] - cu[:-1]).max()), pos)

    @staticmethod
    def from_cu_seqlens(cu_seqlens: Tensor, batch: int, seq: int) -> "Packed":
        """cu_seqlens over the batch * seq flattened tokens; must contain every row start."""
        if not isinstance(cu_seqlens, Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.dtype != torch.int32:
            raise ValueError("cu_seqlens must be an int32 tensor of shape (documents + 1,), got "
                             f"{getattr(cu_seqlens, 'dtype', type(cu_seqlens).__name__)} "
                             f"{tuple(getattr(cu_seqlens, 'shape', ()))}")
        cu = cu_seqlens.long()
        n = batch * seq
        if cu.numel() < 2 or int(cu[0]) != 0 or int(cu[-1]) != n or bool((cu[1:] < cu[:-1]).any()):
            raise ValueError(f"cu_seqlens must rise from 0 to batch * seq = {n}, got {cu.tolist()}")
        rows = torch.arange(0, n, seq, device=cu.device)
        if not bool(torch.isin(rows, cu).all()):
            raise ValueError(f"cu_seqlens must contain every row start (multiples of seq = {seq}): "
                             "a document cannot continue from one row into the next")
        lengths = cu[1:] - cu[:-1]
        first = torch.repeat_interleave(cu[:-1], lengths, output_size=n)
        pos = (torch.arange(n, device=cu.device) - first).view(batch, seq)
        return Packed(cu_seqlens, int(lengths.max()), pos)
