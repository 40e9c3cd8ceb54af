"""Triton-specific tests of the relative-position bias and dropout (the shared grids are
test_attention_rel_bias.py and test_attention_dropout.py): every kernel option at once with tile
shapes whose query and key tiles differ (the bias gradient's skewed reduction), one-key rows
under dropout (dS exactly 0), a relaunched dQ kernel (autotuning repeats launches), Philox
counters past 2^32, and the GPU lowering of the new paths."""
import pytest
import torch

from truthgpt_kernels.ops import reference

from ..helpers import backend_params
from .test_attention_triton import compile_offline_and_check

[TRITON] = [p for p in backend_params("attention") if p.values[0] == "triton"]
pytestmark = [pytest.mark.triton] + [m for m in TRITON.marks if m.name == "skip"]

if not any(m.name == "skip" for m in TRITON.marks):
    import triton
    import triton.language as tl

    from truthgpt_kernels.triton import attention as tattn

    @triton.jit
    def _keep_tile(OUT, row0, n0, Sk, seed_lo, seed_hi, dthresh, BM: tl.constexpr, BN: tl.constexpr,
                   FOUR: tl.constexpr):
        i = tl.arange(0, BM)[:, None]
        j = tl.arange(0, BN)[None, :]
        if FOUR:
            keep = tattn._dropout_keep4(row0, tl.arange(0, BM), n0, Sk, seed_lo, seed_hi, dthresh, BM, BN)
        else:
            keep = tattn._dropout_keep(row0, i, n0 + j, Sk, seed_lo, seed_hi, dthresh)
        tl.store(OUT + i * BN + j, keep.to(tl.int8))


