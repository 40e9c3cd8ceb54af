"""MultiheadAttention: a drop-in for torch.nn.MultiheadAttention running on tk.attention.

It *is* a torch.nn.MultiheadAttention (a subclass): the same constructor, parameters,
state_dict keys, forward signature and return values, so weights load unchanged and
isinstance checks hold. The fast path (tk.attention) serves need_weights=False with no mask, a
boolean or 0/-inf float key_padding_mask, a causal attn_mask (recognised from is_causal or
from its pattern, square only) and add_bias_kv. Anything else — need_weights=True,
arbitrary float or boolean attn_mask, add_zero_attn, attention dropout while training —
takes the slower exact path (torch's own implementation).
"""
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import logs as _logs
from ..ops.attention import attention


def _keep_own_forward(module, args, kwargs):
    """No-op forward pre-hook. nn.TransformerEncoderLayer runs a fused native kernel instead of
    its self_attn.forward unless some submodule has a hook; this one keeps ours in use."""
    return None


def _is_causal_mask(mask: Tensor, L: int, S: int) -> bool:
    if mask.dim() != 2 or mask.shape != (L, S) or L != S:
        return False
    upper = torch.ones(L, S, dtype=torch.bool, device=mask.device).triu(1)
    if mask.dtype == torch.bool:
        return torch.equal(mask, upper)
    return bool(torch.all(torch.where(upper, mask == float("-inf"), mask == 0)))


def _key_mask(kpm: Optional[Tensor]) -> Tuple[bool, Optional[Tensor]]:
    """(servable, key_mask) from an nn-style key_padding_mask (True / -inf = ignore)."""
    if kpm is None:
        return True, None
    if kpm.dtype == torch.bool:
        return True, ~kpm
    if torch.all((kpm == 0) | (kpm == float("-inf"))):
        return True, kpm == 0
    return False, None


class MultiheadAttention(nn.MultiheadAttention):
    backend: Optional[str] = None  # None: the usual selection (use_backend, env var, auto)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.register_forward_pre_hook(_keep_own_forward, with_kwargs=True)

    @classmethod
    def from_torch(cls, module: nn.MultiheadAttention) -> "MultiheadAttention":
        """A MultiheadAttention sharing module's parameters, buffers and settings."""
        new = cls.__new__(cls)
        new.__dict__.update(module.__dict__)
        new._forward_pre_hooks = type(module._forward_pre_hooks)(module._forward_pre_hooks)
        new.register_forward_pre_hook(_keep_own_forward, with_kwargs=True)
        return new

    def forward(self, query: Tensor, key: Tensor, value: Tensor,
                key_padding_mask: Optional[Tensor] = None, need_weights: bool = True,
                attn_mask: Optional[Tensor] = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> Tuple[Tensor, Optional[Tensor]]:
        batched = query.dim() == 3
        seq_dim = 1 if (batched and self.batch_first) else 0
        L, S = query.shape[seq_dim], key.shape[seq_dim]
        servable, key_mask = _key_mask(key_padding_mask)
        causal = False
        if attn_mask is not None:
            causal = _is_causal_mask(attn_mask, L, S)
            servable &= causal
        elif is_causal:
            causal = L == S
            servable &= causal
        fast = (servable and not need_weights and not self.add_zero_attn
                and not (self.training and self.dropout > 0) and query.dim() in (2, 3)
                and not (causal and self.bias_k is not None))
        if not fast:
            _logs.warn_once("multihead-fallback", _logs.MULTIHEAD_FALLBACK, need_weights, servable, logger="modules")
            return super().forward(query, key, value, key_padding_mask=key_padding_mask,
                                   need_weights=need_weights, attn_mask=attn_mask,
                                   average_attn_weights=average_attn_weights, is_causal=is_causal)
        return self._fast_forward(query, key, value, key_mask, causal, batched), None

    def _fast_forward(self, query, key, value, key_mask, causal, batched):
        if not batched:  # (L, E) -> (1, L, E)
            query, key, value = query[None], key[None], value[None]
            key_mask = None if key_mask is None else key_mask[None]
        elif not self.batch_first:  # (L, B, E) -> (B, L, E)
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        B, L, E = query.shape
        H, D = self.num_heads, self.head_dim
        if self._qkv_same_embed_dim:
            w, b = self.in_proj_weight, self.in_proj_bias
            if query is key and key is value:
                q, k, v = F.linear(query, w, b).chunk(3, dim=-1)
            else:
                wq, wk, wv = w.chunk(3)
                bq, bk, bv = (None,) * 3 if b is None else b.chunk(3)
                q, k, v = F.linear(query, wq, bq), F.linear(key, wk, bk), F.linear(value, wv, bv)
        else:
            bq, bk, bv = (None,) * 3 if self.in_proj_bias is None else self.in_proj_bias.chunk(3)
            q = F.linear(query, self.q_proj_weight, bq)
            k = F.linear(key, self.k_proj_weight, bk)
            v = F.linear(value, self.v_proj_weight, bv)
        if self.bias_k is not None:  # one extra learned key/value at the end, always visible
            k = torch.cat([k, self.bias_k.expand(B, 1, E)], dim=1)
            v = torch.cat([v, self.bias_v.expand(B, 1, E)], dim=1)
            if key_mask is not None:
                key_mask = torch.cat([key_mask, key_mask.new_ones(B, 1)], dim=1)
        q = q.view(B, L, H, D).transpose(1, 2)   # (B, H, L, D)
        k = k.view(B, -1, H, D).transpose(1, 2)  # (B, H, S, D)
        v = v.view(B, -1, H, D).transpose(1, 2)
        out = attention(q, k, v, causal=causal, key_mask=key_mask, backend=self.backend)
        out = self.out_proj(out.transpose(1, 2).reshape(B, L, E))  # (B, L, E)
        if not batched:
            return out[0]
        return out if self.batch_first else out.transpose(0, 1)
