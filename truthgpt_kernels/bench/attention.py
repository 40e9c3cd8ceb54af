"""Attention benchmark cases (the rows of the attention issues' target tables), each timed
against the PyTorch baseline its target names, in the same run.

CPU rows (issue #3, fp32 unless said; B1 H8 D64 unless said):
  dense S2048                   <= 1.0x SDPA
  causal S2048                  <= 1.0x SDPA(is_causal=True)
  ALiBi causal S2048            >= 3x faster than SDPA with the equivalent float bias mask;
                                <= 1.15x our plain causal
  T5 relative bias causal S2048 (issue #16) <= 1.2x our plain causal; >= 3x faster than SDPA
                                with the materialised bias (and compiled FlexAttention's score_mod)
  dropout 0.1 fwd+bwd causal S1024 (issue #16) <= 1.3x our fwd+bwd without dropout
  window (256, 0) S8192         >= 10x faster than SDPA with the equivalent bool mask
  bigbird ~10% density S4096    <= 1.5 x density x our dense time (same shape)
  fwd+bwd causal S1024          <= 1.0x SDPA fwd+bwd
  decode Sq1 Sk4096 Hq32 Hkv8 D128   <= 1.0x SDPA(enable_gqa=True)
  bf16 forward S2048            >= 1.5x faster than our fp32 forward
  paged decode, 16 sequences 512..8192, page 64, Hq32 Hkv8 D128: tk.attention_with_kvcache
                                paged >= 0.9x its contiguous-cache speed; vs tk.attention
                                and SDPA over the padded cache with a key mask
  T5 decode, B8 H12 D64, caches of 2048 (quick: 256), T5 relative bias (decoder buckets):
                                tk.attention_with_kvcache(rel_bias=) <= 1.2x it without the bias;
                                vs SDPA with the float bias built from the table (HF T5's step)
plus the machine's fp32 GEMM rate (torch.mm) as the ceiling for GFLOP/s.
Peak memory of forward + backward at S8192 (<= 1/8 of eager attention) is measured in
subprocesses: `python -m truthgpt_kernels.bench.attention --memory`.
`python -m truthgpt_kernels.bench.attention --interleaved` times the same cases alternating
the implementations call by call (fairer ratios on a machine shared with other jobs);
`--cpu-time` does so on one thread timed by its CPU time (per-core efficiency).

GPU rows (issue #4, the Triton kernels; bf16, B 4, H 32, D 128, S 1024..16384):
- dense, causal and not, forward and forward+backward, against
  F.scaled_dot_product_attention restricted to its flash backend;
- ALiBi (causal) and a sliding window (1024 left, causal), against our own dense causal kernel;
- a block-sparse local layout (density ~ 5 blocks of 128 per row), against our dense kernel.

`flops` counts the multiply-adds of the visible score entries of "ours" (2 matmuls of
2 S_visible D flops forward; backward 2.5x forward), the usual flash-attention convention, so
each row's rate reads as ours' useful FLOP/s; for the window and sparse cases the baseline
does more work than that count, which is the point of those cases.
"""
import math
import subprocess
import sys

import torch
import torch.nn.functional as F

import truthgpt_kernels as tk
from truthgpt_kernels import sparse

from . import Case, fwd_bwd


def _flops(B, H, Sq, Sk, D, pairs=None, bwd=False):
    """Matmul FLOPs over the visible (query, key) pairs: 4 D per pair forward (QK^T, PV),
    2.5x that for the backward (the flash-attention convention)."""
    pairs = Sq * Sk if pairs is None else pairs
    f = 4.0 * B * H * pairs * D
    return f * 3.5 if bwd else f


def _causal_pairs(Sq, Sk):
    return sum(max(0, min(Sk, i + Sk - Sq + 1)) for i in range(Sq))


def _window_pairs(Sq, Sk, left, right):
    n = 0
    for i in range(Sq):
        p = i + Sk - Sq
        lo = 0 if left < 0 else max(0, p - left)
        hi = Sk - 1 if right < 0 else min(Sk - 1, p + right)
        n += max(0, hi - lo + 1)
    return n


