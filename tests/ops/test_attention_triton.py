"""Triton-specific attention tests (the shared grid is tests/ops/test_attention.py): tile lists
built from block masks, tile shapes that differ from the mask's block size, block skipping,
odd head dims, half precision under the interpreter, empty inputs, errors, torch.compile."""
import itertools
import math

import pytest
import torch

import truthgpt_kernels as tk
from truthgpt_kernels import backends, sparse
from truthgpt_kernels.ops import reference

from ..helpers import assert_close, backend_params, device_for
from .test_attention import ATOL, eager_attention, leaves

[TRITON] = [p for p in backend_params("attention") if p.values[0] == "triton"]
pytestmark = [pytest.mark.triton] + [m for m in TRITON.marks if m.name == "skip"]

if not any(m.name == "skip" for m in TRITON.marks):
    from truthgpt_kernels.triton import attention as tattn
DEV = device_for("triton")


def _compare(q64, k64, v64, kw, dtype=torch.float32, atol=None):
    """Forward, lse and gradients of the triton backend against the float64 reference, judged
    against the same-dtype eager computation (the shared grid's rule)."""
    do64 = torch.randn(q64.shape, dtype=torch.float64, device=q64.device)
    ref_in = leaves((q64, k64, v64), torch.float64)
    ref, ref_lse = reference.attention(*ref_in, return_lse=True, **kw)
    ref.backward(do64)
    ours_in, base_in = leaves((q64, k64, v64), dtype), leaves((q64, k64, v64), dtype)
    out, lse = tk.attention(*ours_in, return_lse=True, backend="triton", **kw)
    out.backward(do64.to(dtype))
    base = eager_attention(*base_in, **kw)
    base.backward(do64.to(dtype))
    atol = ATOL[dtype] if atol is None else atol
    assert_close(f"out[{dtype}]", out, ref, base, atol=atol)
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse))
    fin = torch.isfinite(ref_lse)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(lse[fin], ref_lse[fin].to(lse.dtype), rtol=tol, atol=tol)
    for name, a, r, b in zip("qkv", ours_in, ref_in, base_in):
        assert_close(f"d{name}[{dtype}]", a.grad, r.grad, b.grad, atol=atol)


def _rand(*shape):
    return torch.randn(*shape, dtype=torch.float64, device=DEV)


# ----------------------------------------------------------------------------- tile lists
def _tile_reduce(vis, BM, BN, how):
    """any/all of a (..., Sq, Sk) bool over kernel tiles, ignoring positions past Sq, Sk."""
    Sq, Sk = vis.shape[-2:]
    nq, nk = math.ceil(Sq / BM), math.ceil(Sk / BN)
    fill = how == "all"
    pad = torch.full(vis.shape[:-2] + (nq * BM, nk * BN), fill, dtype=torch.bool)
    pad[..., :Sq, :Sk] = vis
    t = pad.reshape(vis.shape[:-2] + (nq, BM, nk, BN))
    return t.any(-1).any(-2) if how == "any" else t.all(-1).all(-2)


LIST_CASES = [  # Sq, Sk, block_size, BM, BN, window, mask batch/heads
    (40, 40, 16, 32, 32, (-1, -1), (1, 1)),
    (50, 70, 8, 16, 32, (-1, 0), (2, 3)),
    (70, 50, 24, 32, 16, (10, 5), (1, 3)),
    (129, 200, 64, 32, 32, (-1, 0), (2, 1)),
    (33, 129, 48, 64, 16, (20, -1), (2, 3)),
    (1, 129, 16, 16, 64, (-1, 0), (1, 1)),
    (100, 100, 7, 32, 32, (0, 0), (2, 3)),
]


