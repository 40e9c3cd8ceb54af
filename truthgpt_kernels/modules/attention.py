"""Multi-head attention on tk.attention: fused QKV projection, RoPE / ALiBi / no positions,
sliding windows, block-sparse layouts, GQA/MQA, cross-attention and a KV cache."""
from typing import Optional, Tuple, Union

import torch
from torch import Tensor, nn

from .. import sparse
from ..ops import attention, attention_varlen, attention_with_kvcache
from .embeddings import AlibiSlopes, RotaryEmbedding
from .packing import Packed
from .paged import PagedKVCache
from .linear import Linear

POSITIONS = ("rope", "alibi", "relative", "none")
LAYOUTS = {"local": sparse.local_layout, "local_global": sparse.local_global_layout,
           "bigbird": sparse.bigbird_layout, "strided": sparse.strided_layout}


class CacheFullError(RuntimeError):
    """A KVCache has no room for the tokens being appended."""


class KVCache(nn.Module):
    """Preallocated key/value buffers (B, Hkv, max_len, D) for incremental decoding, and the
    number of positions filled so far (`pos`). One per attention layer."""

    def __init__(self, batch_size: int, n_kv_heads: int, max_len: int, head_dim: int, *,
                 device=None, dtype=None):
        super().__init__()
        shape = (batch_size, n_kv_heads, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, device=device, dtype=dtype), persistent=False)
        self.register_buffer("v", torch.zeros(shape, device=device, dtype=dtype), persistent=False)
        self.pos = 0

    @property
    def max_len(self) -> int:
        return self.k.shape[2]

    def reset(self) -> "KVCache":
        self.pos = 0
        return self

    def update(self, k: Tensor, v: Tensor) -> Tuple[Tensor, Tensor]:
        """Appends k, v (B, Hkv, S, D) at `pos`; returns every cached key and value so far."""
        B, H, S, D = k.shape
        if (B, H, D) != (self.k.shape[0], self.k.shape[1], self.k.shape[3]):
            raise ValueError(f"KVCache holds (batch, kv heads, head dim) = "
                             f"{(self.k.shape[0], self.k.shape[1], self.k.shape[3])}, got keys "
                             f"of shape {tuple(k.shape)}")
        if self.pos + S > self.max_len:
            raise CacheFullError(f"KV cache is full: it holds {self.max_len} positions, {self.pos} "
                                 f"are used, and {S} more were appended; allocate a longer cache "
                                 f"(max_len) or call reset()")
        self.k[:, :, self.pos:self.pos + S] = k
        self.v[:, :, self.pos:self.pos + S] = v
        self.pos += S
        return self.k[:, :, :self.pos], self.v[:, :, :self.pos]

    def extra_repr(self) -> str:
        return f"shape={tuple(self.k.shape)}, pos={self.pos}"