def _qkv(B, Hq, Hkv, Sq, Sk, D, dtype=torch.float32, device="cpu", grad=False):
    q = torch.randn(B, Hq, Sq, D, dtype=dtype, device=device, requires_grad=grad)
    k = torch.randn(B, Hkv, Sk, D, dtype=dtype, device=device, requires_grad=grad)
    v = torch.randn(B, Hkv, Sk, D, dtype=dtype, device=device, requires_grad=grad)
    return q, k, v


def _alibi_bias(slopes, Sq, Sk, causal):
    i = torch.arange(Sq)[:, None] + (Sk - Sq)
    j = torch.arange(Sk)[None, :]
    bias = -slopes[:, None, None] * (i - j).abs().float()
    if causal:
        bias = bias.masked_fill(j > i, float("-inf"))
    return bias[None]


def _window_mask(Sq, Sk, left, right):
    i = torch.arange(Sq)[:, None] + (Sk - Sq)
    j = torch.arange(Sk)[None, :]
    m = torch.ones(Sq, Sk, dtype=torch.bool)
    if left >= 0:
        m &= j >= i - left
    if right >= 0:
        m &= j <= i + right
    return m


def _fwd_bwd(fn):
    return fwd_bwd(fn, ("q", "k", "v"), grad="do")


def cpu_cases(quick: bool):
    dev = "cpu"
    B, H, D = 1, 8, 64
    S = 256 if quick else 2048
    S_win = 1024 if quick else 8192
    S_bb = 512 if quick else 4096
    S_fb = 256 if quick else 1024
    Sk_dec = 512 if quick else 4096
    out = []

    def dense_setup(S=S, dtype=torch.float32):
        q, k, v = _qkv(B, H, H, S, S, D, dtype, dev)
        return {"q": q, "k": k, "v": v}

    out.append(Case(
        op="attention", name=f"fwd dense B{B} H{H} S{S} D{D} fp32", setup=dense_setup,
        impls={"truthgpt": lambda x: tk.attention(x["q"], x["k"], x["v"], backend="cpu"),
               "SDPA": lambda x: F.scaled_dot_product_attention(x["q"], x["k"], x["v"])},
        flops=_flops(B, H, S, S, D), extra={"target": "<= 1.0x SDPA"}))

    out.append(Case(
        op="attention", name=f"fwd causal B{B} H{H} S{S} D{D} fp32", setup=dense_setup,
        impls={"truthgpt": lambda x: tk.attention(x["q"], x["k"], x["v"], causal=True, backend="cpu"),
               "SDPA is_causal": lambda x: F.scaled_dot_product_attention(x["q"], x["k"], x["v"], is_causal=True)},
        flops=_flops(B, H, S, S, D, _causal_pairs(S, S)), extra={"target": "<= 1.0x SDPA"}))

    def alibi_setup():
        x = dense_setup()
        x["slopes"] = tk.alibi_slopes(H)
        x["bias"] = _alibi_bias(x["slopes"], S, S, causal=True)
        return x

    out.append(Case(
        op="attention", name=f"fwd ALiBi causal B{B} H{H} S{S} D{D} fp32", setup=alibi_setup,
        impls={"truthgpt": lambda x: tk.attention(x["q"], x["k"], x["v"], causal=True,
                                                  alibi_slopes=x["slopes"], backend="cpu"),
               "SDPA float bias": lambda x: F.scaled_dot_product_attention(x["q"], x["k"], x["v"],
                                                                          attn_mask=x["bias"]),
               "truthgpt causal no ALiBi": lambda x: tk.attention(x["q"], x["k"], x["v"], causal=True,
                                                                  backend="cpu")},
        flops=_flops(B, H, S, S, D, _causal_pairs(S, S)),
        extra={"target": ">= 3x faster than SDPA float bias; <= 1.15x our causal"}))

    out += _rel_bias_cases(B, H, S, D, dense_setup)
    out.append(_dropout_case(B, H, S_fb, D))

    def window_setup():
        x = dense_setup(S_win)
        x["mask"] = _window_mask(S_win, S_win, 256, 0)
        return x

    out.append(Case(
        op="attention", name=f"fwd window (256, 0) B{B} H{H} S{S_win} D{D} fp32", setup=window_setup,
        impls={"truthgpt": lambda x: tk.attention(x["q"], x["k"], x["v"], window=(256, 0), backend="cpu"),
               "SDPA bool mask": lambda x: F.scaled_dot_product_attention(x["q"], x["k"], x["v"],
                                                                         attn_mask=x["mask"])},
        flops=_flops(B, H, S_win, S_win, D, _window_pairs(S_win, S_win, 256, 0)),
        extra={"target": ">= 10x faster than SDPA bool mask"}))

    bs = 64
    layout = sparse.bigbird_layout(S_bb, block_size=bs, num_local_blocks=2, num_global_blocks=1,
                                   num_random_blocks=2, heads=H, seed=0)
    dens = sparse.density(layout)

    def bigbird_setup():
        x = dense_setup(S_bb)
        x["layout"] = layout
        dense = layout[:, :, :, None, :, None].expand(1, H, layout.shape[2], bs, layout.shape[3], bs)
        x["mask"] = dense.reshape(1, H, layout.shape[2] * bs, layout.shape[3] * bs)[:, :, :S_bb, :S_bb]
        return x

    out.append(Case(
        op="attention", name=f"fwd bigbird density {dens:.3f} B{B} H{H} S{S_bb} D{D} fp32", setup=bigbird_setup,
        impls={"truthgpt": lambda x: tk.attention(x["q"], x["k"], x["v"], block_mask=x["layout"],
                                                  block_size=bs, backend="cpu"),
               "truthgpt dense": lambda x: tk.attention(x["q"], x["k"], x["v"], backend="cpu"),
               "SDPA bool mask": lambda x: F.scaled_dot_product_attention(x["q"], x["k"], x["v"],
                                                                         attn_mask=x["mask"])},
        flops=_flops(B, H, S_bb, S_bb, D) * dens,
        extra={"density": dens, "target": "<= 1.5 x density x our dense time",
               "target_ratio_vs_dense": 1.5 * dens}))

    def fb_setup():
        q, k, v = _qkv(B, H, H, S_fb, S_fb, D, torch.float32, dev, grad=True)
        return {"q": q, "k": k, "v": v, "do": torch.randn(B, H, S_fb, D)}

    out.append(Case(
        op="attention", name=f"fwd+bwd causal B{B} H{H} S{S_fb} D{D} fp32", setup=fb_setup,
        impls={"truthgpt": _fwd_bwd(lambda x: tk.attention(x["q"], x["k"], x["v"], causal=True, backend="cpu")),
               "SDPA is_causal": _fwd_bwd(lambda x: F.scaled_dot_product_attention(x["q"], x["k"], x["v"],
                                                                                   is_causal=True))},
        flops=_flops(B, H, S_fb, S_fb, D, _causal_pairs(S_fb, S_fb), bwd=True),
        extra={"target": "<= 1.0x SDPA"}))

    def decode_setup():
        q, k, v = _qkv(1, 32, 8, 1, Sk_dec, 128, torch.float32, dev)
        return {"q": q, "k": k, "v": v}

    out.append(Case(
        op="attention", name=f"decode Sq1 Sk{Sk_dec} Hq32 Hkv8 D128 fp32", setup=decode_setup,
        impls={"truthgpt": lambda x: tk.attention(x["q"], x["k"], x["v"], causal=True, backend="cpu"),
               "SDPA enable_gqa": lambda x: F.scaled_dot_product_attention(x["q"], x["k"], x["v"],
                                                                          enable_gqa=True)},
        flops=_flops(1, 32, 1, Sk_dec, 128), bytes=2 * 8 * Sk_dec * 128 * 4,
        extra={"target": "<= 1.0x SDPA"}))

    out.append(_paged_decode_case(quick))
    out.append(_t5_decode_case(quick))

    def bf16_setup():
        x = dense_setup(S, torch.bfloat16)
        x.update({f"{n}32": x[n].float() for n in "qkv"})
        return x

    out.append(Case(
        op="attention", name=f"fwd dense B{B} H{H} S{S} D{D} bf16", setup=bf16_setup,
        impls={"truthgpt bf16": lambda x: tk.attention(x["q"], x["k"], x["v"], backend="cpu"),
               "truthgpt fp32": lambda x: tk.attention(x["q32"], x["k32"], x["v32"], backend="cpu"),
               "SDPA bf16": lambda x: F.scaled_dot_product_attention(x["q"], x["k"], x["v"])},
        flops=_flops(B, H, S, S, D), extra={"target": ">= 1.5x faster than our fp32"}))

    n = 512 if quick else 2048

    def mm_setup():
        return {"a": torch.randn(n, n), "b": torch.randn(n, n)}

    out.append(Case(
        op="attention", name=f"fp32 GEMM ceiling: torch.mm {n}^3", setup=mm_setup,
        impls={"torch.mm": lambda x: torch.mm(x["a"], x["b"])}, flops=2.0 * n ** 3))
    return out


