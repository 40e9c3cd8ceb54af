"""Packed variable-length attention (issue #15), CPU, fp32, causal, H 8, D 64:

  varlen fwd+bwd, 8 documents of 64..2048 tokens, 8192 in all
      >= 3x SDPA with the equivalent block-diagonal causal mask, and
      <= 1.1x our tk.attention called once per document;
  forward also against compiled FlexAttention with a document mask (the strongest masked
  baseline; FlexAttention has no backward on the CPU).

  T5 relative bias in packed documents (half the mix, 4096 tokens; the table learned):
      fwd+bwd <= 1.2x our varlen without the bias, and against SDPA with the block-diagonal
      causal float bias built from the table (what a PyTorch user writes; its gradient reaches
      the table); forward also against compiled FlexAttention (document mask + T5 score_mod).
--quick runs the same mixes scaled by 1/8."""
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
    ] + _rel_bias_cases([max(8, n // 2) for n in lengths])


BUCKETS = (False, 32, 128)  # T5's decoder bucketing


def _rel_bias_cases(lengths):
    """varlen with a learned T5 table against our varlen without it, SDPA with the materialised
    block-diagonal causal bias, and (forward) compiled FlexAttention with a score_mod."""
    from truthgpt_kernels.ops import reference
    T, n = sum(lengths), max(lengths)
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)
    doc = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    visible = (doc[:, None] == doc[None, :]) & torch.ones(T, T, dtype=torch.bool).tril()
    bucket = reference.t5_relative_bucket(torch.arange(T)[None, :] - torch.arange(T)[:, None], *BUCKETS)  # (T, T)

    def setup():
        g = torch.Generator().manual_seed(0)
        x = {nm: torch.randn(T, H, D, generator=g).requires_grad_(nm != "do") for nm in ("q", "k", "v", "do")}
        x["rel"] = torch.randn(H, BUCKETS[1], generator=g).requires_grad_(True)
        return x

    def varlen(x, rel=True):
        kw = dict(rel_bias=x["rel"], rel_buckets=BUCKETS) if rel else {}
        return tk.attention_varlen(x["q"], x["k"], x["v"], cu, cu, n, n, causal=True, backend="cpu", **kw)

    def sdpa_bias(x):  # (1, H, T, T) float bias from the table, -inf across documents and above the diagonal
        bias = x["rel"][:, bucket].masked_fill(~visible, float("-inf"))[None]
        q, k, v = (x[nm].transpose(0, 1)[None] for nm in "qkv")
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias)[0].transpose(0, 1)

    names = ("q", "k", "v", "rel")
    name = f"T5 relative bias causal varlen {len(lengths)} docs {min(lengths)}..{n} T{T} H{H} D{D} fp32"
    impls = {"truthgpt varlen": fwd_bwd(varlen, names, grad="do"),
             "truthgpt varlen no bias": fwd_bwd(lambda x: varlen(x, rel=False), ("q", "k", "v"), grad="do"),
             "SDPA block-diagonal float bias": fwd_bwd(sdpa_bias, names, grad="do")}
    fwd = {"truthgpt varlen": varlen, "truthgpt varlen no bias": lambda x: varlen(x, rel=False),
           "SDPA block-diagonal float bias": sdpa_bias}
    flex = _flex_t5(doc, T)
    if flex is not None:
        fwd["FlexAttention compiled (document mask + T5 score_mod)"] = flex
    return [
        Case(op="attention_varlen", name="fwd+bwd " + name, setup=setup, impls=impls,
             flops=_flops(lengths, bwd=True), extra={"target": "<= 1.2x our varlen without the bias",
                                                     "dtype": "float32"}),
        Case(op="attention_varlen", name="fwd " + name, setup=lambda: _no_grad(setup()), impls=fwd,
             flops=_flops(lengths), extra={"target": "faster than every baseline", "dtype": "float32"}),
    ]


def _flex_t5(doc, T):
    """Compiled FlexAttention, causal document mask, T5's bias of j - i as a score_mod (within a
    document j - i is the distance of the positions); None where it cannot run."""
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError:
        return None
    from truthgpt_kernels.ops import reference
    bucket = reference.t5_relative_bucket(torch.arange(-(T - 1), T), *BUCKETS)  # by j - i + T - 1

    def mask_mod(b, h, qi, ki):
        return (doc[qi] == doc[ki]) & (qi >= ki)

    block_mask = create_block_mask(mask_mod, None, None, T, T, device="cpu")
    compiled = torch.compile(flex_attention, dynamic=False)

    def run(x):
        table = x["rel"]

        def score_mod(score, b, h, qi, ki):
            return score + table[h, bucket[ki - qi + T - 1]]
        q, k, v = (x[nm].transpose(0, 1)[None] for nm in "qkv")
        return compiled(q, k, v, score_mod=score_mod, block_mask=block_mask)[0].transpose(0, 1)
    return run


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
