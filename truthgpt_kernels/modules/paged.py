"""Paged KV cache for decoding a batch of prompts of different lengths together (issue #15):
each layer keeps a pool of pages (num_pages, page_size, Hkv, D); a block table maps sequence
b's token t to page block_table[b, t // page_size], slot t % page_size, as vLLM / FlashInfer /
flash-attn's `flash_attn_with_kvcache` do. Prompts are prefilled together as packed documents
(tk.attention_varlen) and each decoding step appends one token per sequence in place
(tk.attention_with_kvcache)."""
import math
from dataclasses import dataclass
from typing import List, Sequence

import torch
from torch import Tensor


@dataclass
class PagedKVCache:
    """One layer's pages, sharing block_table (B, max_pages) int32 and seqlens (B,) int32 (the
    tokens cached per sequence, advanced in place by the caller) with the other layers."""
    k: Tensor
    v: Tensor
    block_table: Tensor
    seqlens: Tensor

    @property
    def page_size(self) -> int:
        return self.k.shape[1]

    def write(self, seq: Tensor, pos: Tensor, k: Tensor, v: Tensor) -> None:
        """Stores k, v (T, Hkv, D) of tokens at positions pos (T,) of sequences seq (T,)."""
        page = self.block_table[seq, pos // self.page_size].long()
        slot = pos % self.page_size
        self.k[page, slot] = k
        self.v[page, slot] = v


def make_paged_caches(n_layers: int, capacities: Sequence[int], n_kv_heads: int, head_dim: int, *,
                      page_size: int = 64, device=None, dtype=None) -> List[PagedKVCache]:
    """Caches for n_layers layers holding capacities[b] tokens for sequence b; pages are handed
    out in order (sequence 0's first, ...), never shared."""
    pages = [math.ceil(c / page_size) for c in capacities]
    table = torch.zeros(len(pages), max(pages), dtype=torch.int32, device=device)
    first = 0
    for b, n in enumerate(pages):
        table[b, :n] = torch.arange(first, first + n, dtype=torch.int32, device=device)
        first += n
    seqlens = torch.zeros(len(pages), dtype=torch.int32, device=device)
    shape = (first, page_size, n_kv_heads, head_dim)
    return [PagedKVCache(torch.zeros(shape, device=device, dtype=dtype),
                         torch.zeros(shape, device=device, dtype=dtype), table, seqlens)
            for _ in range(n_layers)]