def _t5_bias(table, Sq, Sk, buckets):
    """The materialised (1, H, Sq, Sk) T5 bias (causal: -inf above the diagonal)."""
    from truthgpt_kernels.ops import reference
    vec = reference.rel_bias_by_distance(table, Sq, Sk, *buckets)
    bias = reference._bias_matrix(vec, Sq, Sk)[None]
    return bias.masked_fill(~reference.attention_visibility(1, 1, Sq, Sk, causal=True), float("-inf"))


def _flex_t5(table, buckets, S):
    """Compiled FlexAttention with T5's bias as a score_mod (forward; None where it cannot run)."""
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError:
        return None
    from truthgpt_kernels.ops import reference
    bucket = reference.t5_relative_bucket(torch.arange(-(S - 1), S), *buckets)  # by j - i + S - 1

    def score_mod(score, b, h, qi, ki):
        return score + table[h, bucket[ki - qi + S - 1]]

    block_mask = create_block_mask(lambda b, h, qi, ki: qi >= ki, None, None, S, S, device="cpu")
    compiled = torch.compile(flex_attention, dynamic=False)
    return lambda x: compiled(x["q"], x["k"], x["v"], score_mod=score_mod, block_mask=block_mask)


def _rel_bias_cases(B, H, S, D, dense_setup):
    buckets = (False, 32, 128)
    table = torch.randn(H, 32, generator=torch.Generator().manual_seed(0))

    def setup():
        x = dense_setup()
        x["rel"] = table
        x["bias"] = _t5_bias(table, S, S, buckets)
        return x

    impls = {"truthgpt": lambda x: tk.attention(x["q"], x["k"], x["v"], causal=True, rel_bias=x["rel"],
                                                rel_buckets=buckets, backend="cpu"),
             "truthgpt causal no bias": lambda x: tk.attention(x["q"], x["k"], x["v"], causal=True, backend="cpu"),
             "SDPA float bias": lambda x: F.scaled_dot_product_attention(x["q"], x["k"], x["v"], attn_mask=x["bias"])}
    flex = _flex_t5(table, buckets, S)
    if flex is not None:
        impls["FlexAttention compiled score_mod"] = flex
    fwd = Case(op="attention", name=f"fwd T5 relative bias causal B{B} H{H} S{S} D{D} fp32", setup=setup,
               impls=impls, flops=_flops(B, H, S, S, D, _causal_pairs(S, S)),
               extra={"target": "<= 1.2x our causal; >= 3x faster than SDPA float bias"})
    S2 = S // 2

    def fb_setup():
        q, k, v = _qkv(B, H, H, S2, S2, D, torch.float32, "cpu", grad=True)
        return {"q": q, "k": k, "v": v, "do": torch.randn(B, H, S2, D),
                "rel": table.clone().requires_grad_(True)}

    def sdpa_bias(x):
        bias = x["rel"][:, _bucket_index(S2, buckets)][None].masked_fill(torch.ones(S2, S2, dtype=torch.bool).triu(1),
                                                                        float("-inf"))
        return F.scaled_dot_product_attention(x["q"], x["k"], x["v"], attn_mask=bias)

    fb = Case(op="attention", name=f"fwd+bwd T5 relative bias causal B{B} H{H} S{S2} D{D} fp32", setup=fb_setup,
              impls={"truthgpt": fwd_bwd(lambda x: tk.attention(x["q"], x["k"], x["v"], causal=True, rel_bias=x["rel"],
                                                               rel_buckets=buckets, backend="cpu"),
                                         ("q", "k", "v", "rel"), grad="do"),
                     "truthgpt causal no bias": _fwd_bwd(lambda x: tk.attention(x["q"], x["k"], x["v"], causal=True,
                                                                               backend="cpu")),
                     "SDPA float bias (learned table)": fwd_bwd(sdpa_bias, ("q", "k", "v", "rel"), grad="do")},
              flops=_flops(B, H, S2, S2, D, _causal_pairs(S2, S2), bwd=True),
              extra={"target": "<= 1.2x our causal (fwd+bwd)"})
    return [fwd, fb]