def _kernel_args(B, Hq, Hkv, Sq, Sk, D, *, window=(-1, -1), alibi=False, softcap=0.0, key_mask=False,
                 block_size=0, rel=True, p=0.0, seed=0, gen_seed=0):
    """Kernel-level inputs (float64) of attention_fwd after the first five arguments."""
    g = torch.Generator().manual_seed(gen_seed)
    q, k, v = (torch.randn(B, H, S, D, generator=g, dtype=torch.float64)
               for H, S in ((Hq, Sq), (Hkv, Sk), (Hkv, Sk)))
    slopes = torch.rand(B, Hq, generator=g) * 0.3 if alibi else None
    bm = None
    if block_size:
        bm = torch.rand(B, Hq, -(-Sq // block_size), -(-Sk // block_size), generator=g) > 0.3
    km = None
    if key_mask:
        km = torch.rand(B, Sk, generator=g) > 0.25
        km[:, -1] = True
    relb = torch.randn(Hq, Sq + Sk - 1, generator=g) if rel else None
    opts = (window[0], window[1], slopes, bm, block_size or 64, km, softcap, relb, p,
            torch.tensor(seed, dtype=torch.int64))
    return (q, k, v), opts


def _run(qkv, opts, scale=0.3, dtype=torch.float32):
    """(out, lse, dq, dk, dv, drel) of the triton kernels and of the float64 reference."""
    q, k, v = qkv
    do = torch.randn(q.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    ref_out, ref_lse = reference.attention_fwd(q, k, v, scale, *opts[:7],
                                               None if opts[7] is None else opts[7].double(), *opts[8:])
    ref_grads = reference.attention_bwd(do, q, k, v, ref_out, ref_lse, scale, *opts[:7],
                                        None if opts[7] is None else opts[7].double(), *opts[8:])
    ql, kl, vl, dol = (t.to(dtype) for t in (q, k, v, do))
    out, lse = tattn.attention_fwd(ql, kl, vl, scale, *opts)
    grads = tattn.attention_bwd(dol, ql, kl, vl, out, lse, scale, *opts)
    return (out, lse) + tuple(grads), (ref_out, ref_lse) + tuple(ref_grads)


def _assert_matches(ours, ref):
    for name, a, r in zip(("out", "lse", "dq", "dk", "dv", "drel"), ours, ref):
        fin = torch.isfinite(r)
        assert torch.equal(fin, torch.isfinite(a)), name
        tol = 2e-4 * max(1.0, r[fin].abs().max().item()) if fin.any() else 0.0
        torch.testing.assert_close(a[fin].double(), r[fin].double(), rtol=0, atol=tol, msg=name)


@pytest.mark.parametrize("tiles", [(16, 32), (32, 16)])
@pytest.mark.parametrize("case", ["window_alibi_softcap_gqa", "blocks_keymask_sq_gt_sk",
                                  "keys_multiple_of_4_causal_gqa"])
def test_every_option_with_rel_bias_and_dropout(case, tiles, monkeypatch):
    monkeypatch.setitem(tattn.INTERPRET_TILES, "fwd", tiles)
    monkeypatch.setitem(tattn.INTERPRET_TILES, "bwd", tiles)
    if case == "window_alibi_softcap_gqa":
        qkv, opts = _kernel_args(2, 4, 2, 45, 39, 16, window=(9, 4), alibi=True, softcap=3.0, p=0.3,
                                 seed=2 ** 40 + 77)
    elif case == "blocks_keymask_sq_gt_sk":
        qkv, opts = _kernel_args(1, 2, 1, 50, 21, 16, block_size=8, key_mask=True, p=0.2, seed=9,
                                 gen_seed=1)
    else:  # four keys per Philox call
        qkv, opts = _kernel_args(2, 4, 1, 27, 44, 16, window=(-1, 0), p=0.4, seed=2 ** 33 + 1, gen_seed=2)
    ours, ref = _run(qkv, opts)
    _assert_matches(ours, ref)


def test_one_key_rows_with_dropout():
    """window (0, 0): each row sees one key, its softmax is constant: dS exactly 0, so dQ, dK
    and the bias gradient are exactly 0 (delta taken from the dropped dP)."""
    qkv, opts = _kernel_args(1, 2, 2, 40, 40, 16, window=(0, 0), p=0.5, seed=3)
    ours, ref = _run(qkv, opts)
    _assert_matches(ours, ref)
    for t in (ours[2], ours[3], ours[5]):
        assert torch.equal(t, torch.zeros_like(t))


def test_relaunched_dq_kernel_gives_the_same_bias_gradient(monkeypatch):
    """Autotuning launches a kernel several times on the same buffers: the dQ kernel's rows of
    the bias gradient must not accumulate across launches."""
    qkv, opts = _kernel_args(1, 2, 2, 33, 33, 16, window=(-1, 0), p=0.1, seed=11)
    once, _ = _run(qkv, opts)
    launch = tattn._launch

    def twice(tuned, raw, *args):
        if raw is tattn._attn_bwd_dq:
            launch(tuned, raw, *args)
        launch(tuned, raw, *args)

    monkeypatch.setattr(tattn, "_launch", twice)
    again, _ = _run(qkv, opts)
    for a, b in zip(once, again):
        assert torch.equal(a, b)


@pytest.mark.parametrize("four", [False, True])
@pytest.mark.parametrize("seed", [0, 0xFFFFFFFF, 2 ** 62 - 3])
@pytest.mark.parametrize("p", [0.1, 0.9])
def test_philox_counters_past_2_32(seed, p, four):
    """The keep mask of a tile far into the stream (counter high word != 0), for seeds with
    high bits and thresholds past 2^31 (the int32-passed words read back as uint32); per
    element, and four keys per Philox call (Sk % 4 == 0)."""
    row0, n0, Sk, BN = 2 ** 36 // 64 + 5, 32, 64, 32
    out = torch.zeros(16, BN, dtype=torch.int8)
    th = reference.dropout_threshold(p)
    _keep_tile[(1,)](out, row0, n0, Sk, tattn._i32(seed), tattn._i32(seed >> 32), tattn._i32(th), BM=16,
                     BN=BN, FOUR=four)
    e = ((row0 + torch.arange(16)[:, None]) * Sk + n0 + torch.arange(BN)[None, :]).flatten()
    words = torch.stack(reference.philox_words(seed, e >> 2), -1).gather(1, (e & 3)[:, None]).squeeze(1)
    assert torch.equal(out.bool().flatten(), words >= th)


_COMPILE_SCRIPT = r"""
import json, sys
import triton, triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from truthgpt_kernels.triton import attention as A

arch = int(sys.argv[1])
FLAGS = ("HAS_ALIBI", "HAS_SOFTCAP", "HAS_LEFT", "HAS_RIGHT", "HAS_LIST", "HAS_KMASK")
PTRS = {"LSE": "fp32", "DELTA": "fp32", "SLOPES": "fp32", "BMASK": "u8", "KMASK": "u8", "LIST": "i32",
        "CNT": "i32", "ONE": "i8", "CU_Q": "i32", "CU_K": "i32", "REL": "fp32", "DREL": "fp32",
        "DSCR": "fp32", "SEEDS": "i32"}
out = []
for kind, fn in (("fwd", A._attn_fwd), ("dkdv", A._attn_bwd_dkdv), ("dq", A._attn_bwd_dq)):
    for dt, D, on, varlen in (("bf16", 128, ("HAS_RIGHT",), False), ("fp16", 64, FLAGS, False),
                              ("fp32", 32, ("HAS_LEFT",), False), ("bf16", 64, ("HAS_RIGHT", "HAS_ALIBI"), True)):
        bm, bn = A._LIST_TILES["fwd" if kind == "fwd" else "bwd"][A._dclass(max(16, D))]
        warps, stages = A._LIST_WARPS[0]
        consts = dict(HEAD_DIM=D, BLOCK_D=max(16, D), BLOCK_M=bm, BLOCK_N=bn, VARLEN=varlen,
                      HAS_REL=True, HAS_DROPOUT=True, DROP4=dt != "bf16" and not varlen,
                      PREC="tf32x3" if dt == "fp32" else "tf32",
                      DOT_T=getattr(tl, {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}[dt]),
                      **{f: f in on for f in FLAGS})
        if "HAS_ONE" in fn.arg_names:
            consts["HAS_ONE"] = True
        if "REL_W" in fn.arg_names:
            consts["REL_W"] = triton.next_power_of_2(bm + bn - 1)
        sig = {}
        for name in fn.arg_names:
            if name in consts:
                sig[name] = "constexpr"
            elif name in PTRS or name in ("Q", "K", "V", "O", "DO", "DQ", "DK", "DV"):
                sig[name] = "*" + PTRS.get(name, dt)
            else:
                sig[name] = "fp32" if name in ("scale", "softcap", "dscale") else "i32"
        k = triton.compile(ASTSource(fn, sig, constexprs=consts), target=GPUTarget("cuda", arch, 32),
                           options={"num_warps": warps, "num_stages": stages})
        out.append([kind, dt, D, k.metadata.shared, "mma" in k.asm["ptx"]])
print(json.dumps(out))
"""


@pytest.mark.parametrize("arch", [80, 90])
def test_rel_bias_dropout_kernels_compile_for_gpus(arch):
    """The interpreter checks semantics, not the GPU lowering: compile the three kernels with the
    bias and dropout on (with every other option, alone, and packed: VARLEN) to cubin for sm_80 and sm_90 in a
    subprocess without TRITON_INTERPRET; they must use tensor cores and fit the shared memory."""
    compile_offline_and_check(_COMPILE_SCRIPT, arch, timeout=900)
