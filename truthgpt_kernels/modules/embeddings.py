"""Positions: RotaryEmbedding (cached cos/sin, scaling, partial rotary), ALiBi slopes, T5's
relative position bias, and absolute sinusoidal / learned position embeddings."""
import math
from typing import Optional, Tuple

import torch
from torch import Tensor, nn

from ..ops import alibi_slopes, apply_rotary_qk, embedding, rotary_cos_sin


class _Float32Tables(nn.Module):
    """A module whose computed tables (non-persistent buffers, float32 unless stated) stay
    exact when the model is cast with .to(dtype) / .half() / .bfloat16(): they are rebuilt
    in their own dtype instead of rounded."""

    def _build(self, device=None):
        raise NotImplementedError

    def _table(self, name: str, value: Tensor) -> None:
        if not hasattr(self, "_table_dtypes"):
            self._table_dtypes = {}
        self._table_dtypes[name] = value.dtype
        self.register_buffer(name, value, persistent=False)

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        tables = getattr(self, "_table_dtypes", {})
        changed = [n for n, dt in tables.items() if getattr(self, n).dtype != dt]
        if changed:
            self._build(device=getattr(self, changed[0]).device)
        return self


class RotaryEmbedding(_Float32Tables):
    """Rotary position embedding (Su et al. 2021) for q (B, Hq, S, D) and k (B, Hkv, S, D).

    cos/sin are computed once for `max_seq_len` positions (float32, grown on demand);
    `rotary_dim` < head_dim rotates only the first dims (partial rotary); `scaling` is
    tk.rotary_cos_sin's (linear, ntk or llama3)."""

    def __init__(self, head_dim: int, *, rotary_dim: Optional[int] = None, base: float = 10000.0,
                 scaling: Optional[dict] = None, max_seq_len: int = 2048, interleaved: bool = False,
                 backend: Optional[str] = None, device=None):
        super().__init__()
        self.head_dim = head_dim
        self.rotary_dim = head_dim if rotary_dim is None else rotary_dim
        if self.rotary_dim % 2 or not 2 <= self.rotary_dim <= head_dim:
            raise ValueError(f"rotary_dim must be even and in [2, {head_dim}], got {self.rotary_dim}")
        self.base, self.scaling, self.interleaved, self.backend = base, scaling, interleaved, backend
        self.max_seq_len = max_seq_len
        self.float64 = False  # float64 tables too, built on the first float64 input
        self._build(device)

    def _build(self, device=None):
        args = dict(base=self.base, scaling=self.scaling, device=device)
        cos, sin = rotary_cos_sin(self.max_seq_len, self.rotary_dim, **args)
        self._table("cos", cos)  # (max_seq_len, rotary_dim / 2) float32
        self._table("sin", sin)
        if self.float64:
            cos, sin = rotary_cos_sin(self.max_seq_len, self.rotary_dim, dtype=torch.float64, **args)
            self._table("cos64", cos)
            self._table("sin64", sin)

    def forward(self, q: Tensor, k: Tensor, *, offset: int = 0,
                position_ids: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        """Rotates q and k at positions offset + arange(S) (or position_ids)."""
        needed = offset + q.shape[2]
        if position_ids is None and needed > self.max_seq_len:
            self.max_seq_len = 2 ** math.ceil(math.log2(needed))
            self._build(self.cos.device)
        if q.dtype == torch.float64:
            if not self.float64:
                self.float64 = True
                self._build(self.cos.device)
            cos, sin = self.cos64, self.sin64
        else:
            cos, sin = self.cos, self.sin
        return apply_rotary_qk(q, k, cos, sin, interleaved=self.interleaved,
                               position_ids=position_ids, offset=offset, backend=self.backend)

    def extra_repr(self) -> str:
        return (f"head_dim={self.head_dim}, rotary_dim={self.rotary_dim}, base={self.base}, "
                f"scaling={self.scaling}, interleaved={self.interleaved}")


class AlibiSlopes(_Float32Tables):
    """The float32 (n_heads,) ALiBi slopes of Press et al. (2022), as a buffer."""

    def __init__(self, n_heads: int, device=None):
        super().__init__()
        self.n_heads = n_heads
        self._build(device)

    def _build(self, device=None):
        self._table("slopes", alibi_slopes(self.n_heads, device=device))

    def forward(self) -> Tensor:
        return self.slopes


def sinusoidal_table(n_positions: int, dim: int, base: float = 10000.0, device=None) -> Tensor:
    """(n_positions, dim): sin on even, cos on odd features (Vaswani et al. 2017)."""
    pos = torch.arange(n_positions, dtype=torch.float64, device=device)[:, None]
    inv = base ** (-torch.arange(0, dim, 2, dtype=torch.float64, device=device) / dim)
    table = torch.zeros(n_positions, dim, dtype=torch.float64, device=device)
    table[:, 0::2] = torch.sin(pos * inv)
    table[:, 1::2] = torch.cos(pos * inv[: dim // 2])
    return table.float()


class SinusoidalPositionalEmbedding(_Float32Tables):
    """Fixed absolute positions: forward(seq_len, offset) -> (seq_len, dim) float32."""

    def __init__(self, max_seq_len: int, dim: int, device=None):
        super().__init__()
        self.max_seq_len, self.dim = max_seq_len, dim
        self._build(device)

    def _build(self, device=None):
        self._table("table", sinusoidal_table(self.max_seq_len, self.dim, device=device))

    def forward(self, seq_len: int, offset: int = 0) -> Tensor:
        if offset + seq_len > self.max_seq_len:
            raise ValueError(f"positions up to {offset + seq_len} exceed max_seq_len {self.max_seq_len}")
        return self.table[offset:offset + seq_len]


class LearnedPositionalEmbedding(nn.Embedding):
    """Trained absolute positions: forward(seq_len, offset) -> (seq_len, dim)."""

    def __init__(self, max_seq_len: int, dim: int, device=None, dtype=None):
        super().__init__(max_seq_len, dim, device=device, dtype=dtype)

    def forward(self, seq_len: int, offset: int = 0) -> Tensor:  # type: ignore[override]
        if offset + seq_len > self.num_embeddings:
            raise ValueError(f"positions up to {offset + seq_len} exceed max_seq_len {self.num_embeddings}")
        return self.weight[offset:offset + seq_len]


class RelativePositionBias(nn.Module):
    """T5's relative position bias (Raffel et al. 2020): one learned scalar per (bucket, head),
    added in the attention kernel to the score of (i, j) at T5's bucket of j - i (exact buckets
    near, log-spaced ones up to max_distance, one beyond).

    Holds `relative_attention_bias`, an nn.Embedding(num_buckets, n_heads) as in transformers'
    T5Attention, so T5 weights load unchanged. One per attention stack (T5 computes it in the
    first layer and shares it): forward() returns (table (n_heads, num_buckets), buckets), what
    tk.attention takes as rel_bias= and rel_buckets=. bidirectional: True for an encoder, False
    for a causal decoder (T5's choice)."""

    def __init__(self, n_heads: int, num_buckets: int = 32, max_distance: int = 128, *,
                 bidirectional: bool = True, device=None, dtype=None):
        super().__init__()
        self.n_heads, self.num_buckets, self.max_distance = n_heads, num_buckets, max_distance
        self.bidirectional = bool(bidirectional)
        self.relative_attention_bias = nn.Embedding(num_buckets, n_heads, device=device, dtype=dtype)

    def forward(self) -> Tuple[Tensor, Tuple[bool, int, int]]:
        table = self.relative_attention_bias.weight.t()        # (n_heads, num_buckets)
        if table.dtype not in (torch.float32, torch.float64):  # the kernels add it in float32
            table = table.float()
        return table, (self.bidirectional, self.num_buckets, self.max_distance)

    def extra_repr(self) -> str:
        return (f"n_heads={self.n_heads}, num_buckets={self.num_buckets}, "
                f"max_distance={self.max_distance}, bidirectional={self.bidirectional}")


class Embedding(nn.Embedding):
    """nn.Embedding (same parameters, state dict and options) whose lookup runs tk.embedding:
    on the CPU its weight gradient skips the fresh zero-filled (num_embeddings, d) tensor of
    torch's backward. max_norm / scale_grad_by_freq / sparse keep nn.Embedding's path."""

    def forward(self, input: Tensor) -> Tensor:
        if self.max_norm is not None or self.scale_grad_by_freq or self.sparse:
            return super().forward(input)
        try:
            return embedding(input, self.weight, self.padding_idx)
        except (TypeError, ValueError):  # bad indices: torch's own exception, as nn.Embedding
            return super().forward(input)