def _bucket_index(S, buckets):
    """(S, S) long: T5's bucket of j - i."""
    from truthgpt_kernels.ops import reference
    return reference.t5_relative_bucket(torch.arange(S)[None, :] - torch.arange(S)[:, None], *buckets)


def _dropout_case(B, H, S, D):
    def setup():
        q, k, v = _qkv(B, H, H, S, S, D, torch.float32, "cpu", grad=True)
        return {"q": q, "k": k, "v": v, "do": torch.randn(B, H, S, D)}

    return Case(
        op="attention", name=f"fwd+bwd dropout 0.1 causal B{B} H{H} S{S} D{D} fp32", setup=setup,
        impls={"truthgpt": _fwd_bwd(lambda x: tk.attention(x["q"], x["k"], x["v"], causal=True, dropout_p=0.1,
                                                           backend="cpu")),
               "truthgpt no dropout": _fwd_bwd(lambda x: tk.attention(x["q"], x["k"], x["v"], causal=True,
                                                                      backend="cpu")),
               "SDPA dropout": _fwd_bwd(lambda x: F.scaled_dot_product_attention(x["q"], x["k"], x["v"], is_causal=True,
                                                                                dropout_p=0.1))},
        flops=_flops(B, H, S, S, D, _causal_pairs(S, S), bwd=True),
        extra={"target": "<= 1.3x our fwd+bwd without dropout"})


