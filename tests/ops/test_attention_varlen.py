"""tk.attention_varlen on every backend against the float64 reference evaluated sequence by
sequence on dense views (tk.attention's semantics per sequence), values, lse and gradients;
the DESIGN.md tolerance rule (2x the same-dtype eager error + atol); bad input."""
import pytest
import torch

import truthgpt_kernels as tk
from truthgpt_kernels import backends
from truthgpt_kernels.ops import reference

from ..helpers import assert_close, backend_params, device_for
from .test_attention import ATOL, eager_attention

BACKENDS = backend_params("attention_varlen")
f32, bf16, f16 = torch.float32, torch.bfloat16, torch.float16
DTYPES = {"reference": [f32], "cpu": [f32, bf16, f16],
          "triton": [f32] if backends.triton_interpreted() else [f16, bf16, f32],
          "cuda": [f16, bf16, f32]}

# name: (q lengths, k lengths or None (= q lengths), Hq, Hkv, D, options)
CASES = {
    "mixed": ([5, 0, 1, 17, 40], None, 4, 4, 32, {}),
    "causal": ([5, 0, 1, 17, 40], None, 4, 4, 32, {"causal": True}),
    "sq_ne_sk_causal_gqa": ([3, 1, 20, 0, 9], [7, 0, 20, 5, 30], 8, 2, 32, {"causal": True}),
    "one_sequence": ([65], None, 2, 1, 64, {"causal": True}),
    "decode_rows": ([1, 1, 1], [17, 1, 40], 4, 1, 16, {"causal": True}),
    "window_alibi_softcap": ([33, 2, 50], [40, 9, 50], 4, 2, 32,
                             {"causal": True, "window": (8, -1), "alibi": True, "softcap": 6.0}),
    "window_both_sides": ([30, 12], None, 2, 2, 16, {"window": (4, 3)}),
    "d96_alibi_batch": ([10, 21], None, 2, 2, 96, {"alibi": "batch"}),
}


def _cu(lengths, device):
    c = [0]
    for n in lengths:
        c.append(c[-1] + n)
    return torch.tensor(c, dtype=torch.int32, device=device)


def make_inputs(case, device):
    lq, lk, Hq, Hkv, D, opts = CASES[case]
    lk = lq if lk is None else lk
    q = torch.randn(sum(lq), Hq, D, dtype=torch.float64, device=device)
    k = torch.randn(sum(lk), Hkv, D, dtype=torch.float64, device=device)
    v = torch.randn(sum(lk), Hkv, D, dtype=torch.float64, device=device)
    if opts.get("softcap"):
        q = q * 4
    kw = {"causal": opts.get("causal", False), "window": opts.get("window"), "softcap": opts.get("softcap", 0.0)}
    if opts.get("alibi") is True:
        kw["alibi_slopes"] = tk.alibi_slopes(Hq, device=device)
    elif opts.get("alibi") == "batch":
        kw["alibi_slopes"] = torch.rand(len(lq), Hq, device=device)
    return (q, k, v), (lq, lk), kw


def per_sequence(fn, q, k, v, lq, lk, kw):
    """fn (tk.attention-like, SDPA layout) run on each sequence's dense (1, H, S, D) views;
    outputs packed back: (out (Tq, Hq, D), lse (Hq, Tq))."""
    outs, lses = [], []
    q0 = k0 = 0
    slopes = kw.get("alibi_slopes")
    for b, (nq, nk) in enumerate(zip(lq, lk)):
        one = dict(kw)
        if slopes is not None:
            one["alibi_slopes"] = slopes if slopes.dim() == 1 else slopes[b:b + 1]
        view = (lambda t, s, n: t[s:s + n].transpose(0, 1).unsqueeze(0))
        o, lse = fn(view(q, q0, nq), view(k, k0, nk), view(v, k0, nk), **one)
        outs.append(o[0].transpose(0, 1))
        lses.append(lse[0])
        q0, k0 = q0 + nq, k0 + nk
    return torch.cat(outs), torch.cat(lses, dim=1)


def _reference(q, k, v, **kw):
    return reference.attention(q, k, v, return_lse=True, **kw)


