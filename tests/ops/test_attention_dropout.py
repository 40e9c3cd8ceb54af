"""tk.attention(dropout_p=...): Philox dropout in the attention kernels. The Philox stream
against Random123's known answer; the keep rate and the 1/(1-p) scaling; every backend against
the float64 reference given the same keep mask (forward, and the backward regenerating it);
same seed same result; bad input."""
import math

import pytest
import torch

import truthgpt_kernels as tk
from truthgpt_kernels import backends
from truthgpt_kernels.ops import reference

from ..helpers import assert_close, backend_params, device_for, leaf
from .test_attention import ATOL
from .test_attention_rel_bias import cpu_atol, mask_options

BACKENDS = backend_params("attention")
f32, bf16 = torch.float32, torch.bfloat16
DTYPES = {"reference": [f32], "cpu": [f32, bf16],
          "triton": [f32] if backends.triton_interpreted() else [f32, bf16], "cuda": [f32, bf16]}

# name: (B, Hq, Hkv, Sq, Sk, D, p, options)
CASES = {
    "dense": (2, 4, 4, 33, 33, 32, 0.1, {}),
    "causal_gqa": (1, 4, 2, 50, 50, 32, 0.3, {"causal": True}),
    "sq_lt_sk_alibi": (2, 2, 1, 7, 61, 16, 0.5, {"causal": True, "alibi": True}),
    "window_softcap_keymask": (1, 2, 2, 40, 40, 64, 0.2, {"window": (5, 5), "softcap": 4.0, "key_mask": True}),
    "rel_bias": (1, 2, 2, 24, 24, 16, 0.25, {"causal": True, "rel": True}),
}


def test_philox_known_answer():
    """Random123's kat_vectors for philox4x32_10: counter 0, key 0 and counter/key all ones
    (the latter needs c2, c3 != 0, so only the first is in our c2 = c3 = 0 stream)."""
    words = reference.philox_words(0, torch.tensor([0]))
    assert [int(w) for w in words] == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_keep_rate(p):
    n = 4 * 8 * 64 * 64
    keep = reference.dropout_keep_mask(1234, (4, 8, 64, 64), p)
    rate = keep.double().mean().item()
    assert abs(rate - (1 - p)) < 5 * math.sqrt(p * (1 - p) / n)
    other = reference.dropout_keep_mask(1235, (4, 8, 64, 64), p)
    assert not torch.equal(keep, other)


def make_inputs(case, device, seed=0):
    B, Hq, Hkv, Sq, Sk, D, p, o = CASES[case]
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, S, D, generator=g, dtype=torch.float64)
               for H, S in ((Hq, Sq), (Hkv, Sk), (Hkv, Sk)))
    kw = dict(mask_options(o, B, Hq, Sk, g, device), dropout_p=p, dropout_seed=42 + seed)
    if o.get("rel"):
        kw["rel_bias"] = torch.randn(Hq, 16, generator=g).to(device)
    return [t.to(device) for t in (q, k, v)], kw


