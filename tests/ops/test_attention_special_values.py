"""Attention on special values, on every backend that runs here (issue #19):
- NaN/Inf in q, k or v reach every output row they reach (as in the reference and
  flash-attn), never a row of zeros; a row with no visible key still outputs zeros;
- a row whose only visible key is j gets exactly zero dS (the softmax of one key is the
  constant 1), so dq of that row, and dk of a key seen only by such rows, are exactly 0.
Positions cover the inside of a tile, tile edges (Triton interpreter tiles of 32, CPU query
tiles of 128) and the CPU forward's split-key (flash-decoding) path."""
import pytest
import torch

import truthgpt_kernels as tk
from truthgpt_kernels.ops import reference

from ..helpers import backend_params, device_for
from .test_attention_cpu import HAS_AVX2

f32, bf16, f16, f64 = torch.float32, torch.bfloat16, torch.float16, torch.float64
BACKENDS = [p for p in backend_params("attention") if p.values[0] != "cuda"]
CPU_SIDE = [p for p in BACKENDS if p.values[0] in ("cpu", "reference")]
# CPU kernel paths (TRUTHGPT_CPU_ATTN, TRUTHGPT_ATTN_BWD); avx512 / avx2 fall back where absent
CPU_PATHS = [("auto", "single"), ("auto", "split"), ("avx2", "single"), ("avx2", "split"),
             ("portable", "single"), ("portable", "split"), ("noavx512", "single"), ("noavx2", "single")]


def _dtypes(backend):
    return {"cpu": [f32, bf16, f16], "reference": [f32, bf16], "triton": [f32, bf16]}[backend]


def _reached(which, idx, B, Hq, Hkv, Sq, Sk, kw):
    """Bool (B, Hq, Sq): the output rows that a non-finite q/k/v element at idx reaches."""
    vis = reference.attention_visibility(B, Hq, Sq, Sk, causal=kw.get("causal", False),
                                         window=kw.get("window")).expand(B, Hq, Sq, Sk)
    rows = torch.zeros(B, Hq, Sq, dtype=torch.bool)
    b, h, s = idx[:3]
    if which == "q":
        rows[b, h, s] = bool(vis[b, h, s].any())
    else:
        g = Hq // Hkv
        rows[b, h * g:(h + 1) * g] = vis[b, h * g:(h + 1) * g, :, s]
    return rows


NAN_CASES = {
    # name: (B, Hq, Hkv, Sq, Sk, D, {causal}, splitk)
    "issue": (1, 2, 2, 8, 8, 64, {}, None),
    "s300_causal": (1, 2, 1, 300, 300, 32, {"causal": True}, None),
    "s300": (1, 2, 2, 300, 300, 32, {}, None),
    "decode_split": (1, 4, 2, 1, 300, 32, {"causal": True}, 4),
    "decode_split_long": (1, 2, 1, 1, 2100, 32, {}, None),
}
# positions: inside a tile, around the Triton interpreter's 32-tiles and the CPU's 128-row tiles
POSITIONS = [5, 31, 32, 127, 128, 299]


def _nan_params():
    out = []
    for case, (B, Hq, Hkv, Sq, Sk, D, opts, split) in NAN_CASES.items():
        for which in "qkv":
            n = Sq if which == "q" else Sk
            for pos in sorted({p % n for p in POSITIONS} | {n - 1}):
                out.append((case, which, pos))
    return out


def _triton_runs(case, which, pos, value, Sq):
    """The Triton interpreter takes minutes per 300 x 300 case: it gets the short cases at the
    tile-inner/edge positions (inf only in q), and one NaN q on the 32-row tile edge at S 300."""
    if case == "s300_causal":
        return which == "q" and value != value and pos == 32
    return Sq <= 8 and case != "decode_split_long" and pos in (5, 31, 32, 299) and (
        value != value or which == "q")


