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
            a["k_new"], a["v_new"], 0.5, -1, 0, None, 0.0, backend)
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
    args = (a["q"], a["k_cache"], a["v_cache"], a["cache_seqlens"], a["block_table"], a["k_new"], a["v_new"],
            0.3, 4, 0, tk.alibi_slopes(4).expand(2, 4), 5.0, backend)
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