@pytest.mark.parametrize("Sq,Sk,bs,BM,BN,window,bh", LIST_CASES)
def test_tile_lists_match_brute_force(Sq, Sk, bs, BM, BN, window, bh):
    B, H = 2, 3
    nbq, nbk = math.ceil(Sq / bs), math.ceil(Sk / bs)
    mask = torch.rand(bh[0], bh[1], nbq, nbk) > 0.6
    full = mask.expand(B, H, nbq, nbk)
    vis, partial = tattn._tile_vis(full, bs, Sq, Sk, BM, BN, *window)
    assert vis.shape == (bh[0], bh[1], math.ceil(Sq / BM), math.ceil(Sk / BN))
    block_only = reference.attention_visibility(B, H, Sq, Sk, block_mask=full, block_size=bs)
    window_only = reference.attention_visibility(1, 1, Sq, Sk, window=window)
    want = _tile_reduce(block_only, BM, BN, "any") & _tile_reduce(window_only, BM, BN, "any")
    assert torch.equal(vis.expand_as(want), want)
    want_partial = ~_tile_reduce(block_only, BM, BN, "all")
    assert torch.equal(partial.expand_as(want_partial)[want], want_partial[want])

    lst, cnt = tattn._compact(vis, partial)
    assert torch.equal(cnt, vis.sum(-1).int())
    n = vis.shape[-1]
    for idx in itertools.product(*map(range, vis.shape[:-1])):
        entries = lst[idx][: cnt[idx]]
        tiles = (entries >> 1).long()
        assert torch.equal(tiles, vis[idx].nonzero().flatten())  # visible tiles, ascending
        assert torch.equal((entries & 1).bool(), partial[idx][tiles])
        assert bool((lst[idx][cnt[idx]:] == 2 * n + 2).all())


def test_tile_list_cache_follows_mask_edits():
    """Lists are cached per mask (layers share one); an in-place edit of the mask must rebuild."""
    S, D = 70, 16
    q, k, v = (torch.randn(1, 2, S, D, device=DEV) for _ in range(3))
    mask = torch.rand(1, 2, 5, 5, device=DEV) > 0.5
    kw = {"block_mask": mask, "block_size": 16}

    def check():
        out = tk.attention(q, k, v, backend="triton", **kw)
        ref = reference.attention(q.double(), k.double(), v.double(), **kw)
        torch.testing.assert_close(out, ref.float(), rtol=1e-4, atol=1e-4)

    check()
    n = len(tattn._LIST_CACHE)
    check()  # same mask: a cache hit, no new entry
    assert len(tattn._LIST_CACHE) == n
    mask[:, :, :, 0] = ~mask[:, :, :, 0]  # in place: the version counter moves
    check()
    assert len(tattn._LIST_CACHE) == min(n + 1, tattn._LIST_CACHE_SIZE)


# ----------------------------------------------------------------------------- tile shapes
TILE_CASES = {  # kernel tiles (fwd and bwd) against block sizes that do not match them
    "tiles16x64_bs24": ((16, 64), (64, 16), 24, (2, 4, 2, 70, 90, 32),
                        {"causal": True, "key_mask": True}),
    "tiles64x16_bs8": ((64, 16), (16, 32), 8, (1, 4, 1, 45, 77, 48),
                       {"window": (20, 3), "alibi": True}),
    "tiles32x32_bs48": ((32, 32), (32, 32), 48, (2, 2, 2, 100, 60, 16),
                        {"softcap": 4.0, "key_mask": True, "causal": True}),
    "tiles16x16_bs5": ((16, 16), (16, 16), 5, (1, 2, 1, 37, 37, 24), {"window": (9, 9)}),
}


@pytest.mark.parametrize("case", list(TILE_CASES))
@pytest.mark.parametrize("sparse", [True, False], ids=["block_mask", "dense"])
def test_tile_shapes(case, sparse, monkeypatch):
    if not backends.triton_interpreted():
        pytest.skip("tile shapes are fixed only under the interpreter")
    fwd, bwd, bs, (B, Hq, Hkv, Sq, Sk, D), opts = TILE_CASES[case]
    monkeypatch.setitem(tattn.INTERPRET_TILES, "fwd", fwd)
    monkeypatch.setitem(tattn.INTERPRET_TILES, "bwd", bwd)
    q, k, v = _rand(B, Hq, Sq, D), _rand(B, Hkv, Sk, D), _rand(B, Hkv, Sk, D)
    kw = {"causal": opts.get("causal", False), "window": opts.get("window"),
          "softcap": opts.get("softcap", 0.0)}
    if opts.get("softcap"):
        q = q * 4
    if opts.get("alibi"):
        kw["alibi_slopes"] = tk.alibi_slopes(Hq, device=DEV)
    if opts.get("key_mask"):
        kw["key_mask"] = torch.rand(B, Sk, device=DEV) > 0.25
    if sparse:
        kw["block_mask"] = torch.rand(B, Hq, math.ceil(Sq / bs), math.ceil(Sk / bs), device=DEV) > 0.5
        kw["block_size"] = bs
    _compare(q, k, v, kw)