@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
@pytest.mark.parametrize("case,which,pos", _nan_params())
@pytest.mark.parametrize("rows", ["auto", "avx2", "noavx2"])  # CPU row paths (TRUTHGPT_CPU_ATTN)
@pytest.mark.parametrize("backend", BACKENDS)
def test_non_finite_inputs_propagate(monkeypatch, backend, rows, case, which, pos, value):
    B, Hq, Hkv, Sq, Sk, D, opts, split = NAN_CASES[case]
    if rows != "auto" and (backend != "cpu" or (rows == "avx2" and not HAS_AVX2)):
        pytest.skip("row paths of the CPU kernel (avx2: where the CPU has it)")
    if backend == "triton" and not _triton_runs(case, which, pos, value, Sq):
        pytest.skip("interpreter time: Triton gets the tile-inner/edge positions of the short cases")
    monkeypatch.setenv("TRUTHGPT_CPU_ATTN", rows)
    if split:
        monkeypatch.setenv("TRUTHGPT_ATTN_SPLITK", str(split))
        monkeypatch.setenv("TRUTHGPT_ATTN_BK", "32")
    device = device_for(backend)
    q = torch.randn(B, Hq, Sq, D, dtype=f64)
    k = torch.randn(B, Hkv, Sk, D, dtype=f64)
    v = torch.randn(B, Hkv, Sk, D, dtype=f64)
    t = {"q": q, "k": k, "v": v}[which]
    idx = (0, t.shape[1] - 1, pos, 5)
    t[idx] = value
    reached = _reached(which, idx, B, Hq, Hkv, Sq, Sk, opts)  # rows that see the element
    ref, ref_lse = reference.attention(q, k, v, return_lse=True, **opts)
    ref_bad = ~torch.isfinite(ref).all(-1)
    if value != value:  # NaN reaches exactly the rows that see it (v: at least those)
        assert ref_bad[reached].all() and (which == "v" or torch.equal(ref_bad, reached))
        assert ref_bad.any()
    for dtype in _dtypes(backend):
        ins = [x.detach().to(dtype=dtype, device=device).requires_grad_(True) for x in (q, k, v)]
        out, lse = tk.attention(*ins, return_lse=True, backend=backend, **opts)
        out, lse = out.cpu(), lse.cpu()
        bad = ~torch.isfinite(out).all(-1)
        if which == "v":  # through P V: the rows that see it; exact-zero probabilities may leak
            assert bad[reached].all(), f"{dtype}: rows the {value} in v reaches must not be finite"
            assert not (bad & ~ref_bad).any(), f"{dtype}: non-finite rows the reference has finite"
        else:  # through the scores: exactly the reference's rows, and their lse
            assert torch.equal(bad, ref_bad), f"{dtype}: non-finite rows differ from the reference"
            assert torch.equal(torch.isfinite(lse), torch.isfinite(ref_lse)), f"{dtype}: lse"
        fine = ~bad & ~ref_bad
        tol = 1e-4 if dtype == f32 else 3e-2
        torch.testing.assert_close(out[fine].double(), ref[fine], rtol=tol, atol=tol)
        if which == "q" and value != value:  # the backward carries it on: the row's dq is NaN
            g = torch.randn(out.shape, dtype=dtype, device=device)
            dq, = torch.autograd.grad(tk.attention(*ins, backend=backend, **opts), ins[0], g)
            assert not torch.isfinite(dq.cpu()[reached]).any(), f"{dtype}: dq of the reached row"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("causal", [False, True])
def test_row_whose_visible_scores_are_all_minus_inf(backend, causal):
    """-inf in q against positive keys: every visible score of the row is -inf, and the row is
    one with no visible key (zeros, lse -inf), as in flash-attn's and SDPA's kernels, on every
    backend (the reference gave NaN, the CPU kernel zeros); the other rows are untouched."""
    device = device_for(backend)
    g = torch.Generator().manual_seed(0)
    q, v = torch.randn(1, 2, 6, 16, generator=g), torch.randn(1, 2, 6, 16, generator=g)
    k = torch.randn(1, 2, 6, 16, generator=g).abs()
    q[0, 1, 2, 3] = float("-inf")
    ref, ref_lse = reference.attention(q.double(), k.double(), v.double(), causal=causal, return_lse=True)
    assert torch.all(ref[0, 1, 2] == 0) and ref_lse[0, 1, 2] == float("-inf")
    fine = torch.ones(1, 2, 6, dtype=torch.bool)
    fine[0, 1, 2] = False
    for dtype in _dtypes(backend):
        out, lse = tk.attention(*(x.to(dtype=dtype, device=device) for x in (q, k, v)), causal=causal,
                                return_lse=True, backend=backend)
        out, lse = out.cpu(), lse.cpu()
        assert torch.all(out[0, 1, 2] == 0) and lse[0, 1, 2] == float("-inf"), dtype
        tol = 1e-4 if dtype == f32 else 3e-2
        torch.testing.assert_close(out[fine].double(), ref[fine], rtol=tol, atol=tol)


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_in_a_row_without_visible_keys_stays_zero(backend):
    """Causal with Sq > Sk: the first rows see no key; a NaN in their q, or in the v of a key
    that other rows of their tiles see, changes nothing: they output zeros, lse -inf."""
    device = device_for(backend)
    q, k, v = torch.randn(1, 2, 40, 32), torch.randn(1, 2, 17, 32), torch.randn(1, 2, 17, 32)
    q[0, 1, 3, 7] = float("nan")  # row 3 sees no key (i' = 3 - 23 < 0)
    v[0, 0, 2, 5] = float("nan")  # seen by rows 25.. (in the same tiles as the empty rows)
    for dtype in _dtypes(backend):
        out, lse = tk.attention(*(x.to(dtype=dtype, device=device) for x in (q, k, v)), causal=True,
                                return_lse=True, backend=backend)
        assert torch.all(out[0, :, :23].cpu() == 0)
        assert torch.all(lse[0, :, :23].cpu() == float("-inf"))
        assert torch.isfinite(out[0, 1].cpu()).all() and torch.isnan(out[0, 0, 25:].cpu()).any(-1).all()