def _eager(q, k, v, **kw):
    out = eager_attention(q, k, v, **kw)
    return out, out.new_zeros(out.shape[:3], dtype=torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(CASES))
def test_attention_varlen_matches_reference(backend, case):
    device = device_for(backend)
    (q64, k64, v64), (lq, lk), kw = make_inputs(case, device)
    cu_q, cu_k = _cu(lq, device), _cu(lk, device)
    do64 = torch.randn_like(q64)
    ref = [t.clone().requires_grad_(True) for t in (q64, k64, v64)]
    ref_out, ref_lse = per_sequence(_reference, *ref, lq, lk, kw)
    ref_out.backward(do64)
    for dtype in DTYPES[backend]:
        ours = [t.detach().to(dtype).requires_grad_(True) for t in (q64, k64, v64)]
        out, lse = tk.attention_varlen(*ours, cu_q, cu_k, max(lq), max(lk), return_lse=True,
                                       backend=backend, **kw)
        out.backward(do64.to(dtype))
        base = [t.detach().to(dtype).requires_grad_(True) for t in (q64, k64, v64)]
        base_out, _ = per_sequence(_eager, *base, lq, lk, kw)
        base_out.backward(do64.to(dtype))
        assert out.shape == q64.shape and out.dtype == dtype
        assert lse.shape == (q64.shape[1], q64.shape[0]) and lse.dtype == reference.lse_dtype(dtype)
        assert_close(f"out[{dtype}]", out, ref_out, base_out, atol=ATOL[dtype])
        empty = torch.isinf(ref_lse)
        assert torch.equal(torch.isinf(lse), empty), "rows with no visible key must have lse = -inf"
        assert torch.all(out.transpose(0, 1)[empty] == 0), "rows with no visible key must output zeros"
        tol = 1e-5 if dtype == f32 else 2e-2
        torch.testing.assert_close(lse[~empty], ref_lse[~empty].to(lse.dtype), rtol=tol, atol=tol)
        for name, a, r, b in zip("qkv", ours, ref, base):
            assert_close(f"d{name}[{dtype}]", a.grad, r.grad, b.grad, atol=ATOL[dtype])


def _sequence_key(seed: int, b: int) -> int:
    """Sequence b's dropout key as an int in [0, 2^64)."""
    return int(reference.varlen_dropout_seed(seed, b)) % 2 ** 64


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", ["causal", "sq_ne_sk_causal_gqa", "window_alibi_softcap"])
def test_attention_varlen_dropout(backend, case):
    """Dropout: sequence b drops what tk.attention drops on that sequence alone with the key
    dropout_seed + b * 0x9E3779B97F4A7C15; values and gradients against the float64 reference
    (the tolerance rule's baseline: the dense kernel of the same backend and dtype)."""
    device = device_for(backend)
    (q64, k64, v64), (lq, lk), kw = make_inputs(case, device)
    if kw.get("alibi_slopes") is not None:
        kw["alibi_slopes"] = kw["alibi_slopes"].expand(len(lq), -1)
    cu_q, cu_k = _cu(lq, device), _cu(lk, device)
    seed = 1234567
    do64 = torch.randn_like(q64)
    ref = [t.clone().requires_grad_(True) for t in (q64, k64, v64)]
    slopes = kw.pop("alibi_slopes", None)

    def dense(q, k, v, be):  # each sequence through tk.attention with its own key: the definition
        outs, q0, k0 = [], 0, 0
        for b, (nq, nk) in enumerate(zip(lq, lk)):
            view = (lambda t, s, n: t[s:s + n].transpose(0, 1).unsqueeze(0))
            o = tk.attention(view(q, q0, nq), view(k, k0, nk), view(v, k0, nk), dropout_p=0.25,
                             dropout_seed=_sequence_key(seed, b), backend=be,
                             alibi_slopes=None if slopes is None else slopes[b:b + 1], **kw)
            outs.append(o[0].transpose(0, 1))
            q0, k0 = q0 + nq, k0 + nk
        return torch.cat(outs)
    ref_out = dense(*ref, "reference")
    ref_out.backward(do64)
    for dtype in DTYPES[backend]:
        ours = [t.detach().to(dtype).requires_grad_(True) for t in (q64, k64, v64)]
        out = tk.attention_varlen(*ours, cu_q, cu_k, max(lq), max(lk), dropout_p=0.25, dropout_seed=seed,
                                  alibi_slopes=slopes, backend=backend, **kw)
        out.backward(do64.to(dtype))
        base = [t.detach().to(dtype).requires_grad_(True) for t in (q64, k64, v64)]
        base_out = dense(*base, backend)
        base_out.backward(do64.to(dtype))
        assert_close(f"out[{dtype}]", out, ref_out, base_out, atol=ATOL[dtype])
        for name, a, r, b in zip("qkv", ours, ref, base):
            assert_close(f"d{name}[{dtype}]", a.grad, r.grad, b.grad, atol=ATOL[dtype])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", ["mixed", "causal", "sq_ne_sk_causal_gqa", "decode_rows", "window_alibi_softcap",
                                  "window_both_sides"])
