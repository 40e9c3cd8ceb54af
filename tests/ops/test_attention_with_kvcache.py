"""tk.attention_with_kvcache on every backend against a float64 ground truth built independently:
each sequence's keys/values gathered token by token into dense tensors, then tk.attention
(backend="reference"). Also the in-place append (exact cache contents after the call), unused
cache slots holding NaN that must never be read, and bad inputs (cache left unchanged)."""
import pytest
import torch

import truthgpt_kernels as tk
from truthgpt_kernels import backends

from ..helpers import assert_close, backend_params, device_for
from .test_attention import ATOL, eager_attention

BACKENDS = backend_params("attention_with_kvcache")
f32, bf16 = torch.float32, torch.bfloat16
DTYPES = {"reference": [f32], "cpu": [f32, bf16, torch.float16], "triton": [f32], "cuda": [f32, bf16]}


def make_case(B, Hq, Hkv, Sq, S_new, D, lens, cap, layout, dtype, device, *, gen_seed=0):
    """Returns a dict: q64, k_new64/v_new64 (or None), the logical float64 tokens of every
    sequence (B, Hkv, cap, D) (positions >= lens + S_new are NaN: never to be read), and the
    cache in `layout` ("contiguous", "strided" (a (B, S, H, D) buffer viewed as (B, H, S, D)),
    or "pagedN": page size N, pages in a random order, spare pages full of NaN)."""
    g = torch.Generator().manual_seed(gen_seed)
    lens = torch.tensor(lens, dtype=torch.int32)
    q64 = torch.randn(B, Hq, Sq, D, generator=g, dtype=torch.float64)
    kn = torch.randn(B, Hkv, S_new, D, generator=g, dtype=torch.float64) if S_new else None
    vn = torch.randn(B, Hkv, S_new, D, generator=g, dtype=torch.float64) if S_new else None
    logical = [torch.randn(B, Hkv, cap, D, generator=g, dtype=torch.float64) for _ in range(2)]
    for t in logical:
        for b in range(B):
            t[b, :, int(lens[b]) + S_new:] = float("nan")
    case = {"q64": q64, "k_new64": kn, "v_new64": vn, "lens": lens, "logical": logical, "block_table": None}
    if layout.startswith("paged"):
        ps = int(layout[5:])
        per_seq = -(-cap // ps)
        num_pages = B * per_seq + 3
        perm = torch.randperm(num_pages, generator=g)[: B * per_seq].reshape(B, per_seq).to(torch.int32)
        caches = []
        for t in logical:
            c = torch.full((num_pages, ps, Hkv, D), float("nan"), dtype=torch.float64)
            for b in range(B):
                for tok in range(cap):
                    c[perm[b, tok // ps], tok % ps] = t[b, :, tok]
            caches.append(c)
        case["block_table"] = perm.to(device)
    else:
        caches = [t.clone() for t in logical]
    case["caches"] = [c.to(dtype).to(device) for c in caches]
    if layout == "strided":
        case["caches"] = [c.transpose(1, 2).contiguous().transpose(1, 2) for c in case["caches"]]
    return case


def expected_caches(case, dtype):
    """The caches after the append, written token by token."""
    out = [c.clone() for c in case["caches"]]
    if case["k_new64"] is None:
        return out
    bt = case["block_table"]
    for c, new in zip(out, (case["k_new64"], case["v_new64"])):
        for b in range(new.shape[0]):
            for s in range(new.shape[2]):
                tok = int(case["lens"][b]) + s
                if bt is None:
                    c[b, :, tok] = new[b, :, s].to(dtype)
                else:
                    ps = c.shape[1]
                    c[int(bt[b, tok // ps]), tok % ps] = new[b, :, s].to(dtype)
    return out


def dense_kv(case, b, dtype=torch.float64):
    """Keys and values (1, Hkv, L_b, D) of sequence b: cached prefix, then the new tokens."""
    n = int(case["lens"][b])
    res = []
    for t, new in zip(case["logical"], (case["k_new64"], case["v_new64"])):
        kv = t[b:b + 1, :, :n].to(dtype).double()
        if new is not None:
            kv = torch.cat([kv, new[b:b + 1].to(dtype).double()], dim=2)
        res.append(kv.to(dtype))
    return res


# name: (B, Hq, Hkv, Sq, S_new, D, lens, cap, options)
CASES = {
    "decode_append": (4, 8, 2, 1, 1, 64, [0, 1, 37, 130], 160, {}),
    "decode_no_new": (4, 4, 4, 1, 0, 32, [0, 1, 17, 100], 128, {}),
    "prefill_empty_cache": (2, 4, 2, 20, 20, 32, [0, 0], 64, {}),
    "chunked_prefill_gqa": (3, 8, 2, 7, 7, 32, [0, 50, 93], 112, {}),
    "sq_gt_new_causal": (2, 4, 1, 5, 2, 32, [1, 40], 64, {}),
    "noncausal": (2, 4, 2, 3, 3, 32, [0, 61], 80, {"causal": False}),
    "window": (3, 4, 2, 6, 6, 32, [0, 30, 90], 112, {"window": (16, 0)}),
    "window_right_noncausal": (2, 4, 2, 4, 2, 32, [9, 70], 96, {"causal": False, "window": (8, 3)}),
    "alibi_heads": (2, 8, 2, 3, 3, 32, [5, 77], 96, {"alibi": "heads"}),
    "alibi_batch_heads_softcap": (3, 4, 4, 2, 1, 32, [0, 12, 99], 112, {"alibi": "batch_heads", "softcap": 4.0}),
    "d128_mqa": (2, 8, 1, 1, 1, 128, [63, 200], 256, {}),
}
LAYOUTS = ["contiguous", "strided", "paged16", "paged64", "paged48"]


def run_case(backend, name, layout, dtype):
    B, Hq, Hkv, Sq, S_new, D, lens, cap, opts = CASES[name]
    device = device_for(backend)
    case = make_case(B, Hq, Hkv, Sq, S_new, D, lens, cap, layout, dtype, device)
    kw = {"causal": opts.get("causal", True), "window": opts.get("window"), "softcap": opts.get("softcap", 0.0)}
    if opts.get("alibi") == "heads":
        kw["alibi_slopes"] = tk.alibi_slopes(Hq, device=device)
    elif opts.get("alibi") == "batch_heads":
        kw["alibi_slopes"] = torch.rand(B, Hq, device=device)
    if kw["softcap"]:
        case["q64"] = case["q64"] * 4
    q = case["q64"].to(dtype).to(device)
    new = {} if S_new == 0 else {"k_new": case["k_new64"].to(dtype).to(device),
                                 "v_new": case["v_new64"].to(dtype).to(device)}
    want_caches = expected_caches(case, dtype)
    k_cache, v_cache = case["caches"]
    seqlens = case["lens"].to(device)
    out = tk.attention_with_kvcache(q, k_cache, v_cache, cache_seqlens=seqlens,
                                    block_table=case["block_table"], backend=backend, **new, **kw)
    assert out.shape == q.shape and out.dtype == dtype
    for got, want, what in zip((k_cache, v_cache), want_caches, ("k_cache", "v_cache")):
        torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True, msg=f"{what} after the append")
    assert torch.equal(seqlens.cpu(), case["lens"]), "cache_seqlens must not change"
    for b in range(B):
        k64, v64 = dense_kv(case, b)
        kd, vd = dense_kv(case, b, dtype)
        slopes = kw.get("alibi_slopes")
        sl = None if slopes is None else slopes.expand(B, Hq)[b:b + 1]
        ref = tk.attention(case["q64"][b:b + 1].to(device), k64.to(device), v64.to(device), causal=kw["causal"],
                           window=kw["window"], softcap=kw["softcap"], alibi_slopes=sl, backend="reference")
        base = eager_attention(q[b:b + 1], kd.to(device), vd.to(device), causal=kw["causal"], window=kw["window"],
                               softcap=kw["softcap"], alibi_slopes=sl)
        assert_close(f"out[{dtype}, sequence {b}]", out[b:b + 1], ref, base, atol=ATOL[dtype])
    return out


@pytest.mark.parametrize("backend", [p for p in BACKENDS if p.values[0] != "triton"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("name", list(CASES))
def test_kvcache_matches_reference(backend, layout, name):
    for dtype in DTYPES[backend]:
        run_case(backend, name, layout, dtype)


TRITON_CASES = [("decode_append", "paged16"), ("chunked_prefill_gqa", "contiguous"),
                ("alibi_batch_heads_softcap", "paged64"), ("window", "paged48")]


@pytest.mark.parametrize("backend", [p for p in BACKENDS if p.values[0] == "triton"])
@pytest.mark.parametrize("name,layout", TRITON_CASES)
def test_kvcache_triton(backend, name, layout):
    for dtype in DTYPES[backend]:
        run_case(backend, name, layout, dtype)


@pytest.mark.parametrize("backend", [p for p in BACKENDS if p.values[0] in ("cpu", "reference")])
def test_kvcache_empty_rows_are_zero(backend):
    """Sequence 0 has no keys at all; under a window (0, 0) with Sq > L the early queries of
    sequence 1 sit at negative positions and see nothing either."""
    case = make_case(2, 2, 1, 4, 0, 16, [0, 2], 32, "paged16", f32, "cpu")
    out = tk.attention_with_kvcache(case["q64"].float(), *case["caches"], cache_seqlens=case["lens"],
                                    block_table=case["block_table"], backend=backend)
    assert torch.all(out[0] == 0) and torch.all(out[1, :, :2] == 0)
    assert torch.all(torch.isfinite(out)) and torch.all(out[1, :, 2:] != 0)


@pytest.mark.parametrize("backend", [p for p in BACKENDS if p.values[0] == "cpu"])
def test_kvcache_cpu_long_cache_split_is_deterministic(backend):
    """Few (sequence, head) items and long caches: the CPU kernel splits the keys and merges the
    partial softmaxes; the result must match and be bitwise reproducible."""
    case = make_case(1, 4, 1, 1, 1, 64, [3000], 3072, "paged64", f32, "cpu")
    q = case["q64"].float()
    kw = dict(cache_seqlens=case["lens"], block_table=case["block_table"], k_new=case["k_new64"].float(),
              v_new=case["v_new64"].float())
    outs = [tk.attention_with_kvcache(q, *case["caches"], backend=backend, **kw) for _ in range(2)]
    assert torch.equal(outs[0], outs[1])
    k64, v64 = dense_kv(case, 0)
    ref = tk.attention(case["q64"], k64, v64, causal=True, backend="reference")
    torch.testing.assert_close(outs[0].double(), ref, rtol=1e-5, atol=2e-6)


@pytest.mark.parametrize("backend", [p for p in BACKENDS if p.values[0] in ("cpu", "reference")])
def test_kvcache_nan_propagates(backend):
    case = make_case(2, 2, 1, 1, 1, 16, [5, 9], 16, "contiguous", f32, "cpu")
    k_cache, v_cache = case["caches"]
    v_cache[1, 0, 3, 2] = float("nan")  # one value: column 2 of sequence 1's rows
    k_cache[0, 0, 4, 5] = float("nan")   # a key: all of sequence 0's rows
    out = tk.attention_with_kvcache(case["q64"].float(), k_cache, v_cache, cache_seqlens=case["lens"],
                                    k_new=case["k_new64"].float(), v_new=case["v_new64"].float(), backend=backend)
    assert torch.isnan(out[1, ..., 2]).all() and torch.isfinite(out[1, ..., :2]).all()
    assert torch.isnan(out[0]).all()


# ------------------------------------------- flash-attn's options: rotary, cache_batch_idx, cache_leftpad, lse
def _rotate64(x, cos, sin, pos, interleaved):
    """Rotary embedding in float64 written out (independent of the kernels): x (B, H, S, D),
    pos (B, S) int64, cos/sin (P, R/2)."""
    half = cos.shape[1]
    c, s_ = cos.double()[pos][:, None], sin.double()[pos][:, None]  # (B, 1, S, R/2)
    x = x.double().clone()
    if interleaved:
        x1, x2 = x[..., 0:2 * half:2].clone(), x[..., 1:2 * half:2].clone()
        x[..., 0:2 * half:2], x[..., 1:2 * half:2] = x1 * c - x2 * s_, x2 * c + x1 * s_
    else:
        x1, x2 = x[..., :half].clone(), x[..., half:2 * half].clone()
        x[..., :half], x[..., half:2 * half] = x1 * c - x2 * s_, x2 * c + x1 * s_
    return x


# name: (layout, remap rows, leftpad, rotary (None / "neox" / "gptj"), options)
FLASH_CASES = {
    "rows_leftpad": ("contiguous", True, True, None, {}),
    "rows_strided_rotary": ("strided", True, False, "neox", {}),
    "leftpad_paged_rotary_gptj": ("paged16", False, True, "gptj", {}),
    "rows_leftpad_rotary_window_alibi": ("contiguous", True, True, "neox", {"window": (9, 0), "alibi": True}),
    "leftpad_noncausal_rotary": ("paged48", False, True, "neox", {"causal": False}),
}


def run_flash_case(backend, name, dtype):
    layout, remap, leftpad, rotary, opts = FLASH_CASES[name]
    B, Hq, Hkv, Sq, S_new, D, cap = 3, 4, 2, 3, 3, 32, 64
    lens = [4, 0, 40]
    device = device_for(backend)
    case = make_case(B, Hq, Hkv, Sq, S_new, D, lens, cap, layout, dtype, "cpu", gen_seed=7)
    g = torch.Generator().manual_seed(11)
    pad = torch.tensor([3, 0, 17], dtype=torch.int32) if leftpad else None
    if pad is not None:  # keys before the left padding are never to be read
        for t in case["logical"]:
            for b in range(B):
                t[b, :, :int(pad[b])] = float("nan")
        case = dict(case, caches=None)
        fresh = make_case(B, Hq, Hkv, Sq, S_new, D, lens, cap, layout, dtype, "cpu", gen_seed=7)
        case["caches"], case["block_table"] = fresh["caches"], fresh["block_table"]
        for c in case["caches"]:  # write the NaN padding into the physical cache too
            for b in range(B):
                for tok in range(int(pad[b])):
                    if case["block_table"] is None:
                        c[b, :, tok] = float("nan")
                    else:
                        ps = c.shape[1]
                        c[int(case["block_table"][b, tok // ps]), tok % ps] = float("nan")
    rows = None
    if remap:  # the cache holds B + 2 rows; sequence b lives in row rows[b], the others are NaN
        rows = torch.tensor([3, 0, 4], dtype=torch.int32)
        big = []
        for c in case["caches"]:
            full = torch.full((B + 2,) + tuple(c.shape[1:]), float("nan"), dtype=c.dtype)
            full[rows.long()] = c
            if layout == "strided":
                full = full.transpose(1, 2).contiguous().transpose(1, 2)
            big.append(full)
        case["caches"] = big
    kw = {"causal": opts.get("causal", True), "window": opts.get("window")}
    if opts.get("alibi"):
        kw["alibi_slopes"] = torch.rand(B, Hq, generator=g)
    cos = sin = None
    # the ground truth takes the inputs rounded to dtype (lse is compared without slack for rounding)
    q64, kn64 = case["q64"].to(dtype).double(), case["k_new64"].to(dtype).double()
    if rotary:
        cos, sin = tk.rotary_cos_sin(cap, 16)  # rotary dim 16 of 32: half the head dim passes through
        seq = case["lens"].long()[:, None]
        steps = kw["causal"] or kw["window"] is not None
        qpos = seq + (torch.arange(Sq) if steps else torch.zeros(Sq, dtype=torch.long))
        # the kernels rotate q and k_new in their dtype: the ground truth rotates the rounded inputs
        q64 = _rotate64(q64, cos, sin, qpos, rotary == "gptj").to(dtype).double()
        kn64 = _rotate64(kn64, cos, sin, seq + torch.arange(S_new), rotary == "gptj").to(dtype).double()
    to = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    k_cache, v_cache = (c.to(device) for c in case["caches"])
    out, lse = tk.attention_with_kvcache(
        case["q64"].to(dtype).to(device), k_cache, v_cache, cache_seqlens=case["lens"].to(device),
        block_table=None if case["block_table"] is None else case["block_table"].to(device),
        k_new=case["k_new64"].to(dtype).to(device), v_new=case["v_new64"].to(dtype).to(device),
        cache_batch_idx=None if rows is None else rows.to(device),
        cache_leftpad=None if pad is None else pad.to(device),
        rotary_cos=None if cos is None else cos.to(device), rotary_sin=None if sin is None else sin.to(device),
        rotary_interleaved=rotary == "gptj", return_lse=True, backend=backend, **to)
    assert out.shape == (B, Hq, Sq, D) and out.dtype == dtype and lse.shape == (B, Hq, Sq)
    assert lse.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    # the appended tokens sit in the right row / pages, at cache_seqlens[b] ..
    for b in range(B):
        for s in range(S_new):
            tok = int(case["lens"][b]) + s
            for cache, new in ((k_cache, kn64), (v_cache, case["v_new64"])):
                if case["block_table"] is None:
                    got = cache[b if rows is None else int(rows[b]), :, tok]
                else:
                    ps = cache.shape[1]
                    got = cache[int(case["block_table"][b, tok // ps]), tok % ps]
                torch.testing.assert_close(got.cpu().double(), new[b, :, s].to(dtype).double(),
                                           rtol=0, atol=2 * ATOL[dtype], msg=f"appended token {tok} of {b}")
    for b in range(B):
        start = 0 if pad is None else int(pad[b])
        n = int(case["lens"][b])
        kv = [torch.cat([t[b:b + 1, :, start:n].to(dtype).double(), new[b:b + 1].to(dtype).double()], 2)
              for t, new in zip(case["logical"], (kn64, case["v_new64"]))]
        sl = None if "alibi_slopes" not in kw else kw["alibi_slopes"][b:b + 1]
        ref, ref_lse = tk.attention(q64[b:b + 1], *kv, causal=kw["causal"], window=kw["window"],
                                    alibi_slopes=sl, return_lse=True, backend="reference")
        base = eager_attention(q64[b:b + 1].to(dtype), *(x.to(dtype) for x in kv), causal=kw["causal"],
                               window=kw["window"], alibi_slopes=sl)
        assert_close(f"{name} out[{dtype}, sequence {b}]", out[b:b + 1].cpu(), ref, base, atol=ATOL[dtype])
        # rotated inputs may round differently (by an ulp of dtype) in the kernels
        tol = ATOL[dtype] if rotary and dtype != f32 else 1e-5
        torch.testing.assert_close(lse[b:b + 1].cpu().double(), ref_lse.double(), rtol=tol, atol=tol,
                                   msg=f"{name} lse of sequence {b}")


@pytest.mark.parametrize("backend", [p for p in BACKENDS if p.values[0] != "triton"])
@pytest.mark.parametrize("name", list(FLASH_CASES))
def test_kvcache_flash_attn_options(backend, name):
    for dtype in DTYPES[backend]:
        run_flash_case(backend, name, dtype)


@pytest.mark.parametrize("backend", [p for p in BACKENDS if p.values[0] == "triton"])
@pytest.mark.parametrize("name", ["rows_leftpad", "leftpad_paged_rotary_gptj"])
def test_kvcache_flash_attn_options_triton(backend, name):
    run_flash_case(backend, name, f32)


@pytest.mark.parametrize("backend", [p for p in BACKENDS if p.values[0] in ("cpu", "reference")])
def test_kvcache_lse_of_empty_rows_and_int_seqlens(backend):
    """lse is -inf where a row sees nothing (an empty sequence; every key left-padded away), and
    an int cache_seqlens means that length for every sequence."""
    a = _inputs(False)
    a.update(k_new=None, v_new=None, cache_seqlens=torch.tensor([0, 5], dtype=torch.int32))
    a["cache_leftpad"] = torch.tensor([0, 5], dtype=torch.int32)
    out, lse = tk.attention_with_kvcache(**a, return_lse=True, backend=backend)
    assert torch.all(out == 0) and torch.all(lse == float("-inf"))
    b = _inputs(False)
    c = dict(b, k_cache=b["k_cache"].clone(), v_cache=b["v_cache"].clone())
    want = tk.attention_with_kvcache(**dict(b, cache_seqlens=torch.tensor([4, 4], dtype=torch.int32)),
                                     backend=backend)
    got = tk.attention_with_kvcache(**dict(c, cache_seqlens=4), backend=backend)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.testing.assert_close(c["k_cache"], b["k_cache"], rtol=0, atol=0)
    full = _inputs(True)  # None: the whole cache (3 pages of 4 tokens), as flash-attn's default
    full.update(k_new=None, v_new=None)
    want = tk.attention_with_kvcache(**dict(full, cache_seqlens=torch.tensor([12, 12], dtype=torch.int32)),
                                     backend=backend)
    torch.testing.assert_close(tk.attention_with_kvcache(**dict(full, cache_seqlens=None), backend=backend), want,
                               rtol=0, atol=0)


# ----------------------------------------------------------------------------- T5 relative position bias
# name: (B, Hq, Hkv, Sq, S_new, D, lens, cap, options); rel: rel_buckets (bidirectional,
# num_buckets, max_distance), None: the default (not causal, 16, 128). Small max_distance: the
# bucket (of a table of distinct random values) changes every few positions, so a bias read one
# position off moves the output far beyond the tolerances. leftpad: cache_leftpad; rows:
# cache_batch_idx (contiguous caches).
REL_CASES = {
    "decode_gqa": (3, 4, 2, 1, 1, 32, [0, 9, 40], 48, {"rel": (False, 8, 12)}),
    "chunked_prefill": (2, 8, 2, 5, 5, 32, [3, 30], 48, {"rel": (False, 16, 20)}),
    "cached_queries_sq_gt_len": (2, 4, 2, 3, 0, 32, [1, 33], 40, {"rel": (False, 8, 16)}),
    "noncausal_bidirectional": (2, 4, 4, 3, 2, 32, [7, 25], 40, {"causal": False, "rel": (True, 16, 10)}),
    "window_alibi_softcap": (2, 4, 2, 4, 4, 32, [10, 35], 48, {"window": (9, 0), "alibi": True, "softcap": 4.0,
                                                               "rel": (False, 12, 14)}),
    "leftpad_rows_default_buckets": (3, 4, 2, 2, 2, 32, [4, 0, 30], 40, {"leftpad": [3, 0, 11], "rows": True,
                                                                         "rel": None}),
}
REL_LAYOUTS = ["contiguous", "paged16", "paged6"]


def _token(cache, block_table, b, tok):
    """The (Hkv, D) slot view of token tok of sequence b (cache row b of a contiguous cache)."""
    if block_table is None:
        return cache[b, :, tok]
    ps = cache.shape[1]
    return cache[int(block_table[b, tok // ps]), tok % ps]


def rel_case_inputs(name, layout, dtype, *, gen_seed=3):
    """(kwargs of tk.attention_with_kvcache on the CPU, the case of make_case, the float64 table,
    the ground truth's options, cache_leftpad or None) of a REL_CASES case: keys before the left
    padding and unused cache rows hold NaN (never to be read)."""
    B, Hq, Hkv, Sq, S_new, D, lens, cap, o = REL_CASES[name]
    case = make_case(B, Hq, Hkv, Sq, S_new, D, lens, cap, layout, dtype, "cpu", gen_seed=gen_seed)
    g = torch.Generator().manual_seed(gen_seed + 1)
    buckets = o["rel"]
    table = torch.randn(Hq, 16 if buckets is None else buckets[1], generator=g, dtype=torch.float64) * 2
    opts = {"causal": o.get("causal", True), "window": o.get("window"), "softcap": o.get("softcap", 0.0),
            "rel_buckets": buckets,
            "alibi_slopes": torch.rand(B, Hq, generator=g) if o.get("alibi") else None}
    if opts["softcap"]:
        case["q64"] = case["q64"] * 4
    pad = torch.tensor(o["leftpad"], dtype=torch.int32) if "leftpad" in o else None
    k_cache, v_cache = case["caches"]
    for c in (k_cache, v_cache):
        for b in range(B):
            for tok in range(0 if pad is None else int(pad[b])):
                _token(c, case["block_table"], b, tok).fill_(float("nan"))
    rows = None
    if o.get("rows") and case["block_table"] is None:  # B + 1 cache rows; sequence b in row rows[b]
        rows = torch.tensor([3, 0, 2][:B], dtype=torch.int32)
        k_cache, v_cache = (torch.full((B + 1,) + tuple(c.shape[1:]), float("nan"), dtype=dtype).index_copy_(
            0, rows.long(), c) for c in (k_cache, v_cache))
    new = {} if S_new == 0 else {"k_new": case["k_new64"].to(dtype), "v_new": case["v_new64"].to(dtype)}
    kw = dict(q=case["q64"].to(dtype), k_cache=k_cache, v_cache=v_cache, cache_seqlens=case["lens"],
              block_table=case["block_table"], cache_batch_idx=rows, cache_leftpad=pad,
              rel_bias=table if dtype == torch.float64 else table.float(), **new, **opts)
    return kw, case, table, opts, pad


def rel_ground_truth(case, table, opts, pad, b, dtype=torch.float64):
    """(out, lse) of sequence b: tk.attention(backend="reference") with the table on the keys
    [cache_leftpad[b], L_b) gathered token by token (bottom-right alignment: the op's positions)."""
    start = 0 if pad is None else int(pad[b])
    k, v = (x[:, :, start:] for x in dense_kv(case, b, dtype))
    sl = None if opts["alibi_slopes"] is None else opts["alibi_slopes"][b:b + 1]
    return tk.attention(case["q64"][b:b + 1].to(dtype), k, v, causal=opts["causal"], window=opts["window"],
                        softcap=opts["softcap"], alibi_slopes=sl,
                        rel_bias=table if dtype == torch.float64 else table.float(),
                        rel_buckets=opts["rel_buckets"], return_lse=True, backend="reference")


def run_rel_case(backend, name, layout, dtype):
    device = device_for(backend)
    kw, case, table, opts, pad = rel_case_inputs(name, layout, dtype)
    kw = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in kw.items()}
    out, lse = tk.attention_with_kvcache(**kw, return_lse=True, backend=backend)
    assert out.shape == kw["q"].shape and out.dtype == dtype
    for b in range(out.shape[0]):
        ref, ref_lse = rel_ground_truth(case, table, opts, pad, b)
        base = rel_ground_truth(case, table, opts, pad, b, dtype)[0]  # the reference on the rounded inputs
        assert_close(f"{name} out[{dtype}, sequence {b}]", out[b:b + 1].cpu(), ref, base, atol=ATOL[dtype])
        assert torch.equal(torch.isinf(lse[b:b + 1].cpu()), torch.isinf(ref_lse)), "rows seeing nothing: lse -inf"
        if dtype in (f32, torch.float64):
            fin = torch.isfinite(ref_lse)
            tol = 1e-5 if dtype == f32 else 1e-10
            torch.testing.assert_close(lse[b:b + 1].cpu().double()[fin], ref_lse[fin], rtol=tol, atol=tol)


@pytest.mark.parametrize("backend", [p for p in BACKENDS if p.values[0] != "triton"])
@pytest.mark.parametrize("layout", REL_LAYOUTS)
@pytest.mark.parametrize("name", list(REL_CASES))
def test_kvcache_rel_bias(backend, layout, name):
    # (float64: the CPU kernel's double path, with a float64 vector)
    for dtype in DTYPES[backend] + ([torch.float64] if backend in ("cpu", "reference") else []):
        run_rel_case(backend, name, layout, dtype)


@pytest.mark.parametrize("backend", [p for p in BACKENDS if p.values[0] == "triton"])
@pytest.mark.parametrize("name,layout", [("decode_gqa", "paged16"), ("noncausal_bidirectional", "paged6"),
                                         ("window_alibi_softcap", "contiguous"),
                                         ("leftpad_rows_default_buckets", "contiguous")])
def test_kvcache_rel_bias_triton(backend, name, layout):
    run_rel_case(backend, name, layout, f32)


@pytest.mark.parametrize("backend", [p for p in BACKENDS if p.values[0] in ("cpu", "reference")])
def test_kvcache_rel_bias_long_cache(backend):
    """A long cache (the CPU kernel splits its keys into chunks, merged afterwards) with a bucket
    range as long: every chunk reads the bias at its own keys' distances."""
    B, Hq, Hkv, D, cap = 1, 4, 1, 64, 2048
    case = make_case(B, Hq, Hkv, 1, 1, D, [1900], cap, "paged64", f32, "cpu")
    table = torch.randn(Hq, 32, generator=torch.Generator().manual_seed(2), dtype=torch.float64) * 2
    opts = {"causal": True, "window": None, "softcap": 0.0, "rel_buckets": (False, 32, 1500), "alibi_slopes": None}
    out = tk.attention_with_kvcache(case["q64"].float(), *case["caches"], cache_seqlens=case["lens"],
                                    block_table=case["block_table"], k_new=case["k_new64"].float(),
                                    v_new=case["v_new64"].float(), rel_bias=table.float(),
                                    rel_buckets=opts["rel_buckets"], backend=backend)
    ref = rel_ground_truth(case, table, opts, None, 0)[0]
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=2e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["decode_gqa", "noncausal_bidirectional"])
def test_kvcache_rel_bias_position_exact(backend, name):
    """The tests above would catch a bias read one position off, or not at all: the output is
    within 1e-4 of the ground truth and far from the ground truth with every distance one too
    small (a masked key appended after the keys moves the queries one position on), one too
    large (non-causal: an extra query row after the queries moves them one position back) and
    without the bias."""
    device = device_for(backend)
    kw, case, table, opts, pad = rel_case_inputs(name, "paged16", f32)
    out = tk.attention_with_kvcache(**{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in kw.items()},
                                    backend=backend).cpu().double()
    sl = opts["alibi_slopes"]
    assert sl is None and opts["window"] is None and not opts["softcap"]
    for b in range(out.shape[0]):
        k, v = dense_kv(case, b)
        q = case["q64"][b:b + 1]
        Sq, L = q.shape[2], k.shape[2]
        common = dict(causal=opts["causal"], rel_buckets=opts["rel_buckets"], backend="reference")
        ref = tk.attention(q, k, v, rel_bias=table, **common)
        torch.testing.assert_close(out[b:b + 1], ref, rtol=0, atol=1e-4)
        zero = torch.zeros_like(k[:, :, :1])
        key_mask = torch.arange(L + 1)[None, :] < L
        wrong = {"no bias": tk.attention(q, k, v, **dict(common, rel_buckets=None)),
                 "distances one too small": tk.attention(q, torch.cat([k, zero], 2), torch.cat([v, zero], 2),
                                                         key_mask=key_mask, rel_bias=table, **common)}
        if not opts["causal"]:
            wrong["distances one too large"] = tk.attention(torch.cat([q, q[:, :, :1]], 2), k, v, rel_bias=table,
                                                            **common)[:, :, :Sq]
        for what, w in wrong.items():
            if L > 1:  # (one key: softmax 1 whatever its bias)
                assert (out[b:b + 1] - w).abs().max() > 1e-2, f"sequence {b}: {what} is not told apart"


@pytest.mark.parametrize("backend", [p for p in BACKENDS if p.values[0] in ("cpu", "reference")])
def test_kvcache_rel_bias_under_compile(backend):
    """rel_bias (its vector by distance built in the graph) in a fullgraph compiled call, paged
    and contiguous with cache_leftpad."""
    for paged in (True, False):
        a = _inputs(paged)
        if not paged:
            a["cache_leftpad"] = torch.tensor([1, 2], dtype=torch.int32)
        q, k_cache, v_cache = a.pop("q"), a.pop("k_cache"), a.pop("v_cache")
        k_eager, v_eager = k_cache.clone(), v_cache.clone()
        kw = dict(rel_bias=torch.randn(4, 8), rel_buckets=(False, 8, 6), return_lse=True, backend=backend)
        want = tk.attention_with_kvcache(q, k_eager, v_eager, **a, **kw)
        fn = torch.compile(lambda *t, **k: tk.attention_with_kvcache(*t, **k, **kw), fullgraph=True)
        got = fn(q, k_cache, v_cache, **a)
        torch.testing.assert_close(got, want)
        assert torch.equal(k_cache, k_eager) and torch.equal(v_cache, v_eager)


def test_kvcache_cpu_kernel_checks_rel_bias():
    """The C++ kernel (what a compiled graph calls) checks the vector's shape and dtype itself."""
    if backends.unavailable_reason("cpu"):
        pytest.skip(backends.unavailable_reason("cpu"))
    a = _inputs(True)  # capacity 3 pages x 4 = 12, Sq 1: (Hq, 12)
    args = (a["q"], a["k_cache"], a["v_cache"], a["cache_seqlens"], a["block_table"], a["k_new"], a["v_new"],
            None, None, 0.5, -1, 0, None, 0.0)
    before = a["k_cache"].clone()
    for bad in (torch.zeros(4, 11), torch.zeros(3, 12), torch.zeros(4, 12, dtype=torch.float64)):
        with pytest.raises(RuntimeError, match=r"rel_bias must be Float \(Hq, Sq \+ cache capacity - 1\) = \(4, 12\)"):
            torch.ops.truthgpt.attention_with_kvcache_fwd(*args, bad)
    assert torch.equal(a["k_cache"], before)


# ----------------------------------------------------------------------------- bad inputs
def _inputs(paged=True):
    B, Hq, Hkv, D = 2, 4, 2, 8
    q = torch.randn(B, Hq, 1, D)
    if paged:
        k_cache, v_cache = torch.randn(6, 4, Hkv, D), torch.randn(6, 4, Hkv, D)
        bt = torch.tensor([[0, 1, 2], [3, 4, 5]], dtype=torch.int32)
    else:
        k_cache, v_cache = torch.randn(B, Hkv, 12, D), torch.randn(B, Hkv, 12, D)
        bt = None
    return dict(q=q, k_cache=k_cache, v_cache=v_cache, cache_seqlens=torch.tensor([3, 5], dtype=torch.int32),
                block_table=bt, k_new=torch.randn(B, Hkv, 2, D), v_new=torch.randn(B, Hkv, 2, D))


def _set(**changes):
    def f(a):
        for key, fn in changes.items():
            a[key] = fn(a)
        return a
    return f


BAD = [
    ("q rank", True, _set(q=lambda a: a["q"][0]), ValueError, "q must have 4 dimensions"),
    ("cache dtype", True, _set(k_cache=lambda a: a["k_cache"].double(), v_cache=lambda a: a["v_cache"].double()),
     TypeError, "k_cache must have the dtype of q"),
    ("k_new dtype", True, _set(k_new=lambda a: a["k_new"].half()), TypeError, "k_new must have the dtype of q"),
    ("v_cache shape", True, _set(v_cache=lambda a: a["v_cache"][:5]), ValueError, "v_cache must have shape"),
    ("seqlens dtype", True, _set(cache_seqlens=lambda a: a["cache_seqlens"].long()), TypeError,
     "cache_seqlens must have dtype int32"),
    ("seqlens shape", True, _set(cache_seqlens=lambda a: a["cache_seqlens"][:1]), ValueError,
     "cache_seqlens must have shape"),
    ("block_table dtype", True, _set(block_table=lambda a: a["block_table"].long()), TypeError,
     "block_table must have dtype int32"),
    ("block_table batch", True, _set(block_table=lambda a: a["block_table"][:1]), ValueError,
     "block_table must have shape"),
    ("batch", False, _set(k_cache=lambda a: a["k_cache"][:1], v_cache=lambda a: a["v_cache"][:1]), ValueError,
     "batch size of q"),
    ("head dim", False, _set(q=lambda a: a["q"][..., :4]), ValueError, "head dim of q"),
    ("heads", True, _set(q=lambda a: a["q"][:, :3]), ValueError, "multiple of k_cache/v_cache heads"),
    ("k_new alone", True, _set(v_new=lambda a: None), ValueError, "k_new and v_new must be given together"),
    ("k_new heads", True, _set(k_new=lambda a: a["k_new"][:, :1], v_new=lambda a: a["v_new"][:, :1]),
     ValueError, "k_new must have shape"),
    ("v_new shape", True, _set(v_new=lambda a: a["v_new"][:, :, :1]), ValueError, "v_new must have shape"),
    ("cache last stride", False, _set(k_cache=lambda a: a["k_cache"].transpose(2, 3).contiguous().transpose(2, 3)),
     ValueError, "k_cache must have a unit stride"),
    ("device", True, _set(k_cache=lambda a: a["k_cache"].to("meta")), ValueError, "k_cache must be on cpu"),
    ("negative seqlen", True, _set(cache_seqlens=lambda a: torch.tensor([3, -1], dtype=torch.int32)), ValueError,
     "cache_seqlens must be >= 0"),
    ("over capacity paged", True, _set(cache_seqlens=lambda a: torch.tensor([3, 11], dtype=torch.int32)), ValueError,
     r"cache_seqlens\[1\] \+ the 2 new tokens = 13 exceed the cache capacity of 12"),
    ("over capacity contiguous", False, _set(cache_seqlens=lambda a: torch.tensor([11, 0], dtype=torch.int32)),
     ValueError, r"cache_seqlens\[0\] .* capacity of 12"),
    ("page out of range", True, _set(block_table=lambda a: torch.tensor([[0, 6, 2], [3, 4, 5]], dtype=torch.int32)),
     ValueError, r"block_table\[0, 1\] = 6 is not a page index in \[0, 6\)"),
    ("negative page", True, _set(block_table=lambda a: torch.tensor([[0, 1, 2], [3, -4, 5]], dtype=torch.int32)),
     ValueError, r"block_table\[1, 1\] = -4"),
    ("alibi shape", True, lambda a: dict(a, alibi_slopes=torch.rand(3)), ValueError, "alibi_slopes must have shape"),
    ("window", True, lambda a: dict(a, window=(-2, 0)), ValueError, r"window\[0\] must be >= -1"),
    ("softcap", True, lambda a: dict(a, softcap=-1.0), ValueError, "softcap must be >= 0"),
    ("rows with pages", True, lambda a: dict(a, cache_batch_idx=torch.tensor([0, 1], dtype=torch.int32)),
     ValueError, "cache_batch_idx selects rows of a contiguous cache"),
    ("rows dtype", False, lambda a: dict(a, cache_batch_idx=torch.tensor([0, 1])), TypeError,
     "cache_batch_idx must have dtype int32"),
    ("rows out of range", False, lambda a: dict(a, cache_batch_idx=torch.tensor([0, 2], dtype=torch.int32)),
     ValueError, r"cache_batch_idx\[1\] = 2 is not a row of k_cache/v_cache \(expected \[0, 2\)\)"),
    ("rows repeated", False, lambda a: dict(a, cache_batch_idx=torch.tensor([1, 1], dtype=torch.int32)),
     ValueError, "cache_batch_idx must not repeat a cache row"),
    ("leftpad shape", True, lambda a: dict(a, cache_leftpad=torch.tensor([0], dtype=torch.int32)), ValueError,
     "cache_leftpad must have shape"),
    ("leftpad past seqlens", True, lambda a: dict(a, cache_leftpad=torch.tensor([0, 6], dtype=torch.int32)),
     ValueError, r"cache_leftpad\[1\] = 6 must lie in \[0, cache_seqlens\[1\] = 5\]"),
    ("leftpad negative", False, lambda a: dict(a, cache_leftpad=torch.tensor([-1, 0], dtype=torch.int32)),
     ValueError, r"cache_leftpad\[0\] = -1"),
    ("rotary alone", True, lambda a: dict(a, rotary_cos=torch.ones(16, 4)), ValueError,
     "rotary_cos and rotary_sin must be given together"),
    ("rotary without k_new", True, lambda a: dict(a, k_new=None, v_new=None, rotary_cos=torch.ones(16, 4),
                                                  rotary_sin=torch.zeros(16, 4)), ValueError, "they need k_new"),
    ("rotary too short", True, lambda a: dict(a, rotary_cos=torch.ones(6, 4), rotary_sin=torch.zeros(6, 4)),
     ValueError, r"cover 6 positions, but cache_seqlens \(max 5\) \+ 2 new positions need 7"),
    ("rotary too wide", True, lambda a: dict(a, rotary_cos=torch.ones(16, 5), rotary_sin=torch.zeros(16, 5)),
     ValueError, "exceeds the head dim"),
    ("seqlens negative int", True, lambda a: dict(a, cache_seqlens=-1), ValueError, "cache_seqlens must be >= 0"),
    ("rel_bias rows", True, lambda a: dict(a, rel_bias=torch.zeros(2, 8)), ValueError,
     r"rel_bias must have shape \(4, num_buckets\) \(one row per query head\), got \(2, 8\)"),
    ("rel_bias rank", False, lambda a: dict(a, rel_bias=torch.zeros(4, 8, 1)), ValueError,
     "rel_bias must have 2 dimensions"),
    ("rel_bias dtype", True, lambda a: dict(a, rel_bias=torch.zeros(4, 8, dtype=torch.bfloat16)), TypeError,
     "rel_bias must have dtype"),
    ("rel_bias device", True, lambda a: dict(a, rel_bias=torch.zeros(4, 8, device="meta")), ValueError,
     "rel_bias must be on cpu"),
    ("rel_buckets count", True, lambda a: dict(a, rel_bias=torch.zeros(4, 8), rel_buckets=(False, 16, 32)),
     ValueError, "rel_bias has 8 buckets but rel_buckets says 16"),
    ("rel_buckets bidirectional count", False, lambda a: dict(a, rel_bias=torch.zeros(4, 8), causal=False,
                                                              rel_buckets=(True, 6, 32)),
     ValueError, "rel_bias has 8 buckets but rel_buckets says 6"),
    ("rel_buckets form", True, lambda a: dict(a, rel_bias=torch.zeros(4, 8), rel_buckets=(False, 8)), ValueError,
     r"rel_buckets must be \(bidirectional, num_buckets, max_distance\)"),
    ("rel_buckets max_distance", True, lambda a: dict(a, rel_bias=torch.zeros(4, 8), rel_buckets=(False, 8, 4)),
     ValueError, r"rel_buckets\[2\] \(max_distance\) must be >= 5"),
]


@pytest.mark.parametrize("backend", [p for p in BACKENDS if p.values[0] in ("cpu", "reference")])
@pytest.mark.parametrize("name,paged,change,exc,match", BAD, ids=[b[0] for b in BAD])
def test_kvcache_bad_input(backend, name, paged, change, exc, match):
    a = change(_inputs(paged))
    before = [a["k_cache"].clone(), a["v_cache"].clone()] if a["k_cache"].device.type == "cpu" else None
    q, k_cache, v_cache = a.pop("q"), a.pop("k_cache"), a.pop("v_cache")
    with pytest.raises(exc, match=match):
        tk.attention_with_kvcache(q, k_cache, v_cache, backend=backend, **a)
    if before is not None:
        assert torch.equal(k_cache, before[0]) and torch.equal(v_cache, before[1]), "the cache changed"


def test_kvcache_unused_pages_unchecked():
    """Entries of block_table past the pages a sequence uses may hold anything (e.g. -1)."""
    a = _inputs(True)
    a["block_table"] = torch.tensor([[0, 1, -1], [3, 4, 99]], dtype=torch.int32)
    out = tk.attention_with_kvcache(a.pop("q"), a.pop("k_cache"), a.pop("v_cache"), backend="reference", **a)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("backend", [p for p in BACKENDS if p.values[0] in ("cpu", "reference")])
def test_kvcache_op_checks_values_too(backend):
    """The op itself (what torch.compile calls) rejects bad lengths before writing."""
    a = _inputs(True)
    before = a["k_cache"].clone()
    with pytest.raises(ValueError, match="cache_seqlens must be >= 0"):
        torch.ops.truthgpt.attention_with_kvcache(
            a["q"], a["k_cache"], a["v_cache"], torch.tensor([-1, 0], dtype=torch.int32), a["block_table"],
            a["k_new"], a["v_new"], None, None, 0.5, -1, 0, None, 0.0, None, backend)
    assert torch.equal(a["k_cache"], before)


@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
@pytest.mark.parametrize("backend", backends.BACKENDS)
def test_kvcache_opcheck(backend, paged):
    [param] = [p for p in BACKENDS if p.values[0] == backend]
    for mark in param.marks:
        if mark.name == "skip":
            pytest.skip(mark.kwargs["reason"])
    a = _inputs(paged)
    dev = device_for(backend)
    rows = None if paged else torch.tensor([1, 0], dtype=torch.int32)  # cache_batch_idx (contiguous only)
    args = (a["q"], a["k_cache"], a["v_cache"], a["cache_seqlens"], a["block_table"], a["k_new"], a["v_new"],
            rows, torch.tensor([2, 1], dtype=torch.int32), 0.3, 4, 0, tk.alibi_slopes(4).expand(2, 4), 5.0,
            torch.randn(4, 12), backend)  # rel_bias by distance: (Hq, Sq + capacity 12 - 1)
    args = tuple(x.to(dev) if isinstance(x, torch.Tensor) else x for x in args)
    torch.library.opcheck(torch.ops.truthgpt.attention_with_kvcache.default, args)


def test_kvcache_under_compile():
    a = _inputs(True)
    q, k_cache, v_cache = a.pop("q"), a.pop("k_cache"), a.pop("v_cache")
    k_eager, v_eager = k_cache.clone(), v_cache.clone()
    want = tk.attention_with_kvcache(q, k_eager, v_eager, backend="reference", **a)
    fn = torch.compile(lambda *t, **kw: tk.attention_with_kvcache(*t, backend="reference", **kw), fullgraph=True)
    got = fn(q, k_cache, v_cache, **a)
    torch.testing.assert_close(got, want)
    assert torch.equal(k_cache, k_eager) and torch.equal(v_cache, v_eager)


@pytest.mark.parametrize("backend", [p for p in BACKENDS if p.values[0] in ("cpu", "reference")])
def test_kvcache_flash_options_under_compile(backend):
    """cache_batch_idx, cache_leftpad, rotary and return_lse in a fullgraph compiled call; the
    value checks become asserts that still fire."""
    a = _inputs(False)
    a.update(cache_batch_idx=torch.tensor([1, 0], dtype=torch.int32), cache_leftpad=torch.tensor([1, 2], dtype=torch.int32))
    cos, sin = tk.rotary_cos_sin(16, 8)
    q, k_cache, v_cache = a.pop("q"), a.pop("k_cache"), a.pop("v_cache")
    k_eager, v_eager = k_cache.clone(), v_cache.clone()
    kw = dict(rotary_cos=cos, rotary_sin=sin, return_lse=True, backend=backend)
    want = tk.attention_with_kvcache(q, k_eager, v_eager, **a, **kw)
    fn = torch.compile(lambda *t, **k: tk.attention_with_kvcache(*t, **k, **kw), fullgraph=True)
    got = fn(q, k_cache, v_cache, **a)
    torch.testing.assert_close(got, want)
    assert torch.equal(k_cache, k_eager) and torch.equal(v_cache, v_eager)
    with pytest.raises(RuntimeError, match="cache_leftpad values in"):
        fn(q, k_cache, v_cache, **dict(a, cache_leftpad=torch.tensor([9, 0], dtype=torch.int32)))


@pytest.mark.parametrize("backend", BACKENDS)
def test_kvcache_strided_block_table(backend):
    """A block_table view with a column stride (every other column of a wider table) gives what
    its contiguous copy gives (the Triton kernel read the row's entries at unit stride)."""
    device = device_for(backend)
    results = []
    for strided in (False, True):
        torch.manual_seed(0)
        a = _inputs(paged=True)
        bt = a["block_table"]
        if strided:
            wide = torch.full((bt.shape[0], 2 * bt.shape[1]), 5, dtype=torch.int32)
            wide[:, ::2] = bt
            bt = wide[:, ::2]
            assert bt.stride(1) == 2
        a["block_table"] = bt
        a = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in a.items()}
        out = tk.attention_with_kvcache(**a, backend=backend)
        results.append((out.cpu(), a["k_cache"].cpu()))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=0, atol=0)
    torch.testing.assert_close(results[1][1], results[0][1], rtol=0, atol=0)
