"""MultiheadAttention: a drop-in for torch.nn.MultiheadAttention running on tk.attention.

It *is* a torch.nn.MultiheadAttention (a subclass): the same constructor, parameters,
state_dict keys, forward signature, return values and argument errors, so weights load unchanged
and isinstance checks hold. The fast path (tk.attention) serves need_weights=False with no mask,
a boolean or 0/-inf float key_padding_mask, a causal attn_mask (from the is_causal hint, or
recognised from its pattern in eager mode; square only), add_bias_kv and attention dropout
while training (in the kernel: Philox from a seed drawn from torch's generator, the mask
regenerated in the backward; so the dropped positions differ from torch's own, the
distribution is the same). Anything else — need_weights=True, arbitrary float or boolean
attn_mask, add_zero_attn — takes the slower exact path (torch's own implementation). Under torch.compile the
choice uses only dtypes, shapes and flags (a float key_padding_mask, or an attn_mask without the
is_causal hint, takes the exact path), so fullgraph compiles. Nested-tensor inputs (what
nn.TransformerEncoder passes on its padding fast path) are padded around the same paths.
"""
from typing import Optional, Tuple

import torch
from torch import Tensor, nn

from .. import logs as _logs
from ..ops.attention import attention
from ..ops.linear import linear
from ..validation import autocast_dtype


def _project(module: nn.Linear, x: Tensor) -> Tensor:
    """module(x) for out_proj, through tk.linear when it is a plain (hook-free) torch Linear."""
    if type(module) in (nn.Linear, nn.modules.linear.NonDynamicallyQuantizableLinear) \
            and not module._forward_hooks and not module._forward_pre_hooks:
        return linear(x, module.weight, module.bias, backend="auto")
    return module(x)


def _keep_own_forward(module, args, kwargs):
    """No-op forward pre-hook. nn.TransformerEncoderLayer runs a fused native kernel instead of
    its self_attn.forward unless some submodule has a hook; this one keeps ours in use."""
    return None


class MultiheadAttentionInputError(AssertionError, RuntimeError, ValueError):
    """A malformed argument. torch's MultiheadAttention raises AssertionError for most of these
    and RuntimeError for the rest (a wrong attn_mask shape, or a batch-size mismatch that fails
    in a view); this is both, and a ValueError like every argument error of this package."""


class MultiheadAttentionMaskTypeError(AssertionError, TypeError):
    """A mask that is neither bool nor floating (torch raises AssertionError)."""


_InputError, _MaskTypeError = MultiheadAttentionInputError, MultiheadAttentionMaskTypeError


def _check_mask_dtype(name: str, mask: Optional[Tensor]):
    if mask is not None and mask.dtype != torch.bool and not mask.is_floating_point():
        raise _MaskTypeError(f"only bool and floating types of `{name}` are supported, got "
                             f"{mask.dtype}")


def _check_shape(name: str, t: Tensor, want: tuple, what: str):
    """t's shape matches want (None entries match anything)."""
    if len(want) != t.dim() or any(w is not None and w != d for w, d in zip(want, t.shape)):
        shape = "(" + ", ".join("*" if w is None else str(w) for w in want) + ")"
        raise _InputError(f"expected `{name}` of shape {shape} {what}, got {tuple(t.shape)}")