def test_attention_varlen_rel_bias(backend, case):
    """T5 relative bias: sequence b gets what tk.attention gives on that sequence alone with the
    same table (each sequence buckets its own j - i'); values, q/k/v gradients and the table's
    gradient (summed over the sequences) against the float64 reference (the tolerance rule's
    baseline: the dense kernel of the same backend and dtype). max_seqlen_q / max_seqlen_k above
    the longest lengths: the sequences' slices of the bias vector must not depend on them."""
    device = device_for(backend)
    (q64, k64, v64), (lq, lk), kw = make_inputs(case, device)
    if kw.get("alibi_slopes") is not None:
        kw["alibi_slopes"] = kw["alibi_slopes"].expand(len(lq), -1)
    slopes = kw.pop("alibi_slopes", None)
    cu_q, cu_k = _cu(lq, device), _cu(lk, device)
    buckets = (not kw["causal"], 10, 12)  # small max_distance: the buckets change along every sequence
    table64 = torch.randn(q64.shape[1], 10, dtype=torch.float64, device=device)
    do64 = torch.randn_like(q64)

    def dense(q, k, v, table, be):
        outs, q0, k0 = [], 0, 0
        for b, (nq, nk) in enumerate(zip(lq, lk)):
            view = (lambda t, s, n: t[s:s + n].transpose(0, 1).unsqueeze(0))
            o = tk.attention(view(q, q0, nq), view(k, k0, nk), view(v, k0, nk), rel_bias=table, rel_buckets=buckets,
                             alibi_slopes=None if slopes is None else slopes[b:b + 1], backend=be, **kw)
            outs.append(o[0].transpose(0, 1))
            q0, k0 = q0 + nq, k0 + nk
        return torch.cat(outs)
    ref = [t.clone().requires_grad_(True) for t in (q64, k64, v64, table64)]
    ref_out = dense(*ref, "reference")
    ref_out.backward(do64)
    for dtype in DTYPES[backend]:
        ours = [t.detach().to(dtype).requires_grad_(True) for t in (q64, k64, v64)]
        ours.append(table64.detach().float().requires_grad_(True))
        out = tk.attention_varlen(*ours[:3], cu_q, cu_k, max(lq) + 3, max(lk) + 5, rel_bias=ours[3],
                                  rel_buckets=buckets, alibi_slopes=slopes, backend=backend, **kw)
        out.backward(do64.to(dtype))
        base = [t.detach().to(dtype).requires_grad_(True) for t in (q64, k64, v64)]
        base.append(table64.detach().float().requires_grad_(True))
        base_out = dense(*base, backend)
        base_out.backward(do64.to(dtype))
        assert_close(f"out[{dtype}]", out, ref_out, base_out, atol=ATOL[dtype])
        for name, a, r, b in zip(["q", "k", "v", "rel_bias"], ours, ref, base):
            assert_close(f"d{name}[{dtype}]", a.grad, r.grad, b.grad, atol=ATOL[dtype])
    # the bias matters: without it the output differs
    plain = tk.attention_varlen(q64.float(), k64.float(), v64.float(), cu_q, cu_k, max(lq), max(lk),
                                alibi_slopes=slopes, backend=backend, **kw)
    assert (plain.double() - ref_out.detach()).abs().max() > 1e-2


