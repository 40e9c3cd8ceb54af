"""tk.attention(rel_bias=...): T5 relative position bias in the attention kernels, every
backend against the float64 reference (values, lse, dq/dk/dv and the bias table's gradient),
T5's bucket function as transformers writes it, SDPA with the materialised bias, determinism
of the bias gradient, bad input."""
import pytest
import torch
import torch.nn.functional as F

import truthgpt_kernels as tk
from truthgpt_kernels import backends
from truthgpt_kernels.ops import reference

from ..helpers import assert_close, backend_params, device_for, leaf
from .test_attention import ATOL

BACKENDS = backend_params("attention")
f32, bf16 = torch.float32, torch.bfloat16
DTYPES = {"reference": [f32], "cpu": [f32, bf16],
          "triton": [f32] if backends.triton_interpreted() else [f32, bf16], "cuda": [f32, bf16]}

# name: (B, Hq, Hkv, Sq, Sk, D, options); rel: (bidirectional, num_buckets, max_distance)
CASES = {
    "encoder": (2, 4, 4, 37, 37, 32, {"rel": (True, 32, 16)}),
    "decoder_causal": (2, 4, 2, 45, 45, 32, {"causal": True, "rel": (False, 32, 20)}),
    "cross_sq_lt_sk": (1, 2, 2, 9, 70, 16, {"rel": (True, 8, 40)}),
    "decode_row": (2, 4, 1, 1, 50, 64, {"causal": True, "rel": (False, 16, 32)}),
    "sq_gt_sk_window_alibi_softcap": (1, 4, 2, 40, 23, 32, {"causal": True, "rel": (False, 12, 30),
                                                             "window": (6, -1), "alibi": True,
                                                             "softcap": 5.0}),
    "key_mask_blocks": (2, 2, 2, 30, 41, 16, {"rel": (True, 16, 64), "key_mask": True, "blocks": True}),
}


def mask_options(o, B, Hq, Sk, g, device):
    """causal / window / softcap / ALiBi / key_mask keyword arguments of a case's options
    (shared with test_attention_dropout.py)."""
    kw = {"causal": o.get("causal", False), "window": o.get("window"), "softcap": o.get("softcap", 0.0)}
    if o.get("alibi"):
        kw["alibi_slopes"] = tk.alibi_slopes(Hq, device=device)
    if o.get("key_mask"):
        km = torch.rand(B, Sk, generator=g) > 0.3
        km[:, 0] = True
        kw["key_mask"] = km.to(device)
    return kw