# ----------------------------------------------------------------------------- block skipping
@pytest.mark.parametrize("how", ["window", "block_mask"])
def test_skipped_tiles_are_never_read(how, monkeypatch):
    """NaN values in key tiles a query tile must skip: if any program visited such a tile, the
    NaN would reach its output through p @ V (0 * NaN = NaN) or its dq through dS @ K."""
    if backends.triton_interpreted():
        monkeypatch.setitem(tattn.INTERPRET_TILES, "fwd", (32, 32))
        monkeypatch.setitem(tattn.INTERPRET_TILES, "bwd", (32, 32))
    S, D = 256, 32
    q, k, v = (torch.randn(1, 2, S, D, device=DEV) for _ in range(3))
    if how == "window":
        kw = {"window": (40, 0)}
    else:
        kw = {"block_mask": sparse.local_layout(S, block_size=64, num_local_blocks=2, causal=True,
                                                   device=DEV), "block_size": 64}
    clean_ref = reference.attention(q.double(), k.double(), v.double(), **kw).float()
    k[:, :, :64] = float("nan")  # key tiles 0-1: invisible to queries >= 128 in both settings
    v[:, :, :64] = float("nan")
    qq = q.clone().requires_grad_(True)
    out = tk.attention(qq, k, v, backend="triton", **kw)
    out.backward(torch.randn_like(out))
    late = slice(128, None)
    assert torch.isfinite(out[:, :, late]).all()
    assert torch.isfinite(qq.grad[:, :, late]).all()
    torch.testing.assert_close(out[:, :, late], clean_ref[:, :, late], rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------- shapes, dtypes
@pytest.mark.parametrize("D", [1, 8, 24, 200])
def test_odd_head_dims(D):
    _compare(_rand(1, 2, 19, D), _rand(1, 1, 23, D), _rand(1, 1, 23, D), {"causal": True})


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("opts", ["causal_gqa", "sparse_alibi_softcap"])
def test_half_precision(dtype, opts):
    B, Hq, Hkv, Sq, Sk, D = 1, 4, 2, 40, 50, 64
    q, k, v = _rand(B, Hq, Sq, D), _rand(B, Hkv, Sk, D), _rand(B, Hkv, Sk, D)
    if opts == "causal_gqa":
        kw = {"causal": True}
    else:
        kw = {"alibi_slopes": tk.alibi_slopes(Hq, device=DEV), "softcap": 6.0,
              "block_mask": sparse.bigbird_layout(Sq, Sk, block_size=16, heads=Hq, device=DEV),
              "block_size": 16, "key_mask": torch.rand(B, Sk, device=DEV) > 0.2}
    _compare(q, k, v, kw, dtype=dtype)


def test_strided_and_broadcast_inputs():
    """Non-contiguous q/k/v/grad (sliced head dim, permuted), stride-0 slopes and block mask."""
    B, Hq, Hkv, S, D = 2, 4, 2, 33, 32
    q = _rand(B, S, Hq, 2 * D).transpose(1, 2)[..., ::2]
    k = _rand(Hkv, B, S, D).transpose(0, 1)
    v = _rand(B, Hkv, D, S).transpose(-1, -2)
    kw = {"alibi_slopes": torch.rand(1, Hq, device=DEV).expand(B, Hq),
          "block_mask": torch.rand(1, 1, 3, 3, device=DEV) > 0.3, "block_size": 16, "causal": True}
    _compare(q, k, v, kw)


@pytest.mark.parametrize("shape", [(1, 2, 0, 5, 16), (1, 2, 3, 0, 16), (0, 2, 3, 5, 16)],
                         ids=["Sq0", "Sk0", "B0"])
def test_empty(shape):
    B, H, Sq, Sk, D = shape
    q = torch.randn(B, H, Sq, D, device=DEV, requires_grad=True)
    k = torch.randn(B, H, Sk, D, device=DEV, requires_grad=True)
    v = torch.randn(B, H, Sk, D, device=DEV, requires_grad=True)
    out, lse = tk.attention(q, k, v, return_lse=True, backend="triton")
    assert out.shape == q.shape and torch.all(out == 0) and torch.all(lse == float("-inf"))
    out.sum().backward()
    for t in (q, k, v):
        assert t.grad.shape == t.shape and torch.all(t.grad == 0)


# ----------------------------------------------------------------------------- errors
def test_unsupported_dtype_names_other_backends():
    q = torch.randn(1, 1, 4, 16, dtype=torch.float64, device=DEV)
    with pytest.raises(backends.BackendError, match="cpu"):
        tk.attention(q, q, q, backend="triton")
    with pytest.raises(backends.BackendError, match="'cpu' or 'reference'"):
        tattn.attention_fwd(q, q, q, 0.25, -1, -1, None, None, 64, None, 0.0)


def test_cpu_tensors_without_interpreter(monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    q = torch.randn(1, 1, 4, 16)
    with pytest.raises(backends.BackendError, match="backend='cpu'"):
        tattn.attention_fwd(q, q, q, 0.25, -1, -1, None, None, 64, None, 0.0)


# ----------------------------------------------------------------------------- GPU configs
@pytest.mark.parametrize("D", [16, 32, 64, 80, 128, 256])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("arch", [80, 90])
def test_autotune_pruning(D, dtype, arch, monkeypatch):
    """The config pruning (which runs on GPUs only) keeps, for every head dim, dtype and length,
    at least one config; for 16-bit inputs every table entry of long sequences; 16-row query
    tiles for decoding only; and tiles no larger than the sequence needs."""
    limit = {80: 164, 90: 227}[arch] * 1024
    monkeypatch.setattr(tattn, "_arch", lambda index: (arch, limit))
    q = torch.empty(0, dtype=dtype)
    bd = max(16, 1 << (D - 1).bit_length())
    for kind in ("fwd", "dkdv", "dq"):
        configs = tattn._configs(kind)
        table = set(tattn._TABLE[arch][kind][tattn._dclass(bd)])
        for sq, sk in ((1, 4096), (16, 16), (33, 1000), (1024, 1024), (16384, 16384)):
            kept = tattn._prune(kind)(configs, {}, Q=q, BLOCK_D=bd, SQ_KEY=sq, SK_KEY=sk)
            assert kept, (kind, sq, sk)
            shapes = {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) for c in kept}
            if len(kept) > 1 or dtype != torch.float32:
                assert shapes <= table
            if kind == "fwd" and sq == 1:
                assert all(c.kwargs["BLOCK_M"] == 16 for c in kept)
            if kind != "dkdv" and sq >= 1024 and len(kept) > 1:
                assert all(c.kwargs["BLOCK_M"] > 16 for c in kept)
            if sq >= 1024 and dtype != torch.float32:
                assert shapes == {t for t in table if t[0] > 16 or kind == "dkdv"}, kind
            if sk <= 16 and len(kept) > 1:  # a single config may be the smallest fallback
                assert all(c.kwargs["BLOCK_N"] <= 32 for c in kept)
        bm, bn = tattn._list_tiles("fwd" if kind == "fwd" else "bwd", bd)
        warp = tattn._prune(kind)(tattn._WARP_CONFIGS, {}, Q=q, BLOCK_D=bd, SQ_KEY=1024,
                                  SK_KEY=1024, BLOCK_M=bm, BLOCK_N=bn)
        assert warp and (dtype == torch.float32 or len(warp) == len(tattn._WARP_CONFIGS))


# ----------------------------------------------------------------------------- GPU compilation
_COMPILE_SCRIPT = r"""
import json, sys
import triton, triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from truthgpt_kernels.triton import attention as A

arch = int(sys.argv[1])
FLAGS = ("HAS_ALIBI", "HAS_SOFTCAP", "HAS_LEFT", "HAS_RIGHT", "HAS_LIST", "HAS_KMASK", "VARLEN")
TENSORS = {"LSE": "fp32", "DELTA": "fp32", "SLOPES": "fp32", "BMASK": "u8", "KMASK": "u8",
           "LIST": "i32", "CNT": "i32", "ONE": "i8", "CU_Q": "i32", "CU_K": "i32"}
out = []
for kind, fn in (("fwd", A._attn_fwd), ("dkdv", A._attn_bwd_dkdv), ("dq", A._attn_bwd_dq)):
    for dt, D, on, tiles in (("bf16", 128, ("HAS_RIGHT",), A._TABLE[arch][kind][128][0]),
                             ("fp16", 80, FLAGS, A._LIST_TILES["fwd" if kind == "fwd" else "bwd"][128]
                              + A._LIST_WARPS[0]),
                             ("fp32", 32, ("HAS_LEFT", "HAS_RIGHT", "HAS_ALIBI"), (64, 32, 4, 2)),
                             ("bf16", 64, ("HAS_LEFT", "HAS_RIGHT", "HAS_ALIBI", "HAS_SOFTCAP", "VARLEN"),
                              A._TABLE[arch][kind][64][0])):
        bm, bn, warps, stages = tiles
        consts = dict(HEAD_DIM=D, BLOCK_D=max(16, triton.next_power_of_2(D)), BLOCK_M=bm, BLOCK_N=bn,
                      PREC="tf32x3" if dt == "fp32" else "tf32", DOT_T=getattr(tl, {"bf16": "bfloat16",
                      "fp16": "float16", "fp32": "float32"}[dt]), **{f: f in on for f in FLAGS},
                      HAS_REL=False, HAS_DROPOUT=False, DROP4=False)  # (compiled on in test_attention_rel_bias_dropout_triton)
        if "HAS_ONE" in fn.arg_names:  # the backward's one-key-row path (issue #19)
            consts["HAS_ONE"] = dt != "bf16" or "VARLEN" in on  # varlen: always
        sig = {}
        for name in fn.arg_names:
            if name in consts:
                sig[name] = "constexpr"
            elif name in TENSORS or name in ("Q", "K", "V", "O", "DO", "DQ", "DK", "DV"):
                sig[name] = "*" + TENSORS.get(name, dt)
            else:
                sig[name] = "fp32" if name in ("scale", "softcap") else "i32"
        k = triton.compile(ASTSource(fn, sig, constexprs=consts), target=GPUTarget("cuda", arch, 32),
                           options={"num_warps": warps, "num_stages": stages})
        out.append([kind, dt, D, k.metadata.shared, "mma" in k.asm["ptx"]])
print(json.dumps(out))
"""


@pytest.mark.parametrize("arch", [80, 90])
def test_kernels_compile_for_gpus(arch):
    """Without a GPU the interpreter checks semantics but not the GPU lowering: compile the
    kernels (a dense bf16 config, every feature in fp16 with the tile-list shapes, fp32, varlen) to
    cubin for sm_80 and sm_90 in a subprocess without TRITON_INTERPRET, and check they use
    tensor cores and fit the shared memory."""
    compile_offline_and_check(_COMPILE_SCRIPT, arch)


def compile_offline_and_check(script, arch, timeout=600):
    """Runs `script` (printing a JSON list of [kind, dtype, D, shared bytes, uses mma] as its
    last line) for `arch` in a subprocess without TRITON_INTERPRET and checks every kernel."""
    import json
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    r = subprocess.run([sys.executable, "-c", script, str(arch)], env=env, cwd=root,
                       capture_output=True, text=True, timeout=timeout)
    if r.returncode and ("ptxas" in r.stderr and "not found" in r.stderr.lower()):
        pytest.skip("no ptxas for offline compilation")
    assert r.returncode == 0, r.stderr[-3000:]
    limit = {80: 164, 90: 227}[arch] * 1024
    for kind, dt, D, shared, mma in json.loads(r.stdout.strip().splitlines()[-1]):
        assert 0 < shared <= limit, (kind, dt, D, shared)
        assert mma, f"{kind} {dt} D{D}: no tensor-core instructions"


# ----------------------------------------------------------------------------- torch.compile
def test_torch_compile_fullgraph():
    q, k, v = (torch.randn(1, 2, 20, 16, device=DEV, requires_grad=True) for _ in range(3))
    slopes = tk.alibi_slopes(2, device=DEV)

    def f(q, k, v):
        return tk.attention(q, k, v, causal=True, alibi_slopes=slopes, backend="triton")

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    out = compiled(q, k, v)
    out.sum().backward()
    grads = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    f(q, k, v).sum().backward()
    torch.testing.assert_close(out, f(q, k, v))
    for g, t in zip(grads, (q, k, v)):
        torch.testing.assert_close(g, t.grad)


# ----------------------------------------------------------------------------- GPU bench cases
def test_gpu_bench_cases_are_well_formed():
    from truthgpt_kernels.bench import Case
    from truthgpt_kernels.bench import attention as ab

    cases = ab.gpu_cases()
    assert cases and all(isinstance(c, Case) and c.flops > 0 and len(c.impls) == 2 for c in cases)
    assert len({c.name for c in cases}) == len(cases)
    assert {c.name.split()[0] for c in cases} == {"fwd", "fwd+bwd"}
    assert len(ab.gpu_cases(quick=True)) < len(cases)
    for S, left in ((100, 30), (100, 200), (1024, 1024), (4096, 1024)):
        vis = reference.attention_visibility(1, 1, S, S, causal=True, window=(left, -1))
        assert ab._window_pairs(S, S, left, 0) == int(vis.sum())
    assert ab._causal_pairs(64, 64) == int(reference.attention_visibility(1, 1, 64, 64, causal=True).sum())