# ----------------------------------------------------------------------------- one visible key
def _one_key_masks(B, Hq, Sq, Sk):
    """name -> (Sq, Sk, tk.attention kwargs): every mask that can leave a row one key."""
    km = torch.zeros(B, Sk, dtype=torch.bool)
    km[:, Sk // 3] = True
    bs = 16
    nb_q, nb_k = -(-Sq // bs), -(-Sk // bs)
    diag = torch.eye(max(nb_q, nb_k), dtype=torch.bool)[:nb_q, :nb_k].expand(B, Hq, nb_q, nb_k)
    return {
        "causal_first_row": {"causal": True},
        "window_0_0": {"window": (0, 0)},
        "key_mask_one": {"key_mask": km},
        "block_diag_causal": {"block_mask": diag, "block_size": bs, "causal": True},
        "window_0_0_alibi_softcap": {"window": (0, 0), "alibi_slopes": tk.alibi_slopes(Hq),
                                     "softcap": 2.0},
    }


def _exact_zero_checks(q, k, v, kw, backend, dtype):
    B, Hq, Sq, D = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    device = device_for(backend)
    vis = reference.attention_visibility(
        B, Hq, Sq, Sk, causal=kw.get("causal", False), window=kw.get("window"),
        block_mask=kw.get("block_mask"), block_size=kw.get("block_size", 64),
        key_mask=kw.get("key_mask")).expand(B, Hq, Sq, Sk)
    one = vis.sum(-1) == 1                                     # (B, Hq, Sq) rows with one key
    g = Hq // Hkv
    seen = vis.reshape(B, Hkv, g, Sq, Sk)
    only_one = (~seen | one.reshape(B, Hkv, g, Sq, 1)).all(2).all(2)  # (B, Hkv, Sk)
    assert one.any(), "the case must hold rows with exactly one visible key"
    ins = [x.detach().to(dtype=dtype, device=device).requires_grad_(True) for x in (q, k, v)]
    kw = {n: (x.to(device) if torch.is_tensor(x) else x) for n, x in kw.items()}
    out = tk.attention(*ins, backend=backend, **kw)
    out.backward(torch.randn(out.shape, dtype=dtype, device=device))
    dq, dk = ins[0].grad.cpu(), ins[1].grad.cpu()
    assert dq[one].abs().max().item() == 0, f"{backend} {dtype}: dq of one-key rows must be exactly 0"
    if only_one.any():
        assert dk[only_one].abs().max().item() == 0, f"{backend} {dtype}: dk of keys seen by one-key rows"
    assert torch.isfinite(dq).all()
    assert ins[2].grad.abs().max() > 0 and (one.all() or dq[~one].abs().max() > 0)  # real gradients


def _one_key_dtypes(backend):
    return {"cpu": [f32, bf16, f16, f64], "reference": [f32, bf16, f64], "triton": [f32, bf16]}[backend]


@pytest.mark.parametrize("shape", [(9, 6, 1, 64), (1, 2, 239, 256)], ids=["issue_9x6", "sq239_d256"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_single_key_gradients_are_exactly_zero(backend, shape):
    """Sk = 1: every row sees one key (the issue's example)."""
    B, H, Sq, D = shape
    q, k, v = torch.randn(B, H, Sq, D), torch.randn(B, H, 1, D), torch.randn(B, H, 1, D)
    for dtype in _one_key_dtypes(backend):
        ins = [x.detach().to(dtype=dtype, device=device_for(backend)).requires_grad_(True) for x in (q, k, v)]
        out = tk.attention(*ins, backend=backend)
        out.backward(torch.randn(out.shape, dtype=dtype, device=out.device))
        assert ins[0].grad.abs().max().item() == 0, f"{dtype}: dq"
        assert ins[1].grad.abs().max().item() == 0, f"{dtype}: dk"
        assert ins[2].grad.abs().max() > 0


@pytest.mark.parametrize("mask", list(_one_key_masks(1, 4, 40, 40)))
@pytest.mark.parametrize("backend", BACKENDS)
def test_one_visible_key_rows_have_exact_zero_dq_dk(backend, mask):
    B, Hq, Hkv, Sq, Sk, D = 2, 4, 2, 40, 40, 64
    q, k, v = torch.randn(B, Hq, Sq, D), torch.randn(B, Hkv, Sk, D), torch.randn(B, Hkv, Sk, D)
    kw = _one_key_masks(B, Hq, Sq, Sk)[mask]
    for dtype in _one_key_dtypes(backend):
        _exact_zero_checks(q, k, v, kw, backend, dtype)


@pytest.mark.parametrize("path,bwd", CPU_PATHS, ids=[f"{p}-{b}" for p, b in CPU_PATHS])
@pytest.mark.parametrize("mask", ["window_0_0", "key_mask_one", "block_diag_causal"])
def test_one_visible_key_every_cpu_path(monkeypatch, path, bwd, mask):
    if not CPU_SIDE or CPU_SIDE[0].values[0] != "cpu":
        pytest.skip("the C++ CPU attention kernel is not built")
    monkeypatch.setenv("TRUTHGPT_CPU_ATTN", path)
    monkeypatch.setenv("TRUTHGPT_ATTN_BWD", bwd)
    monkeypatch.setenv("TRUTHGPT_ATTN_BK", "48")  # several pieces and key blocks
    B, Hq, Hkv, Sq, Sk, D = 1, 4, 1, 150, 150, 40
    q, k, v = torch.randn(B, Hq, Sq, D), torch.randn(B, Hkv, Sk, D), torch.randn(B, Hkv, Sk, D)
    kw = _one_key_masks(B, Hq, Sq, Sk)[mask]
    for dtype in (f32, bf16, f16, f64):
        _exact_zero_checks(q, k, v, kw, "cpu", dtype)


@pytest.mark.parametrize("seed", range(4))
def test_triton_one_key_row_flags_match_dense_visibility(seed):
    """The Triton launcher's per-row "sees exactly one key" flags (prefix sums at key and block
    granularity) against the dense visibility, over random windows, key masks and (broadcast)
    block masks of any block size."""
    if not any(p.values[0] == "triton" and all(m.name != "skip" for m in p.marks) for p in BACKENDS):
        pytest.skip("triton is unavailable")
    from truthgpt_kernels.triton.attention import _one_key_rows
    g = torch.Generator().manual_seed(seed)

    def ri(a, b):
        return int(torch.randint(a, b, (), generator=g))
    for trial in range(150):
        B, H, Sq, Sk, bs = ri(1, 3), ri(1, 3), ri(1, 40), ri(1, 40), ri(1, 9)
        wl, wr = ri(-1, 4), ri(-1, 4)
        km = torch.rand(B, Sk, generator=g) > torch.rand((), generator=g) if trial % 2 else None
        bm = None
        if trial % 4:
            bm = torch.rand(B if trial % 3 else 1, H if trial % 5 else 1, -(-Sq // bs), -(-Sk // bs),
                            generator=g) > 0.5
            bm = bm.expand(B, H, *bm.shape[2:]) if trial % 7 else bm
        got = _one_key_rows(B, H, Sq, Sk, wl, wr, bm, bs, km, "cpu")
        vis = reference.attention_visibility(B, H, Sq, Sk, window=(wl, wr), block_mask=bm, block_size=bs,
                                             key_mask=km).expand(B, H, Sq, Sk)
        want = vis.sum(-1) == 1
        assert (not want.any()) if got is None else torch.equal(got.bool(), want), (B, H, Sq, Sk, wl, wr, bs)