@pytest.mark.parametrize("backend", BACKENDS)
def test_scaling_uniform_attention(backend):
    """q = 0: P is uniform over the keys, v = 1: each output is (kept keys / Sk) / (1 - p),
    whose mean over many rows is 1."""
    device = device_for(backend)
    B, H, S, D, p = 2, 4, 128, 16, 0.2
    q = torch.zeros(B, H, S, D, device=device)
    v = torch.ones(B, H, S, D, device=device)
    out = tk.attention(q, q, v, dropout_p=p, dropout_seed=7, backend=backend)
    keep = reference.dropout_keep_mask(7, (B, H, S, S), p, device)
    want = keep.float().mean(-1, keepdim=True).expand(B, H, S, D) / (1 - p)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    assert abs(out.mean().item() - 1.0) < 0.02


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("backend", BACKENDS)
def test_dropout_matches_reference_with_mask(backend, case):
    device = device_for(backend)
    (q64, k64, v64), kw = make_inputs(case, device)
    B, Hq, _, Sq, Sk, _, p, _ = CASES[case]
    keep = reference.dropout_keep_mask(kw["dropout_seed"], (B, Hq, Sq, Sk), p, device)
    rel64 = kw.pop("rel_bias", None)
    ref_kw = {n: x for n, x in kw.items() if n != "dropout_seed"}
    for dtype in DTYPES[backend]:
        ins64 = [leaf(t) for t in (q64, k64, v64)]
        r64 = None if rel64 is None else leaf(rel64.double())
        out64 = reference.attention(*ins64, dropout_mask=keep, rel_bias=r64, **ref_kw)
        do = torch.randn_like(out64)
        out64.backward(do)
        ins = [leaf(t, dtype) for t in (q64, k64, v64)]
        r = None if rel64 is None else leaf(rel64)
        out = tk.attention(*ins, backend=backend, rel_bias=r, **kw)
        out.backward(do.to(dtype))
        base_ins = [leaf(t, dtype) for t in (q64, k64, v64)]
        rb = None if rel64 is None else leaf(rel64)
        base = reference.attention(*base_ins, dropout_mask=keep, rel_bias=rb, **ref_kw)
        base.backward(do.to(dtype))
        atol = 8 * ATOL[dtype]
        assert_close("out", out, out64.detach(), base.detach(), atol=atol)
        for name, a, ref, b in zip(("dq", "dk", "dv"), ins, ins64, base_ins):
            assert_close(name, a.grad, ref.grad, b.grad, atol=atol)
        if r is not None:
            tol = (1e-4 if dtype == f32 else 5e-2) * max(1.0, r64.grad.abs().max().item())
            torch.testing.assert_close(r.grad.double(), r64.grad, rtol=0, atol=tol)


@pytest.mark.parametrize("backend", BACKENDS)
def test_same_seed_same_result(backend):
    device = device_for(backend)
    (q, k, v), kw = make_inputs("causal_gqa", device)
    q, k, v = q.float(), k.float(), v.float()
    a = tk.attention(q, k, v, backend=backend, **kw)
    b = tk.attention(q, k, v, backend=backend, **kw)
    c = tk.attention(q, k, v, backend=backend, **dict(kw, dropout_seed=kw["dropout_seed"] + 1))
    assert torch.equal(a, b) and not torch.equal(a, c)
    torch.manual_seed(3)  # no seed given: drawn from torch's generator
    d = tk.attention(q, k, v, backend=backend, **dict(kw, dropout_seed=None))
    torch.manual_seed(3)
    e = tk.attention(q, k, v, backend=backend, **dict(kw, dropout_seed=None))
    assert torch.equal(d, e)


def test_dropout_bad_input():
    q = torch.randn(1, 2, 8, 16)
    for p in (1.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="dropout_p"):
            tk.attention(q, q, q, dropout_p=p)
    with pytest.raises(ValueError, match="dropout_seed"):
        tk.attention(q, q, q, dropout_p=0.1, dropout_seed=-1)
    with pytest.raises(ValueError, match="dropout_seed must be <= 18446744073709551615"):
        tk.attention(q, q, q, dropout_p=0.1, dropout_seed=2 ** 64)


@pytest.mark.parametrize("backend", BACKENDS)
def test_full_64_bit_seeds(backend):
    """Any 64-bit Philox key is a seed (2**63 and up raised an OverflowError-like ValueError
    from int64 conversion); the mask is the reference's for the same 64 bits."""
    device = device_for(backend)
    B, H, Sq, Sk, p = 1, 2, 3, 37, 0.4
    q = torch.zeros(B, H, Sq, 40, device=device)
    k = torch.zeros(B, H, Sk, 40, device=device)
    v = torch.eye(Sk, 40, device=device).expand(B, H, Sk, 40).contiguous()
    masks = []
    for seed in (2 ** 63 - 1, 2 ** 63, 2 ** 64 - 1):
        out = tk.attention(q, k, v, dropout_p=p, dropout_seed=seed, backend=backend)
        keep = reference.dropout_keep_mask(seed, (B, H, Sq, Sk), p, device)
        assert torch.equal(out[..., :Sk] > 0, keep), seed
        masks.append(keep)
    assert not torch.equal(masks[0], masks[1]) and not torch.equal(masks[1], masks[2])