def make_inputs(case, device, seed=0):
    B, Hq, Hkv, Sq, Sk, D, o = CASES[case]
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, S, D, generator=g, dtype=torch.float64)
               for H, S in ((Hq, Sq), (Hkv, Sk), (Hkv, Sk)))
    rel = torch.randn(Hq, o["rel"][1], generator=g, dtype=torch.float64) * 2
    kw = dict(mask_options(o, B, Hq, Sk, g, device), rel_buckets=o["rel"])
    if o.get("blocks"):
        kw["block_size"] = 8
        kw["block_mask"] = (torch.rand(B, Hq, -(-Sq // 8), -(-Sk // 8), generator=g) > 0.3).to(device)
    return [t.to(device) for t in (q, k, v, rel)], kw


def test_t5_bucket_matches_transformers():
    t5 = pytest.importorskip("transformers.models.t5.modeling_t5")
    rel = torch.arange(-300, 301)[None, :]
    for bidirectional in (True, False):
        for nb, md in ((32, 128), (16, 64), (8, 9), (12, 30)):
            ours = reference.t5_relative_bucket(rel, bidirectional, nb, md)
            theirs = t5.T5Attention._relative_position_bucket(rel, bidirectional=bidirectional,
                                                              num_buckets=nb, max_distance=md)
            assert torch.equal(ours, theirs), (bidirectional, nb, md)


def test_reference_matches_materialised_bias_sdpa():
    """The reference's bias is T5's: position_bias[h, i, j] = table[bucket(j - i), h] added to
    unscaled scores (T5 uses scale 1)."""
    (q, k, v, rel), _ = make_inputs("encoder", "cpu")
    Sq, Sk = q.shape[2], k.shape[2]
    bucket = reference.t5_relative_bucket(torch.arange(Sk)[None, :] - torch.arange(Sq)[:, None], True, 32, 16)
    bias = rel[:, bucket]  # (Hq, Sq, Sk)
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=1.0)
    got = reference.attention(q, k, v, scale=1.0, rel_bias=rel, rel_buckets=(True, 32, 16))
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("backend", BACKENDS)
def test_rel_bias_matches_reference(backend, case):
    device = device_for(backend)
    (q64, k64, v64, rel64), kw = make_inputs(case, device)
    for dtype in DTYPES[backend]:
        ins64 = [leaf(t) for t in (q64, k64, v64, rel64)]
        out64, lse64 = reference.attention(*ins64[:3], rel_bias=ins64[3], return_lse=True, **kw)
        do = torch.randn_like(out64)
        out64.backward(do)
        ins = [leaf(t, dtype) for t in (q64, k64, v64)] + [leaf(rel64, f32)]
        out, lse = tk.attention(*ins[:3], rel_bias=ins[3], return_lse=True, backend=backend, **kw)
        out.backward(do.to(dtype))
        base_ins = [leaf(t, dtype) for t in (q64, k64, v64)] + [leaf(rel64, f32)]
        base = reference.attention(*base_ins[:3], rel_bias=base_ins[3], **kw)
        base.backward(do.to(dtype))
        atol = 8 * ATOL[dtype]
        assert_close("out", out, out64.detach(), base.detach(), atol=atol)
        fin = torch.isfinite(lse64)
        torch.testing.assert_close(lse[fin].double(), lse64.detach()[fin].double(), rtol=1e-4 if dtype == f32 else 2e-2,
                                   atol=1e-4 if dtype == f32 else 5e-2)
        for name, a, r, b in zip(("dq", "dk", "dv"), ins, ins64, base_ins):
            assert_close(name, a.grad, r.grad, b.grad, atol=atol)
        # the table's gradient sums many dS terms: scale the tolerance by the sum's size
        drel_tol = (1e-4 if dtype == f32 else 5e-2) * max(1.0, ins64[3].grad.abs().max().item())
        assert ins[3].grad.dtype == f32
        torch.testing.assert_close(ins[3].grad.double(), ins64[3].grad, rtol=0, atol=drel_tol + 2 * (
            base_ins[3].grad.double() - ins64[3].grad).abs().max().item())


@pytest.mark.parametrize("backend", BACKENDS)
def test_rel_bias_grad_is_deterministic(backend):
    device = device_for(backend)
    (q, k, v, rel), kw = make_inputs("decoder_causal", device)
    grads = []
    for _ in range(2):
        r = leaf(rel, f32)
        out = tk.attention(q.float(), k.float(), v.float(), rel_bias=r, backend=backend, **kw)
        out.sum().backward()
        grads.append(r.grad)
    assert torch.equal(grads[0], grads[1])


def test_rel_bias_bad_input():
    q = torch.randn(1, 4, 8, 16)
    with pytest.raises(ValueError, match="rel_bias must have shape"):
        tk.attention(q, q, q, rel_bias=torch.zeros(3, 32))
    with pytest.raises(TypeError, match="rel_bias"):
        tk.attention(q, q, q, rel_bias=torch.zeros(4, 32, dtype=torch.int64))
    with pytest.raises(ValueError, match="rel_bias"):
        tk.attention(q, q, q, rel_bias=torch.zeros(4, 32, 1))
    with pytest.raises(ValueError, match="buckets"):
        tk.attention(q, q, q, rel_bias=torch.zeros(4, 32), rel_buckets=(True, 16, 128))
    with pytest.raises(ValueError, match="max_distance"):
        tk.attention(q, q, q, rel_bias=torch.zeros(4, 32), rel_buckets=(True, 32, 4))
    with pytest.raises(ValueError, match="rel_buckets"):
        tk.attention(q, q, q, rel_bias=torch.zeros(4, 32), rel_buckets=(True, 32))


# ---- the C++ CPU kernel's own paths (csrc/cpu/attention.cpp), rel_bias with and without
# dropout: row ISAs (TRUTHGPT_CPU_ATTN), both backward schedules (TRUTHGPT_ATTN_BWD; the
# two-pass one sums the bias gradient in chunks of query tiles), tiny tiles (many pieces per
# row, partial pieces), the split-key decode forward (TRUTHGPT_ATTN_SPLITK), float16/float64.
def cpu_atol(dtype):
    """8 x the shared grid's atol; float64: the backward recomputes P from the float32 lse the
    forward saves (as every backend), so its gradients are good to ~1e-7, not float64's 1e-8."""
    return 5e-6 if dtype == torch.float64 else 8 * ATOL[dtype]


CPU_ENVS = {
    "portable-single": {"TRUTHGPT_CPU_ATTN": "portable", "TRUTHGPT_ATTN_BWD": "single"},
    "portable-split-tiny": {"TRUTHGPT_CPU_ATTN": "portable", "TRUTHGPT_ATTN_BWD": "split",
                            "TRUTHGPT_ATTN_BQ": "16", "TRUTHGPT_ATTN_BK": "32"},
    "avx2-split": {"TRUTHGPT_CPU_ATTN": "avx2", "TRUTHGPT_ATTN_BWD": "split"},
    "auto-single-tiny": {"TRUTHGPT_ATTN_BWD": "single", "TRUTHGPT_ATTN_BQ": "8", "TRUTHGPT_ATTN_BK": "48"},
    "auto-splitk": {"TRUTHGPT_ATTN_SPLITK": "3", "TRUTHGPT_ATTN_BK": "32", "TRUTHGPT_ATTN_BWD": "split"},
}
# (B, Hq, Hkv, Sq, Sk, D, options)
CPU_SHAPES = {
    "prefill_all_options": (2, 4, 2, 45, 61, 32, {"causal": True, "softcap": 5.0, "alibi": True,
                                                   "key_mask": True, "blocks": True}),
    "decode_gqa": (2, 8, 2, 2, 150, 16, {"causal": True}),
    "cross_window": (1, 2, 1, 33, 20, 24, {"window": (7, 3)}),
}


def check_cpu_options(env, shape, monkeypatch, rel=True, dropout_p=0.0,
                      dtypes=(f32, bf16, torch.float16, torch.float64)):
    """tk.attention(backend="cpu") with rel_bias and/or dropout under `env`, against the float64
    reference (given the Philox keep mask): out, dq, dk, dv, d rel_bias."""
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    B, Hq, Hkv, Sq, Sk, D, o = shape
    g = torch.Generator().manual_seed(5)
    q64, k64, v64 = (torch.randn(B, H, S, D, generator=g, dtype=torch.float64)
                     for H, S in ((Hq, Sq), (Hkv, Sk), (Hkv, Sk)))
    kw = {"causal": o.get("causal", False), "window": o.get("window"), "softcap": o.get("softcap", 0.0)}
    if o.get("alibi"):
        kw["alibi_slopes"] = tk.alibi_slopes(Hq)
    if o.get("key_mask"):
        km = torch.rand(B, Sk, generator=g) > 0.3
        km[:, 0] = True
        kw["key_mask"] = km
    if o.get("blocks"):
        kw["block_size"] = 8
        kw["block_mask"] = torch.rand(B, Hq, -(-Sq // 8), -(-Sk // 8), generator=g) > 0.3
    table = torch.randn(Hq, 16, generator=g, dtype=torch.float64) * 2 if rel else None
    if rel:
        kw["rel_buckets"] = (not kw["causal"], 16, 40)
    seed = 1234
    keep = reference.dropout_keep_mask(seed, (B, Hq, Sq, Sk), dropout_p) if dropout_p > 0 else None
    ref_in = [leaf(t) for t in (q64, k64, v64)] + ([leaf(table)] if rel else [])
    out64 = reference.attention(*ref_in[:3], rel_bias=ref_in[3] if rel else None, dropout_p=dropout_p,
                                dropout_mask=keep, **kw)
    do = torch.randn(out64.shape, generator=g, dtype=torch.float64)
    out64.backward(do)
    for dtype in dtypes:
        tdt = torch.float64 if dtype == torch.float64 else f32
        ins = [leaf(t, dtype) for t in (q64, k64, v64)] + ([leaf(table, tdt)] if rel else [])
        out = tk.attention(*ins[:3], rel_bias=ins[3] if rel else None, dropout_p=dropout_p, dropout_seed=seed,
                           backend="cpu", **kw)
        out.backward(do.to(dtype))
        base_in = [leaf(t, dtype) for t in (q64, k64, v64)] + ([leaf(table, tdt)] if rel else [])
        base = reference.attention(*base_in[:3], rel_bias=base_in[3] if rel else None, dropout_p=dropout_p,
                                   dropout_mask=keep, **kw)
        base.backward(do.to(dtype))
        atol = cpu_atol(dtype)
        assert_close(f"out[{dtype}]", out, out64.detach(), base.detach(), atol=atol)
        for name, a, r, b in zip(("dq", "dk", "dv"), ins, ref_in, base_in):
            assert_close(f"{name}[{dtype}]", a.grad, r.grad, b.grad, atol=atol)
        if rel:
            assert ins[3].grad.dtype == tdt
            tol = {f32: 1e-4, torch.float64: 5e-6}.get(dtype, 5e-2) * max(1.0, ref_in[3].grad.abs().max().item())
            torch.testing.assert_close(ins[3].grad.double(), ref_in[3].grad, rtol=0, atol=tol + 2 * (
                base_in[3].grad.double() - ref_in[3].grad).abs().max().item())


@pytest.mark.parametrize("env", list(CPU_ENVS))
@pytest.mark.parametrize("shape", list(CPU_SHAPES))
@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
def test_cpu_kernel_paths(monkeypatch, env, shape, dropout_p):
    if not backends.implements("attention", "cpu"):
        pytest.skip("the C++ CPU attention kernel is not built")
    check_cpu_options(CPU_ENVS[env], CPU_SHAPES[shape], monkeypatch, dropout_p=dropout_p)


@pytest.mark.parametrize("bwd", ["single", "split"])
def test_cpu_rel_bias_grad_deterministic_schedules(monkeypatch, bwd):
    """The bias gradient is summed in per-work-item buffers, reduced in a fixed order: bitwise
    equal run to run in both backward schedules, with many tiles and chunks."""
    if not backends.implements("attention", "cpu"):
        pytest.skip("the C++ CPU attention kernel is not built")
    monkeypatch.setenv("TRUTHGPT_ATTN_BWD", bwd)
    monkeypatch.setenv("TRUTHGPT_ATTN_BQ", "16")
    monkeypatch.setenv("TRUTHGPT_ATTN_BK", "32")
    (q, k, v, rel), kw = make_inputs("decoder_causal", "cpu")
    grads = []
    for _ in range(3):
        r = leaf(rel, f32)
        tk.attention(q.float(), k.float(), v.float(), rel_bias=r, backend="cpu", **kw).sum().backward()
        grads.append(r.grad)
    assert torch.equal(grads[0], grads[1]) and torch.equal(grads[0], grads[2])


@pytest.mark.parametrize("backend", BACKENDS)
def test_rel_bias_table_stays_float32_under_autocast(backend):
    """Under bf16 autocast the table is gathered in float32 (the one-hot product was rounded to
    bfloat16 by autocast: up to 0.03 off for |bias| ~ 10): the result equals the explicit bf16
    call's, values, dq and the table's gradient."""
    device = device_for(backend)
    (q, k, v, rel), kw = make_inputs("decoder_causal", device)
    rel = rel * 10
    results = []
    for autocast in (False, True):
        ins = [leaf(t, bf16) for t in (q, k, v)] + [leaf(rel, f32)]
        with torch.autocast(torch.device(device).type, dtype=bf16, enabled=autocast):
            out = tk.attention(*ins[:3], rel_bias=ins[3], backend=backend, **kw)
        out.float().square().sum().backward()
        results.append([out.detach()] + [t.grad for t in ins])
    for name, a, b in zip(("out", "dq", "dk", "dv", "drel"), *results):
        torch.testing.assert_close(b, a, rtol=0, atol=0, msg=lambda m: f"{name}: {m}")
    assert reference.rel_bias_by_distance(rel, 5, 7, False, 32, 20).dtype == rel.dtype


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("Sq,Sk", [(0, 0), (0, 5), (3, 0)])
def test_rel_bias_empty_sequences(backend, Sq, Sk):
    """Empty queries or keys with a bias table: an empty (or zero) output and a zero table
    gradient, as without the table (Sq = Sk = 0 made the table's length -1)."""
    device = device_for(backend)
    q = torch.randn(1, 2, Sq, 8, device=device, requires_grad=True)
    k = torch.randn(1, 2, Sk, 8, device=device, requires_grad=True)
    v = torch.randn(1, 2, Sk, 8, device=device, requires_grad=True)
    table = torch.randn(2, 8, device=device, requires_grad=True)
    out = tk.attention(q, k, v, rel_bias=table, backend=backend)
    assert out.shape == (1, 2, Sq, 8)
    torch.testing.assert_close(out, tk.attention(q, k, v, backend=backend))
    out.sum().backward()
    assert torch.equal(table.grad, torch.zeros_like(table))