def _check_inputs(m: nn.MultiheadAttention, query: Tensor, key: Tensor, value: Tensor,
                  key_padding_mask: Optional[Tensor], attn_mask: Optional[Tensor]) -> bool:
    """torch's argument checks (F.multi_head_attention_forward's), with messages that name the
    argument and the expected shape, run before any projection or kernel. Returns batched."""
    nd = query.dim()
    if nd not in (2, 3):
        raise _InputError(f"`query` should be an unbatched 2-D or batched 3-D tensor, got shape "
                          f"{tuple(query.shape)}")
    kind = "batched (3-D)" if nd == 3 else "unbatched (2-D)"
    for name, t in (("key", key), ("value", value)):
        if t.dim() != nd:
            raise _InputError(f"For {kind} `query`, expected `{name}` to be {nd}-D, got shape "
                              f"{tuple(t.shape)}")
    if nd == 2:
        B, (L, S) = None, (query.shape[0], key.shape[0])
        _check_shape("query", query, (None, m.embed_dim), "(target length, embed_dim)")
        _check_shape("key", key, (None, m.kdim), "(source length, kdim)")
        _check_shape("value", value, (S, m.vdim), "(source length of `key`, vdim)")
    else:
        order = (lambda b, n, e: (b, n, e)) if m.batch_first else (lambda b, n, e: (n, b, e))
        what = "(batch, {}, {})" if m.batch_first else "({}, batch, {})"
        B, L = order(*query.shape)[:2]
        S = order(*key.shape)[1]
        _check_shape("query", query, order(None, None, m.embed_dim),
                     what.format("target length", "embed_dim"))
        _check_shape("key", key, order(B, None, m.kdim),
                     what.format("source length", "kdim") + f" with the batch size {B} of `query`")
        _check_shape("value", value, order(B, S, m.vdim),
                     what.format("source length", "vdim") + " with the batch size and source "
                     "length of `key`")
    _check_mask_dtype("key_padding_mask", key_padding_mask)
    _check_mask_dtype("attn_mask", attn_mask)
    if key_padding_mask is not None:
        _check_shape("key_padding_mask", key_padding_mask, (B, S) if nd == 3 else (S,),
                     "(batch, source length)" if nd == 3 else "(source length,) for unbatched `query`")
    if attn_mask is not None:
        three = (B * m.num_heads if nd == 3 else m.num_heads, L, S)
        if attn_mask.dim() not in (2, 3):
            raise _InputError(f"expected `attn_mask` to be None, 2-D {(L, S)} or 3-D {three}, "
                              f"got shape {tuple(attn_mask.shape)}")
        _check_shape("attn_mask", attn_mask, (L, S) if attn_mask.dim() == 2 else three,
                     "(target length, source length)" if attn_mask.dim() == 2 else
                     "(batch * num_heads, target length, source length)")
    return nd == 3


def _is_causal_mask(mask: Tensor, L: int, S: int) -> bool:
    """Whether a 2-D mask is exactly the square causal one (eager only: reads the values)."""
    if mask.dim() != 2 or mask.shape != (L, S) or L != S:
        return False
    upper = torch.ones(L, S, dtype=torch.bool, device=mask.device).triu(1)
    if mask.dtype == torch.bool:
        return torch.equal(mask, upper)
    return bool(torch.all(torch.where(upper, mask == float("-inf"), mask == 0)))


def _key_mask(kpm: Optional[Tensor], tracing: bool) -> Tuple[bool, Optional[Tensor]]:
    """(servable, key_mask) from an nn-style key_padding_mask (True / -inf = ignore). A float
    mask is servable only when it holds just 0 and -inf, which only eager code can look at."""
    if kpm is None:
        return True, None
    if kpm.dtype == torch.bool:
        return True, ~kpm
    if not tracing and torch.all((kpm == 0) | (kpm == float("-inf"))):
        return True, kpm == 0
    return False, None


def _unpad(t: Tensor, name: str) -> Tuple[Tensor, Tensor, list]:
    """A nested (batch, ragged length, E) tensor as (zero-padded (B, max length, E), valid
    (B, max length) bool, lengths)."""
    if t.dim() != 3:
        raise _InputError(f"nested `{name}` must be (batch, ragged length, embed), got {t.dim()} "
                          "dims")
    lengths = [int(x.shape[0]) for x in t.unbind()]
    padded = torch.nested.to_padded_tensor(t, 0.0)
    valid = (torch.arange(padded.shape[1], device=padded.device)
             < torch.tensor(lengths, device=padded.device)[:, None])
    return padded, valid, lengths


