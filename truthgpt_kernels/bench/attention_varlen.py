"""Packed variable-length attention (issue #15), CPU, fp32, causal, H 8, D 64:

  varlen fwd+bwd, 8 documents of 64..2048 tokens, 8192 in all
      >= 3x SDPA with the equivalent block-diagonal causal mask, and
      <= 1.1x our tk.attention called once per document;
  forward also against compiled FlexAttention with a document mask (the strongest masked
  baseline; FlexAttention has no backward on the CPU).
--quick runs the same mix scaled by 1/8 (1024 tokens)."""
import torch
import torch.nn.functional as F

import truthgpt_kernels as tk

from . import Case, fwd_bwd

LENGTHS = (64, 192, 384, 768, 1280, 1408, 2048, 2048)
H, D = 8, 64


def _flops(lengths, bwd=False):
    """Causal pairs of each document, 4 D flops a pair forward, 3.5x that for fwd+bwd."""
    return sum(4.0 * H * D * n * (n + 1) / 2 for n in lengths) * (3.5 if bwd else 1.0)


def cpu_cases(quick: bool):
    lengths = [max(8, n // 8) for n in LENGTHS] if quick else list(LENGTHS)
    T = sum(lengths)
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)
    doc = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))

    def setup():
        g = torch.Generator().manual_seed(0)
        q, k, v, do = (torch.randn(T, H, D, generator=g) for _ in range(4))
        x = {n: t.requires_grad_(n != "do") for n, t in zip(("q", "k", "v", "do"), (q, k, v, do))}
        x["cu"] = cu
        return x

    def varlen(x):
        return tk.attention_varlen(x["q"], x["k"], x["v"], x["cu"], x["cu"], max(lengths), max(lengths),
                                   causal=True, backend="cpu")

    def per_document(x):  # our dense kernel once per document, on (1, H, S, D) views
        outs, starts = [], x["cu"].tolist()
        for a, b in zip(starts, starts[1:]):
            view = [x[n][a:b].transpose(0, 1)[None] for n in "qkv"]
            outs.append(tk.attention(*view, causal=True, backend="cpu")[0].transpose(0, 1))
        return torch.cat(outs)

    def sdpa_block_diagonal(x):
        if "mask" not in x:
            same = doc[:, None] == doc[None, :]
            x["mask"] = same & torch.ones(T, T, dtype=torch.bool).tril()
        q, k, v = (x[n].transpose(0, 1)[None] for n in "qkv")
        return F.scaled_dot_product_attention(q, k, v, attn_mask=x["mask"])[0].transpose(0, 1)

    fwd = {"truthgpt varlen": varlen, "ours per document": per_document,
           "SDPA block-diagonal mask": sdpa_block_diagonal}
    flex = _flex(doc, T)  # FlexAttention has no CPU backward: forward rows only
    name = f"causal varlen {len(lengths)} docs {min(lengths)}..{max(lengths)} T{T} H{H} D{D} fp32"
    target = ">= 3x SDPA block-diagonal; <= 1.1x ours per document"
    return [
        Case(op="attention_varlen", name="fwd+bwd " + name, setup=setup,
             impls={k: fwd_bwd(f, ("q", "k", "v"), grad="do") for k, f in fwd.items()},
             flops=_flops(lengths, bwd=True), extra={"target": target, "dtype": "float32"}),
        Case(op="attention_varlen", name="fwd " + name, setup=lambda: _no_grad(setup()),
             impls={**fwd, **({"FlexAttention compiled (document mask)": flex} if flex else {})},
             flops=_flops(lengths), extra={"target": "faster than every baseline", "dtype": "float32"}),
    ]


def _no_grad(x):
    return {n: t.detach() for n, t in x.items()}


def _flex(doc, T):
    """Compiled FlexAttention with a causal document mask, or None where it cannot run."""
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError:
        return None

    def mask_mod(b, h, qi, ki):
        return (doc[qi] == doc[ki]) & (qi >= ki)

    block_mask = create_block_mask(mask_mod, None, None, T, T, device="cpu")
    compiled = torch.compile(flex_attention, dynamic=False)

    def run(x):
        q, k, v = (x[n].transpose(0, 1)[None] for n in "qkv")
        return compiled(q, k, v, block_mask=block_mask)[0].transpose(0, 1)
    return run


def cases(device, quick):
    return [] if device == "cuda" else cpu_cases(quick)