# ---- the C++ CPU kernel's own paths (csrc/cpu/attention.cpp)

@pytest.mark.parametrize("env", [{"TRUTHGPT_CPU_ATTN": "portable"}, {"TRUTHGPT_CPU_ATTN": "avx2"}, {},
                                 {"TRUTHGPT_ATTN_SPLITK": "3", "TRUTHGPT_ATTN_BK": "16"}],
                         ids=["portable", "avx2", "auto", "splitk"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_cpu_mask_is_the_reference_mask(monkeypatch, env, dtype):
    """q = 0 and v = identity: out[b, h, i, j] = keep[b, h, i, j] / (Sk (1 - p)), so the kept
    set read back from the output must be the reference's Philox mask exactly (Sk = 37: rows
    start at every offset within a Philox block)."""
    if not backends.implements("attention", "cpu"):
        pytest.skip("the C++ CPU attention kernel is not built")
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    B, H, Sq, Sk, p = 2, 3, 5, 37, 0.4
    q = torch.zeros(B, H, Sq, 40, dtype=dtype)
    k = torch.zeros(B, H, Sk, 40, dtype=dtype)
    v = torch.eye(Sk, 40, dtype=dtype).expand(B, H, Sk, 40).contiguous()
    out = tk.attention(q, k, v, dropout_p=p, dropout_seed=99, backend="cpu")
    keep = reference.dropout_keep_mask(99, (B, H, Sq, Sk), p)
    assert torch.equal(out[..., :Sk] > 0, keep)
    torch.testing.assert_close(out[..., :Sk].double(), keep.double() / (Sk * (1 - p)), rtol=1e-2, atol=0)


@pytest.mark.parametrize("env", [{"TRUTHGPT_CPU_ATTN": "portable", "TRUTHGPT_ATTN_BWD": "split"},
                                 {"TRUTHGPT_CPU_ATTN": "avx2", "TRUTHGPT_ATTN_BWD": "single"},
                                 {"TRUTHGPT_ATTN_BQ": "16", "TRUTHGPT_ATTN_BK": "32", "TRUTHGPT_ATTN_BWD": "split"}],
                         ids=["portable-split", "avx2-single", "tiny-split"])
@pytest.mark.parametrize("case", ["dense", "window_softcap_keymask"])
def test_cpu_dropout_paths(monkeypatch, env, case):
    """Dropout alone through the CPU kernel's row paths and backward schedules, float32 to
    float64 (the combined rel_bias cases: test_attention_rel_bias.test_cpu_kernel_paths)."""
    if not backends.implements("attention", "cpu"):
        pytest.skip("the C++ CPU attention kernel is not built")
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    (q64, k64, v64), kw = make_inputs(case, "cpu")
    B, Hq, _, Sq, Sk, _, p, _ = CASES[case]
    keep = reference.dropout_keep_mask(kw["dropout_seed"], (B, Hq, Sq, Sk), p)
    ref_kw = {n: x for n, x in kw.items() if n != "dropout_seed"}
    ins64 = [leaf(t) for t in (q64, k64, v64)]
    out64 = reference.attention(*ins64, dropout_mask=keep, **ref_kw)
    do = torch.randn_like(out64)
    out64.backward(do)
    for dtype in (torch.float32, torch.float16, torch.float64):
        ins = [leaf(t, dtype) for t in (q64, k64, v64)]
        out = tk.attention(*ins, backend="cpu", **kw)
        out.backward(do.to(dtype))
        base_ins = [leaf(t, dtype) for t in (q64, k64, v64)]
        base = reference.attention(*base_ins, dropout_mask=keep, **ref_kw)
        base.backward(do.to(dtype))
        atol = cpu_atol(dtype)
        assert_close("out", out, out64.detach(), base.detach(), atol=atol)
        for name, a, ref, b in zip(("dq", "dk", "dv"), ins, ins64, base_ins):
            assert_close(name, a.grad, ref.grad, b.grad, atol=atol)