def _paged_decode_case(quick: bool):
    """Paged decode (tk.attention_with_kvcache): 16 sequences of lengths 512..8192 (quick:
    64..1024) in pages of 64 in a random order, Hq 32 / Hkv 8, D 128, fp32. Against the same
    kernel on a contiguous cache (target: paged >= 0.9x its speed), and against tk.attention
    and SDPA over the contiguous cache padded to the longest sequence with a key mask."""
    B, Hq, Hkv, D, ps = 16, 32, 8, 128, 64
    lo, hi = (64, 1024) if quick else (512, 8192)
    lens = torch.linspace(lo, hi, B).round().to(torch.int32)
    lens = lens[torch.randperm(B, generator=torch.Generator().manual_seed(0))]

    def setup():
        q = torch.randn(B, Hq, 1, D)
        kc, vc = torch.randn(B, Hkv, hi, D), torch.randn(B, Hkv, hi, D)
        per_seq = [-(-int(n) // ps) for n in lens]
        perm = torch.randperm(sum(per_seq), generator=torch.Generator().manual_seed(1))
        bt = torch.zeros(B, max(per_seq), dtype=torch.int32)
        kp, vp = torch.empty(len(perm), ps, Hkv, D), torch.empty(len(perm), ps, Hkv, D)
        used = 0
        for b, n in enumerate(per_seq):
            pages = perm[used:used + n]
            used += n
            bt[b, :n] = pages.to(torch.int32)
            for cache, dense in ((kp, kc), (vp, vc)):  # tokens t of sequence b, page by page
                cache[pages] = dense[b, :, :n * ps].reshape(Hkv, n, ps, D).permute(1, 2, 0, 3)
        mask = torch.arange(hi)[None, :] < lens[:, None]
        return {"q": q, "kc": kc, "vc": vc, "kp": kp, "vp": vp, "bt": bt, "lens": lens,
                "mask": mask, "mask4": mask[:, None, None, :]}

    total = int(lens.sum())
    return Case(
        op="attention", name=f"paged decode B{B} lengths {lo}..{hi} page {ps} Hq{Hq} Hkv{Hkv} D{D} fp32",
        setup=setup,
        impls={"truthgpt paged": lambda x: tk.attention_with_kvcache(
                   x["q"], x["kp"], x["vp"], cache_seqlens=x["lens"], block_table=x["bt"], backend="cpu"),
               "truthgpt contiguous cache": lambda x: tk.attention_with_kvcache(
                   x["q"], x["kc"], x["vc"], cache_seqlens=x["lens"], backend="cpu"),
               "truthgpt attention key_mask": lambda x: tk.attention(
                   x["q"], x["kc"], x["vc"], key_mask=x["mask"], backend="cpu"),
               "SDPA bool mask enable_gqa": lambda x: F.scaled_dot_product_attention(
                   x["q"], x["kc"], x["vc"], attn_mask=x["mask4"], enable_gqa=True)},
        flops=4.0 * Hq * total * D, bytes=2.0 * Hkv * total * D * 4,
        extra={"target": "paged >= 0.9x the contiguous-cache speed"}, peak_memory=False)


def _t5_decode_case(quick: bool):
    """One decoding step of a T5 decoder layer's self-attention: B 8, H 12, D 64 (T5-base heads),
    every cache holding 2048 tokens (quick: 256) incl. the new one, fp32. tk.attention_with_kvcache
    with the table against itself without it, and against SDPA with the (B, H, 1, Sk) float bias
    gathered from the table at the step's positions (what transformers' T5 computes per step)."""
    B, H, D, buckets = 8, 12, 64, (False, 32, 128)
    Sk = 256 if quick else 2048

    def setup():
        g = torch.Generator().manual_seed(0)
        x = {"q": torch.randn(B, H, 1, D, generator=g), "kc": torch.randn(B, H, Sk, D, generator=g),
             "vc": torch.randn(B, H, Sk, D, generator=g), "rel": torch.randn(H, 32, generator=g)}
        x["lens"] = torch.full((B,), Sk, dtype=torch.int32)
        return x

    def sdpa_bias(x):
        from truthgpt_kernels.ops import reference
        bucket = reference.t5_relative_bucket(torch.arange(Sk) - (Sk - 1), *buckets)  # (Sk,): j - i'
        bias = x["rel"][:, bucket][None, :, None, :]                                # (1, H, 1, Sk)
        return F.scaled_dot_product_attention(x["q"], x["kc"], x["vc"], attn_mask=bias, scale=1.0)

    return Case(
        op="attention", name=f"T5 decode relative bias B{B} Sk{Sk} H{H} D{D} fp32", setup=setup,
        impls={"truthgpt kvcache": lambda x: tk.attention_with_kvcache(
                   x["q"], x["kc"], x["vc"], cache_seqlens=x["lens"], scale=1.0, rel_bias=x["rel"],
                   rel_buckets=buckets, backend="cpu"),
               "truthgpt kvcache no bias": lambda x: tk.attention_with_kvcache(
                   x["q"], x["kc"], x["vc"], cache_seqlens=x["lens"], scale=1.0, backend="cpu"),
               "SDPA float bias (from the table)": sdpa_bias},
        flops=4.0 * B * H * Sk * D, bytes=2.0 * B * H * Sk * D * 4,
        extra={"target": "<= 1.2x our kvcache without the bias; faster than SDPA with the float bias"},
        peak_memory=False)


def cases(device, quick):
    return gpu_cases(quick) if device == "cuda" else cpu_cases(quick)


# ----------------------------------------------------------------------------- GPU cases
GPU_B, GPU_H, GPU_D = 4, 32, 128
GPU_LENGTHS = (1024, 2048, 4096, 8192, 16384)
GPU_WINDOW_LEFT = 1024
GPU_SPARSE_BLOCK = 128


def _gpu_setup(S: int, **extra):
    def make():
        gen = torch.Generator(device="cuda").manual_seed(0)

        def t():
            x = torch.randn(GPU_B, GPU_H, S, GPU_D, device="cuda", dtype=torch.bfloat16, generator=gen)
            return x.requires_grad_(True)

        q, k, v = t(), t(), t()
        inputs = {"q": q, "k": k, "v": v, "do": torch.randn_like(q)}
        for name, fn in extra.items():
            inputs[name] = fn()
        return inputs
    return make


def _triton(**kw):
    def run(x):
        extra = {name: x[name] for name in ("alibi_slopes", "block_mask") if name in x}
        return tk.attention(x["q"], x["k"], x["v"], backend="triton", **kw, **extra)
    return run


def _sdpa_flash(causal: bool):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def run(x):
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(x["q"], x["k"], x["v"], is_causal=causal)
    return run


def _no_grad(fn):
    def run(x):
        with torch.no_grad():
            return fn(x)
    return run


def gpu_cases(quick: bool = False):
    """The H200 benchmark cases (device "cuda"); quick: S 1024 and 2048 only."""
    B, H, D, bs = GPU_B, GPU_H, GPU_D, GPU_SPARSE_BLOCK
    cases = []
    lengths = GPU_LENGTHS[:2] if quick else GPU_LENGTHS
    shape = f"bf16 B{B} H{H} D{D}"
    for S in lengths:
        full, causal_pairs = S * S, _causal_pairs(S, S)
        window_pairs = _window_pairs(S, S, GPU_WINDOW_LEFT, 0)
        for backward in (False, True):
            mode, wrap = ("fwd+bwd", _fwd_bwd) if backward else ("fwd", _no_grad)
            for causal in (False, True):
                cases.append(Case(
                    op="attention", name=f"{mode} S={S} {'causal' if causal else 'full'} {shape}",
                    setup=_gpu_setup(S),
                    impls={"truthgpt triton": wrap(_triton(causal=causal)),
                           "torch sdpa flash": wrap(_sdpa_flash(causal))},
                    flops=_flops(B, H, S, S, D, causal_pairs if causal else full, backward)))
            dense_causal = wrap(_triton(causal=True))
            cases.append(Case(
                op="attention", name=f"{mode} S={S} causal alibi {shape}",
                setup=_gpu_setup(S, alibi_slopes=lambda: tk.alibi_slopes(H, device="cuda")),
                impls={"truthgpt triton alibi": wrap(_triton(causal=True)),
                       "truthgpt triton dense": dense_causal},
                flops=_flops(B, H, S, S, D, causal_pairs, backward)))
            cases.append(Case(
                op="attention", name=f"{mode} S={S} causal window({GPU_WINDOW_LEFT}, 0) {shape}",
                setup=_gpu_setup(S),
                impls={"truthgpt triton window": wrap(_triton(causal=True, window=(GPU_WINDOW_LEFT, 0))),
                       "truthgpt triton dense": dense_causal},
                flops=_flops(B, H, S, S, D, window_pairs, backward)))
            if S >= 4096:
                def layout(S=S, device="cuda"):
                    return sparse.local_layout(S, block_size=bs, num_local_blocks=3, device=device)
                n_blocks = int(layout(device="cpu").sum())
                cases.append(Case(
                    op="attention", name=f"{mode} S={S} local block-sparse (bs {bs}, "
                                         f"{n_blocks} blocks) {shape}",
                    setup=_gpu_setup(S, block_mask=layout),
                    impls={"truthgpt triton sparse": wrap(_triton(block_size=bs)),
                           "truthgpt triton dense": wrap(_triton(causal=False))},
                    flops=_flops(B, H, S, S, D, n_blocks * bs * bs, backward)))
    return cases


# ----------------------------------------------------------------------------- peak memory
_MEM_SCRIPT = r"""
import resource, sys, torch
import truthgpt_kernels as tk
impl, B, H, S, D = sys.argv[1], *map(int, sys.argv[2:6])


def status_kib(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key + ":"))


def reset_peak():
    # Linux: writing 5 to clear_refs resets the peak RSS (VmHWM) to the current RSS
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def run(B, H, S, D):
    q, k, v = (torch.randn(B, H, S, D, requires_grad=True) for _ in range(3))
    do = torch.randn(B, H, S, D)
    exact = reset_peak()
    base = status_kib("VmRSS") if exact else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if impl == "truthgpt":
        out = tk.attention(q, k, v, causal=True, backend="cpu")
    else:  # eager: matmul, softmax, matmul
        s = (q @ k.transpose(-1, -2)) * D ** -0.5
        s = s.masked_fill(torch.ones(S, S, dtype=torch.bool).triu(1), float("-inf"))
        out = torch.softmax(s, -1) @ v
    torch.autograd.grad(out, (q, k, v), do)
    peak = status_kib("VmHWM") if exact else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak - base


run(1, 1, 256, D)  # first call: loads code pages and library buffers, not counted
print(run(B, H, S, D) * 1024)
"""


def peak_memory(B=1, H=2, S=8192, D=64):
    """Extra peak resident memory (bytes) of causal forward + backward (outputs and gradients
    included, inputs not), ours vs eager, each in a fresh subprocess after a small warm-up
    call (code pages and library buffers of a first call are not counted). Linux: the peak
    RSS (VmHWM) is reset right before the measured call; elsewhere ru_maxrss growth."""
    res = {}
    for impl in ("truthgpt", "eager"):
        r = subprocess.run([sys.executable, "-c", _MEM_SCRIPT, impl, str(B), str(H), str(S), str(D)],
                           capture_output=True, text=True, check=True)
        res[impl] = int(r.stdout.strip().splitlines()[-1])
    return res


def interleaved(quick=False, rounds=15, names=None, cpu_time=False):
    """Times the CPU cases alternating the implementations call by call (ours, baseline,
    ours, ...) and reports medians: on a shared machine the load then hits every
    implementation alike, unlike timing each one for a while in turn. cpu_time: one thread,
    timed by its CPU time (per-core efficiency, insensitive to preemption by other jobs)."""
    import statistics
    import time

    clock = time.perf_counter
    if cpu_time:
        torch.set_num_threads(1)
        clock = time.thread_time

    rows = []
    for case in cpu_cases(quick):
        if names and not any(n in case.name for n in names):
            continue
        x = case.setup()
        times = {name: [] for name in case.impls}
        for fn in case.impls.values():
            fn(x)
        for _ in range(rounds):
            for name, fn in case.impls.items():
                t0 = clock()
                fn(x)
                times[name].append((clock() - t0) * 1e3)
        ours = statistics.median(next(iter(times.values())))
        for name, t in times.items():
            med = statistics.median(t)
            rate = f"{case.flops / med / 1e6:.1f} GFLOP/s" if case.flops else ""
            rows.append((case.name, name, round(med, 3), round(med / ours, 2), rate))
        del x
    return rows


if __name__ == "__main__":
    if "--interleaved" in sys.argv or "--cpu-time" in sys.argv:
        from tabulate import tabulate
        cpu = "--cpu-time" in sys.argv
        print(tabulate(interleaved("--quick" in sys.argv, rounds=5 if cpu else 15, cpu_time=cpu),
                       headers=["case", "impl", "median ms" + (" (1 thread, CPU time)" if cpu else ""),
                                "ours speedup", "rate"], tablefmt="github"))
    if "--memory" in sys.argv:
        quick = "--quick" in sys.argv
        shape = dict(B=1, H=2, S=1024 if quick else 8192, D=64)
        mem = peak_memory(**shape)
        print(f"fwd+bwd causal {shape}: extra peak RSS truthgpt {mem['truthgpt'] / 2**20:.1f} MiB, "
              f"eager {mem['eager'] / 2**20:.1f} MiB, ratio {mem['truthgpt'] / max(mem['eager'], 1):.4f} "
              f"(target <= 0.125)")