def _renest(out: Tensor, like: Tensor, valid: Tensor, lengths: list) -> Tensor:
    """The rows `valid` of a padded (B, max length, E) tensor as a nested tensor of like's layout
    (for jagged: the same offsets, so it adds to `like`)."""
    if like.layout == torch.jagged:
        return torch.nested.nested_tensor_from_jagged(out[valid], offsets=like.offsets())
    return torch.nested.as_nested_tensor([o[:n] for o, n in zip(out, lengths)], layout=like.layout)


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
        if query.is_nested or key.is_nested or value.is_nested:
            return self._nested_forward(query, key, value, key_padding_mask, need_weights,
                                        attn_mask, average_attn_weights, is_causal)
        batched = _check_inputs(self, query, key, value, key_padding_mask, attn_mask)
        seq_dim = 1 if (batched and self.batch_first) else 0
        L, S = query.shape[seq_dim], key.shape[seq_dim]
        # Under torch.compile nothing may branch on a mask's values: a float key_padding_mask or
        # an attn_mask whose pattern would have to be read takes torch's exact path there.
        tracing = torch.compiler.is_compiling()
        servable, key_mask = _key_mask(key_padding_mask, tracing)
        causal = False
        if attn_mask is not None:
            if is_causal and key_padding_mask is None:
                causal = L == S  # torch trusts the hint here too and drops the mask
            elif not tracing:
                causal = _is_causal_mask(attn_mask, L, S)
            servable &= causal
        elif is_causal:
            raise _InputError("Need attn_mask if specifying the is_causal hint (as torch): "
                              "`attn_mask` must be the causal mask, e.g. nn.Transformer."
                              "generate_square_subsequent_mask(L)")
        w = self.in_proj_weight if self.in_proj_weight is not None else self.q_proj_weight
        fast = (servable and not need_weights and not self.add_zero_attn
                and not (causal and self.bias_k is not None)
                # inputs of another dtype than the weights: torch's own result or exception
                and (query.dtype == key.dtype == value.dtype == w.dtype
                     or autocast_dtype(query.device.type) is not None))
        if not fast:
            _logs.warn_once("multihead-fallback", _logs.MULTIHEAD_FALLBACK, need_weights, servable, logger="modules")
            return super().forward(query, key, value, key_padding_mask=key_padding_mask,
                                   need_weights=need_weights, attn_mask=attn_mask,
                                   average_attn_weights=average_attn_weights, is_causal=is_causal)
        return self._fast_forward(query, key, value, key_mask, causal, batched), None

    def _nested_forward(self, query, key, value, key_padding_mask, need_weights, attn_mask,
                        average_attn_weights, is_causal):
        """Nested (batch, ragged length, E) inputs, as nn.TransformerEncoder's padding fast path
        passes them: padded around the dense path, the padding served as a key_padding_mask."""
        if not self.batch_first:
            raise _InputError("nested-tensor inputs need batch_first=True: they are "
                              "(batch, ragged length, embed)")
        if key_padding_mask is not None:
            raise _InputError("`key_padding_mask` cannot be combined with nested-tensor inputs: "
                              "their lengths already mark the padding")
        done = {}

        def unpad(t, name):
            if id(t) not in done:
                done[id(t)] = _unpad(t, name) if t.is_nested else (t, None, None)
            return done[id(t)]

        q, q_valid, q_lengths = unpad(query, "query")
        k, k_valid, _ = unpad(key, "key")
        v, v_valid, _ = unpad(value, "value")
        if k_valid is None and v_valid is not None:
            k_valid = v_valid
        kpm = None if k_valid is None else ~k_valid
        out, weights = self.forward(q, k, v, key_padding_mask=kpm, need_weights=need_weights,
                                    attn_mask=attn_mask, average_attn_weights=average_attn_weights,
                                    is_causal=is_causal)
        if q_valid is not None:
            out = _renest(out, query, q_valid, q_lengths)
        return out, weights

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
                q, k, v = linear(query, w, b, backend="auto").chunk(3, dim=-1)
            else:
                wq, wk, wv = w.chunk(3)
                bq, bk, bv = (None,) * 3 if b is None else b.chunk(3)
                q, k, v = (linear(t, wt, bt, backend="auto")
                           for t, wt, bt in ((query, wq, bq), (key, wk, bk), (value, wv, bv)))
        else:
            bq, bk, bv = (None,) * 3 if self.in_proj_bias is None else self.in_proj_bias.chunk(3)
            q = linear(query, self.q_proj_weight, bq, backend="auto")
            k = linear(key, self.k_proj_weight, bk, backend="auto")
            v = linear(value, self.v_proj_weight, bv, backend="auto")
        if self.bias_k is not None:  # one extra learned key/value at the end, always visible
            k = torch.cat([k, self.bias_k.expand(B, 1, E)], dim=1)
            v = torch.cat([v, self.bias_v.expand(B, 1, E)], dim=1)
            if key_mask is not None:
                key_mask = torch.cat([key_mask, key_mask.new_ones(B, 1)], dim=1)
        q = q.view(B, L, H, D).transpose(1, 2)   # (B, H, L, D)
        k = k.view(B, -1, H, D).transpose(1, 2)  # (B, H, S, D)
        v = v.view(B, -1, H, D).transpose(1, 2)
        out = attention(q, k, v, causal=causal, key_mask=key_mask,
                        dropout_p=self.dropout if self.training else 0.0, backend=self.backend)
        out = _project(self.out_proj, out.transpose(1, 2).reshape(B, L, E))  # (B, L, E)
        if not batched:
            return out[0]
        return out if self.batch_first else out.transpose(0, 1)