class Attention(nn.Module):
    """Attention(d_model, n_heads, n_kv_heads=None, *, causal=True, position="rope", ...)

    forward(x (B, S, d_model), *, context=None, cache=None, key_mask=None) -> (B, S, d_model)

    - one fused projection `qkv` (rows: Hq*D query, Hkv*D key, Hkv*D value features) and `out`;
    - position: "rope" (rotary on q and k), "alibi" (linear biases in the kernel), "relative"
      (T5's bucketed bias in the kernel: forward takes `position_bias=`, what a
      RelativePositionBias shared by the stack returns) or "none";
    - dropout: on the output projection (residual dropout); attn_dropout: on the attention
      probabilities, inside the kernel (Philox, regenerated in the backward), training only;
    - window: W (the W previous tokens, and W following ones when not causal) or (left, right);
    - sparsity: {"layout": "local" | "local_global" | "bigbird" | "strided", "block_size": 64,
      **layout parameters} (truthgpt_kernels.sparse), built once for max_seq_len and sliced;
    - n_kv_heads < n_heads: grouped-query attention (1: multi-query);
    - context (B, Sc, d_model): cross-attention, queries from x and keys/values from context
      through the same fused weight; no positions, mask or window apply across sequences;
    - cache: a KVCache (see make_cache). Self-attention appends this step's keys at cache.pos
      and rotates at that offset; the query rows sit bottom-right, so causal masking holds.
      Cross-attention fills the cache from context on the first call and reuses it after.
    """

    def __init__(self, d_model: int, n_heads: int, n_kv_heads: Optional[int] = None, *,
                 causal: bool = True, position: str = "rope",
                 window: Optional[Union[int, Tuple[int, int]]] = None,
                 sparsity: Optional[dict] = None, bias: bool = False, dropout: float = 0.0,
                 attn_dropout: float = 0.0, rope_base: float = 10000.0, rope_scaling: Optional[dict] = None,
                 rotary_dim: Optional[int] = None, max_seq_len: int = 2048, softcap: float = 0.0,
                 scale: Optional[float] = None, backend: Optional[str] = None, device=None, dtype=None):
        super().__init__()
        n_kv_heads = n_heads if n_kv_heads is None else n_kv_heads
        if d_model % n_heads:
            raise ValueError(f"d_model ({d_model}) must be divisible by n_heads ({n_heads})")
        if n_kv_heads < 1 or n_heads % n_kv_heads:
            raise ValueError(f"n_heads ({n_heads}) must be a multiple of n_kv_heads ({n_kv_heads})")
        if position not in POSITIONS:
            raise ValueError(f"position must be one of {POSITIONS}, got {position!r}")
        self.d_model, self.n_heads, self.n_kv_heads = d_model, n_heads, n_kv_heads
        self.head_dim = d_model // n_heads
        self.causal, self.position, self.softcap = causal, position, softcap
        self.scale = scale  # None: 1/sqrt(head_dim); T5 uses 1.0
        self.backend = backend
        self.window = self._window(window, causal)
        self.sparsity = self._sparsity(sparsity)
        self.max_seq_len = max_seq_len
        D = self.head_dim
        self.qkv = Linear(d_model, (n_heads + 2 * n_kv_heads) * D, bias=bias, device=device, dtype=dtype)
        self.out = Linear(n_heads * D, d_model, bias=bias, device=device, dtype=dtype)
        self.dropout = nn.Dropout(dropout)
        if not 0.0 <= attn_dropout < 1.0:
            raise ValueError(f"attn_dropout must lie in [0, 1), got {attn_dropout}")
        self.attn_dropout = float(attn_dropout)
        self.rotary = RotaryEmbedding(D, rotary_dim=rotary_dim, base=rope_base, scaling=rope_scaling,
                                      max_seq_len=max_seq_len, backend=backend,
                                      device=device) if position == "rope" else None
        self.alibi = AlibiSlopes(n_heads, device=device) if position == "alibi" else None
        self._layouts = {}

    @staticmethod
    def _window(window, causal) -> Optional[Tuple[int, int]]:
        if window is None:
            return None
        if isinstance(window, int) and not isinstance(window, bool):
            if window < 1:
                raise ValueError(f"window must be >= 1, got {window}")
            return (window, 0 if causal else window)
        if isinstance(window, (tuple, list)) and len(window) == 2 and all(
                isinstance(w, int) and not isinstance(w, bool) and w >= -1 for w in window):
            return (int(window[0]), int(window[1]))
        raise ValueError(f"window must be an int W or a pair (left, right) of ints >= -1, got {window!r}")

    @staticmethod
    def _sparsity(sparsity) -> Optional[dict]:
        if sparsity is None:
            return None
        sparsity = dict(sparsity)
        layout = sparsity.get("layout")
        if layout not in LAYOUTS:
            raise ValueError(f"sparsity['layout'] must be one of {tuple(LAYOUTS)}, got {layout!r}")
        sparsity.setdefault("block_size", 64)
        return sparsity

    # ------------------------------------------------------------------ helpers
    def make_cache(self, batch_size: int, max_len: int, *, device=None, dtype=None) -> KVCache:
        w = self.qkv.weight
        return KVCache(batch_size, self.n_kv_heads, max_len, self.head_dim,
                       device=device or w.device, dtype=dtype or w.dtype)

    def _block_mask(self, Sq: int, Sk: int, device) -> Tensor:
        """Block mask rows for queries at positions Sk - Sq .. Sk - 1 against keys 0 .. Sk - 1,
        cut from one layout over max(max_seq_len, Sk) positions (so decoding one token sees
        exactly the blocks the full sequence would)."""
        params = dict(self.sparsity)
        layout, bs = params.pop("layout"), params.pop("block_size")
        start = Sk - Sq
        if start % bs and Sq > 1:
            raise ValueError(f"block-sparse attention with a cache needs chunks that start on a "
                             f"block boundary (block_size {bs}) or single tokens; got {Sq} "
                             f"queries at offset {start}")
        n = max(self.max_seq_len, Sk)
        key = (n, str(device))
        full = self._layouts.get(key)
        if full is None:
            if layout == "bigbird":
                params.setdefault("heads", self.n_heads)
            full = LAYOUTS[layout](n, n, block_size=bs, causal=self.causal, device=device, **params)
            self._layouts = {key: full}
        q0 = start // bs
        nq = (Sq + bs - 1) // bs
        nk = (Sk + bs - 1) // bs
        return full[:, :, q0:q0 + nq, :nk]

    # ------------------------------------------------------------------ forward
    def forward(self, x: Tensor, *, context: Optional[Tensor] = None,
                cache: Optional[KVCache] = None, key_mask: Optional[Tensor] = None,
                packed: Optional[Packed] = None, position_bias=None) -> Tensor:
        """x (B, S, d_model). packed: documents packed into the rows (modules/packing.py),
        each attending only within itself, positions restarting per document. position_bias:
        (table, buckets) from a RelativePositionBias, for position="relative"."""
        if x.dim() != 3 or x.shape[-1] != self.d_model:
            raise ValueError(f"Attention expects x of shape (batch, seq, {self.d_model}), got {tuple(x.shape)}")
        if (position_bias is not None) != (self.position == "relative" and context is None):
            raise ValueError("position_bias (from a RelativePositionBias) is what self-attention with "
                             "position='relative' takes, and only it")
        rel = {} if position_bias is None else dict(zip(("rel_bias", "rel_buckets"), position_bias))
        if context is not None:
            return self._cross(x, context, cache, key_mask)
        if isinstance(cache, PagedKVCache):
            return self._paged(x, cache, packed, rel)
        if packed is not None:
            return self._packed(x, packed, cache, key_mask, rel)
        B, S, _ = x.shape
        Hq, Hkv, D = self.n_heads, self.n_kv_heads, self.head_dim
        q, k, v = self.qkv(x).split([Hq * D, Hkv * D, Hkv * D], dim=-1)
        q = q.view(B, S, Hq, D).transpose(1, 2)              # (B, Hq, S, D)
        k = k.view(B, S, Hkv, D).transpose(1, 2)             # (B, Hkv, S, D)
        v = v.view(B, S, Hkv, D).transpose(1, 2)             # (B, Hkv, S, D)
        offset = cache.pos if cache is not None else 0
        if self.rotary is not None:
            q, k = self.rotary(q, k, offset=offset)
        if cache is not None:
            k, v = cache.update(k, v)                         # (B, Hkv, offset + S, D)
        Sk = k.shape[2]
        block_mask = self._block_mask(S, Sk, x.device) if self.sparsity else None
        y = attention(q, k, v, causal=self.causal, window=self.window,
                      alibi_slopes=self.alibi() if self.alibi is not None else None,
                      block_mask=block_mask,
                      block_size=self.sparsity["block_size"] if self.sparsity else 64,
                      key_mask=key_mask, softcap=self.softcap, scale=self.scale,
                      dropout_p=self._attn_dropout_p(), backend=self.backend, **rel)  # (B, Hq, S, D)
        y = y.transpose(1, 2).reshape(B, S, Hq * D)           # (B, S, Hq * D)
        return self.dropout(self.out(y))

    def _attn_dropout_p(self) -> float:
        return self.attn_dropout if self.training else 0.0

    def _rows(self, x: Tensor, position_ids: Tensor):
        """q (B, S, Hq, D), k, v (B, S, Hkv, D) of x, rotated at position_ids (B, S)."""
        B, S, _ = x.shape
        Hq, Hkv, D = self.n_heads, self.n_kv_heads, self.head_dim
        q, k, v = self.qkv(x).split([Hq * D, Hkv * D, Hkv * D], dim=-1)
        q, k, v = q.view(B, S, Hq, D), k.view(B, S, Hkv, D), v.view(B, S, Hkv, D)
        if self.rotary is not None:
            q, k = self.rotary(q.transpose(1, 2), k.transpose(1, 2), position_ids=position_ids)
            q, k = q.transpose(1, 2), k.transpose(1, 2)       # (B, S, H, D)
        return q, k, v

    def _varlen(self, q: Tensor, k: Tensor, v: Tensor, packed: Packed, rel: dict) -> Tensor:
        """Packed documents (B, S, H, D) -> (B, S, Hq * D), each attending within itself (rel:
        the relative bias's rel_bias / rel_buckets, or nothing)."""
        B, S, Hq, D = q.shape
        n = packed.max_seqlen
        y = attention_varlen(q.reshape(B * S, Hq, D), k.flatten(0, 1), v.flatten(0, 1),
                             packed.cu_seqlens, packed.cu_seqlens, n, n, causal=self.causal,
                             window=self.window, softcap=self.softcap, scale=self.scale, backend=self.backend,
                             alibi_slopes=self.alibi() if self.alibi is not None else None,
                             dropout_p=self._attn_dropout_p(), **rel)  # (B*S, Hq, D)
        return y.view(B, S, Hq * D)

    def _packed(self, x: Tensor, packed: Packed, cache: Optional[KVCache],
                key_mask: Optional[Tensor], rel: dict) -> Tensor:
        if cache is not None or key_mask is not None or self.sparsity:
            raise ValueError("packed documents run without a KV cache, key_mask or block-sparse "
                             "layout (each document is its own sequence)")
        q, k, v = self._rows(x, packed.position_ids)          # positions within each document
        return self.dropout(self.out(self._varlen(q, k, v, packed, rel)))

    def _paged(self, x: Tensor, cache: PagedKVCache, packed: Optional[Packed], rel: dict) -> Tensor:
        """Prefill (packed prompts (1, T, d), written into empty caches) or one decoding step
        (x (B, 1, d): token b at position cache.seqlens[b], appended in place)."""
        if self.sparsity or not self.causal:
            raise ValueError("a paged KV cache serves causal attention without block sparsity")
        if packed is not None:
            q, k, v = self._rows(x, packed.position_ids)
            cu = packed.cu_seqlens.long()
            seq = torch.repeat_interleave(torch.arange(cu.numel() - 1, device=x.device), cu[1:] - cu[:-1],
                                          output_size=x.shape[1])
            cache.write(seq, packed.position_ids.flatten(), k[0], v[0])
            return self.dropout(self.out(self._varlen(q, k, v, packed, rel)))
        B = x.shape[0]
        q, k, v = self._rows(x, cache.seqlens.long()[:, None])  # (B, 1, H, D)
        y = attention_with_kvcache(q.transpose(1, 2), cache.k, cache.v, cache_seqlens=cache.seqlens,
                                   block_table=cache.block_table, k_new=k.transpose(1, 2),
                                   v_new=v.transpose(1, 2), causal=True, window=self.window,
                                   softcap=self.softcap, scale=self.scale, backend=self.backend,
                                   alibi_slopes=self.alibi() if self.alibi is not None else None, **rel)
        return self.dropout(self.out(y.transpose(1, 2).reshape(B, 1, -1)))  # (B, 1, d)

    def _cross(self, x: Tensor, context: Tensor, cache: Optional[KVCache],
               key_mask: Optional[Tensor]) -> Tensor:
        B, S, _ = x.shape
        Hq, Hkv, D = self.n_heads, self.n_kv_heads, self.head_dim
        if context.dim() != 3 or context.shape[0] != B or context.shape[-1] != self.d_model:
            raise ValueError(f"context must have shape ({B}, seq, {self.d_model}), got {tuple(context.shape)}")
        w, b = self.qkv.weight, self.qkv.bias
        q = nn.functional.linear(x, w[:Hq * D], None if b is None else b[:Hq * D])
        q = q.view(B, S, Hq, D).transpose(1, 2)              # (B, Hq, S, D)
        if cache is not None and cache.pos > 0:
            k, v = cache.k[:, :, :cache.pos], cache.v[:, :, :cache.pos]
        else:
            Sc = context.shape[1]
            kv = nn.functional.linear(context, w[Hq * D:], None if b is None else b[Hq * D:])
            k, v = kv.view(B, Sc, 2 * Hkv, D).transpose(1, 2).split([Hkv, Hkv], dim=1)  # (B, Hkv, Sc, D)
            if cache is not None:
                k, v = cache.update(k, v)
        y = attention(q, k, v, key_mask=key_mask, softcap=self.softcap, scale=self.scale,
                      dropout_p=self._attn_dropout_p(), backend=self.backend)
        y = y.transpose(1, 2).reshape(B, S, Hq * D)           # (B, S, Hq * D)
        return self.dropout(self.out(y))

    def extra_repr(self) -> str:
        parts = [f"d_model={self.d_model}", f"n_heads={self.n_heads}", f"n_kv_heads={self.n_kv_heads}",
                 f"causal={self.causal}", f"position={self.position!r}"]
        if self.window:
            parts.append(f"window={self.window}")
        if self.sparsity:
            parts.append(f"sparsity={self.sparsity}")
        return ", ".join(parts)