def test_attention_varlen_rel_bias_bad_input():
    args = _args()
    with pytest.raises(ValueError, match="rel_bias must have shape \\(4, num_buckets\\)"):
        tk.attention_varlen(*args, rel_bias=torch.randn(2, 8))
    with pytest.raises(TypeError, match="rel_bias must have dtype"):
        tk.attention_varlen(*args, rel_bias=torch.randn(4, 8, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="rel_bias has 8 buckets but rel_buckets says 16"):
        tk.attention_varlen(*args, rel_bias=torch.randn(4, 8), rel_buckets=(True, 16, 32))


@pytest.mark.parametrize("backend", [p for p in BACKENDS if p.values[0] in ("cpu", "reference")])
def test_attention_varlen_dropout_streams(backend):
    """Identical sequences draw different masks (their own keys); about 1 - p of the weights are
    kept; one sequence equals tk.attention with the same seed; the same seed repeats exactly."""
    n, H, p = 64, 2, 0.3
    q, k = torch.randn(n, H, n), torch.randn(n, H, n)
    v = torch.eye(n)[:, None, :].expand(n, H, n).contiguous()  # out = the dropped probabilities themselves
    q2, k2, v2 = (torch.cat([t, t]) for t in (q, k, v))
    cu = torch.tensor([0, n, 2 * n], dtype=torch.int32)
    out = tk.attention_varlen(q2, k2, v2, cu, cu, n, n, dropout_p=p, dropout_seed=99, backend=backend)
    kept = [(out[i * n:(i + 1) * n] != 0) for i in range(2)]
    assert not torch.equal(kept[0], kept[1]), "two sequences drew the same dropout mask"
    frac = torch.cat(kept).float().mean().item()
    assert abs(frac - (1 - p)) < 0.03, frac
    again = tk.attention_varlen(q2, k2, v2, cu, cu, n, n, dropout_p=p, dropout_seed=99, backend=backend)
    assert torch.equal(out, again)
    one = tk.attention_varlen(q, k, v, cu[:2], cu[:2], n, n, dropout_p=p, dropout_seed=99, backend=backend)
    dense = tk.attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None], dropout_p=p,
                         dropout_seed=99, backend=backend)
    torch.testing.assert_close(one, dense[0].transpose(0, 1), rtol=0, atol=0)
    torch.testing.assert_close(one, out[:n], rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_attention_varlen_equals_padded_batch(backend):
    """The packed call equals tk.attention on the same documents padded one per row
    (key_mask hides the padding keys; causal rows aligned bottom-right per document)."""
    device = device_for(backend)
    lengths = [7, 30, 1, 18]
    D, H = 32, 4
    docs = [torch.randn(n, H, D, device=device) for n in lengths]
    packed = torch.cat(docs)
    cu = _cu(lengths, device)
    out = tk.attention_varlen(packed, packed, packed, cu, cu, max(lengths), max(lengths), causal=True,
                              backend=backend)
    S = max(lengths)
    padded = torch.zeros(len(lengths), S, H, D, device=device)
    for b, d in enumerate(docs):  # left padding keeps bottom-right causal alignment
        padded[b, S - len(d):] = d
    key_mask = torch.arange(S, device=device)[None] >= (S - torch.tensor(lengths, device=device))[:, None]
    x = padded.transpose(1, 2)
    dense = tk.attention(x, x, x, causal=True, key_mask=key_mask, backend=backend).transpose(1, 2)
    expect = torch.cat([dense[b, S - n:] for b, n in enumerate(lengths)])
    torch.testing.assert_close(out, expect, rtol=1e-5, atol=1e-5)


def _paged(lk, Hkv, D, page_size, device, seed=0):
    """A paged cache holding sequences of lengths lk in shuffled pages (spare pages and unused
    slots NaN: never to be read) and their packed (total_k, Hkv, D) keys / values."""
    g = torch.Generator().manual_seed(seed)
    per = max(-(-n // page_size) for n in lk)
    num_pages = len(lk) * per + 2
    table = torch.randperm(num_pages, generator=g)[:len(lk) * per].view(len(lk), per).to(torch.int32)
    caches = [torch.full((num_pages, page_size, Hkv, D), float("nan"), dtype=torch.float64) for _ in range(2)]
    packed = [torch.randn(sum(lk), Hkv, D, generator=g, dtype=torch.float64) for _ in range(2)]
    row = 0
    for b, n in enumerate(lk):
        for t in range(n):
            for c, p in zip(caches, packed):
                c[table[b, t // page_size], t % page_size] = p[row]
            row += 1
    return [c.to(device) for c in caches], table.to(device), [p.to(device) for p in packed]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("page_size", [4, 16])
def test_attention_varlen_paged_kv(backend, page_size):
    """block_table (flash-attn's paged varlen): keys and values read from a paged cache equal
    the packed call on the same tokens; values and gradients (they reach the pages)."""
    device = device_for(backend)
    lq, lk, Hq, Hkv, D = [3, 0, 9, 1], [10, 4, 17, 1], 4, 2, 32
    (kc, vc), table, (k, v) = _paged(lk, Hkv, D, page_size, device)
    q = torch.randn(sum(lq), Hq, D, dtype=torch.float64, device=device)
    cu_q, cu_k = _cu(lq, device), _cu(lk, device)
    dtype = DTYPES[backend][-1] if backend != "reference" else torch.float64
    kc, vc = (t.to(dtype).requires_grad_(True) for t in (kc, vc))
    qd, kd, vd = (t.to(dtype).requires_grad_(True) for t in (q, k, v))
    kw = dict(causal=True, window=(6, -1), alibi_slopes=tk.alibi_slopes(Hq, device=device), backend=backend)
    out, lse = tk.attention_varlen(qd, kc, vc, cu_q, cu_k, max(lq), max(lk), block_table=table, return_lse=True, **kw)
    want, want_lse = tk.attention_varlen(qd, kd, vd, cu_q, cu_k, max(lq), max(lk), return_lse=True, **kw)
    torch.testing.assert_close(out, want, rtol=0, atol=0)
    torch.testing.assert_close(lse, want_lse, rtol=0, atol=0)
    g = torch.randn_like(out)
    dkc, dvc = torch.autograd.grad(out, (kc, vc), g)
    dk, dv = torch.autograd.grad(want, (kd, vd), g)
    flat = []
    for b, n in enumerate(lk):
        flat += [int(table[b, t // page_size]) * page_size + t % page_size for t in range(n)]
    flat = torch.tensor(flat, device=device)
    for got, exp in ((dkc, dk), (dvc, dv)):
        got = got.flatten(0, 1)
        torch.testing.assert_close(got[flat], exp, rtol=0, atol=0)
        rest = torch.ones(got.shape[0], dtype=torch.bool, device=device)
        rest[flat] = False
        assert torch.all(got[rest] == 0), "slots no sequence uses got a gradient"


def test_attention_varlen_paged_kv_bad_input():
    (kc, vc), table, _ = _paged([3, 7], 2, 16, 4, "cpu")  # page size 4: 2 pages each
    q = torch.randn(4, 4, 16, dtype=torch.float64)
    cu_q, cu_k = _cu([2, 2], "cpu"), _cu([3, 7], "cpu")
    call = (lambda **kw: tk.attention_varlen(q, kw.pop("k", kc), kw.pop("v", vc), cu_q, kw.pop("cu_k", cu_k), 2,
                                              kw.pop("max_k", 7), block_table=kw.pop("table", table)))
    with pytest.raises(ValueError, match="k must have 4 dimensions"):
        call(k=kc[0], v=vc[0])
    with pytest.raises(TypeError, match="block_table must have dtype int32"):
        call(table=table.long())
    with pytest.raises(ValueError, match="block_table must have shape"):
        call(table=table[:1])
    bad = table.clone()
    bad[1, 1] = 99
    with pytest.raises(ValueError, match=r"block_table\[1, 1\] = 99 is not a page index"):
        call(table=bad)
    with pytest.raises(ValueError, match="exceeds what block_table can address"):
        call(cu_k=_cu([3, 9], "cpu"), max_k=9)
    with pytest.raises(ValueError, match="cu_seqlens_k must be non-decreasing"):
        call(cu_k=torch.tensor([0, 5, 4], dtype=torch.int32))
    unused = table.clone()
    unused[0, 0] = -1  # sequence 0 (3 tokens, page size 4) uses page 0 ...
    with pytest.raises(ValueError, match=r"block_table\[0, 0\] = -1"):
        call(table=unused)
    unused = table.clone()
    unused[0, 1] = -1  # ... but not page 1: anything may sit there
    assert torch.isfinite(call(table=unused)).all()


def _args(device="cpu"):
    q = torch.randn(10, 4, 16, device=device)
    k = torch.randn(12, 2, 16, device=device)
    cu_q = torch.tensor([0, 4, 10], dtype=torch.int32)
    cu_k = torch.tensor([0, 6, 12], dtype=torch.int32)
    return [q, k, k.clone(), cu_q, cu_k, 6, 6]


@pytest.mark.parametrize("change, error, match", [
    (lambda a: a.__setitem__(0, a[0][None]), ValueError, "q must have 3 dimensions"),
    (lambda a: a.__setitem__(2, a[2][:5]), ValueError, "v must have shape"),
    (lambda a: (a.__setitem__(1, torch.randn(12, 3, 16)), a.__setitem__(2, torch.randn(12, 3, 16))),
     ValueError, "multiple of k/v heads"),
    (lambda a: a.__setitem__(3, a[3].long()), TypeError, "cu_seqlens_q must have dtype int32"),
    (lambda a: a.__setitem__(4, a[4][:2]), ValueError, "cu_seqlens_k must have shape"),
    (lambda a: a.__setitem__(3, torch.tensor([0], dtype=torch.int32)), ValueError, "B \\+ 1 >= 2"),
    (lambda a: a.__setitem__(3, torch.tensor([1, 4, 10], dtype=torch.int32)), ValueError, "cu_seqlens_q must start at 0"),
    (lambda a: a.__setitem__(3, torch.tensor([0, 7, 6], dtype=torch.int32)), ValueError, "cu_seqlens_q must be non-decreasing"),
    (lambda a: a.__setitem__(4, torch.tensor([0, 6, 11], dtype=torch.int32)), ValueError, "cu_seqlens_k must end at .* 12"),
    (lambda a: a.__setitem__(5, 5), ValueError, "max_seqlen_q \\(5\\) is smaller"),
    (lambda a: a.__setitem__(6, -1), ValueError, "max_seqlen_k must be >= 0"),
])
def test_attention_varlen_bad_input(change, error, match):
    args = _args()
    change(args)
    with pytest.raises(error, match=match):
        tk.attention_varlen(*args)


def test_attention_varlen_bad_options():
    args = _args()
    with pytest.raises(ValueError, match="alibi_slopes must have shape"):
        tk.attention_varlen(*args, alibi_slopes=torch.rand(3, 4))
    with pytest.raises(ValueError, match="window must be a pair"):
        tk.attention_varlen(*args, window=3)
    with pytest.raises(ValueError, match="head dim"):
        tk.attention_varlen(torch.randn(4, 1, 300), torch.randn(4, 1, 300), torch.randn(4, 1, 300),
                            *_args()[3:])


def test_attention_varlen_compiles_without_graph_breaks():
    """The lengths are read inside the op: one graph whatever they are (fullgraph=True)."""
    (q, k, v), (lq, lk), kw = make_inputs("sq_ne_sk_causal_gqa", "cpu")
    q, k, v = (t.float().requires_grad_(True) for t in (q, k, v))
    cu_q, cu_k = _cu(lq, "cpu"), _cu(lk, "cpu")

    def f(q, k, v, cu_q, cu_k):
        return tk.attention_varlen(q, k, v, cu_q, cu_k, max(lq), max(lk), causal=True).square().sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    loss = compiled(q, k, v, cu_q, cu_k)
    loss.backward()
    expect = f(*(t.detach().requires_grad_(True) if t.is_floating_point() else t for t in (q, k, v)),
               cu_q, cu_k)
    torch.testing.assert_close(loss, expect)
    assert q.grad is not None and torch.isfinite(q.grad).all()
