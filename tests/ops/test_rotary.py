"""tk.apply_rotary / tk.apply_rotary_qk on every backend against the float64 reference:
values and gradients, both pairings, partial rotary, position ids in every form, any strides."""
import pytest
import torch

import truthgpt_kernels as tk
from truthgpt_kernels.ops import reference

from ..helpers import assert_close, backend_params, device_for, leaf
from .interpreter import bf16_rounding_known

BACKENDS = backend_params("rotary")
SHAPES = [(3, 7, 9, 80), (2, 3, 17, 64)]  # (B, H, S, D)


def _dtypes(backend):
    return ([torch.float32, torch.bfloat16] + ([torch.float64] if backend in ("cpu", "reference") else [])
            + ([torch.float16] if backend == "cpu" else []))


def eager(x, cos, sin, interleaved=False, position_ids=None, offset=0):
    """The same-dtype eager PyTorch formula (Hugging Face's rotate_half, or its interleaved
    form), computed in x's dtype: the baseline error."""
    S, R = x.shape[2], 2 * cos.shape[-1]
    pos = torch.arange(offset, offset + S, device=x.device) if position_ids is None else position_ids
    c, s = cos.to(x.dtype)[pos], sin.to(x.dtype)[pos]
    if c.dim() == 3:
        c, s = c[:, None], s[:, None]
    rot, rest = x[..., :R], x[..., R:]
    if interleaved:
        c, s = c.repeat_interleave(2, -1), s.repeat_interleave(2, -1)
        half_rot = torch.stack((-rot[..., 1::2], rot[..., 0::2]), -1).flatten(-2)
    else:
        c, s = torch.cat((c, c), -1), torch.cat((s, s), -1)
        half_rot = torch.cat((-rot[..., R // 2:], rot[..., : R // 2]), -1)
    return torch.cat((rot * c + half_rot * s, rest), -1)


def _positions(kind, B, S, P, dev):
    """kwargs for apply_rotary: offset, (S,) ids with gaps and repeats, or (B, S) ids."""
    if kind == "offset":
        return {"offset": P - S - 1}
    if kind == "ids_s":
        ids = torch.randint(0, P, (S,), device=dev)
        ids[1::3] = ids[0]  # repeats
        ids[-1] = P - 1     # the last row of cos/sin
        return {"position_ids": ids}
    ids = torch.randint(0, P, (B, S), device=dev)
    ids[:, 0] = 0
    return {"position_ids": ids}


def _check(backend, x64, cos, sin, kw, dtype, make_x=None, name=""):
    """Values and gradient of apply_rotary against the float64 reference and the eager
    baseline; make_x lays the input out (e.g. a non-contiguous view)."""
    make_x = make_x or (lambda t: t)
    x, base_x, ref_x = leaf(x64, dtype), leaf(x64, dtype), None
    out = tk.apply_rotary(make_x(x), cos, sin, backend=backend, **kw)
    assert out.dtype == dtype and out.shape == make_x(x64).shape
    dy64 = torch.randn(out.shape, dtype=torch.float64, device=x64.device)
    out.backward(dy64.to(dtype))
    ref_x = leaf(x.detach().double())
    ref = reference.apply_rotary(make_x(ref_x), cos.double(), sin.double(), **kw)
    ref.backward(dy64)
    base = eager(make_x(base_x), cos, sin, **kw)
    base.backward(dy64.to(dtype))
    tag = f"{name}[{dtype}, cos {cos.dtype}]"
    with bf16_rounding_known(backend, dtype):
        assert_close(f"out{tag}", out, ref, base)
        assert_close(f"grad{tag}", x.grad, ref_x.grad, base_x.grad)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("interleaved", [False, True], ids=["neox", "interleaved"])
@pytest.mark.parametrize("rotary", ["full", "partial"])
@pytest.mark.parametrize("positions", ["offset", "ids_s", "ids_bs"])
def test_rotary_matches_reference(backend, interleaved, rotary, positions):
    dev = device_for(backend)
    for B, H, S, D in SHAPES:
        R = D if rotary == "full" else D // 2 + 2 * (D % 8 == 0)  # e.g. 42 of 80: odd R/2
        P = S + 11
        x64 = torch.randn(B, H, S, D, dtype=torch.float64, device=dev)
        kw = dict(_positions(positions, B, S, P, dev), interleaved=interleaved)
        for dtype in _dtypes(backend):
            cos_dtypes = [torch.float32] + ([dtype] if dtype != torch.float32 else [])
            for cdtype in cos_dtypes:
                cos, sin = tk.rotary_cos_sin(P, R, device=dev, dtype=cdtype)
                _check(backend, x64, cos, sin, kw, dtype, name=f"({B},{H},{S},{D}) R{R}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["bshd", "strided_inner", "cos_slice"])
def test_rotary_non_contiguous(backend, layout):
    dev = device_for(backend)
    B, H, S, D, P = 2, 5, 11, 48, 20
    cos, sin = tk.rotary_cos_sin(P, 32, device=dev)
    if layout == "bshd":  # (B, S, H, D) transposed to (B, H, S, D), as after a projection
        x64, make = torch.randn(B, S, H, D, dtype=torch.float64, device=dev), lambda t: t.transpose(1, 2)
    elif layout == "strided_inner":  # every other element of the head dim
        x64, make = torch.randn(B, H, S, 2 * D, dtype=torch.float64, device=dev), lambda t: t[..., ::2]
    else:  # cos/sin as column slices of wider tables (row stride > R/2)
        x64, make = torch.randn(B, H, S, D, dtype=torch.float64, device=dev), None
        wide_cos, wide_sin = tk.rotary_cos_sin(P, 64, device=dev)
        cos, sin = wide_cos[:, :16], wide_sin[:, :16]
    ids = torch.randint(0, P, (B, S), device=dev)
    for interleaved in (False, True):
        for dtype in (torch.float32, torch.bfloat16):
            _check(backend, x64, cos, sin, {"position_ids": ids, "interleaved": interleaved}, dtype,
                   make_x=make, name=layout)
    # position ids of batch 1, broadcast over the batch
    _check(backend, x64, cos, sin, {"position_ids": ids[:1]}, torch.float32, make_x=make, name="ids(1,S)")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("hk", [1, 2, 4])
@pytest.mark.parametrize("interleaved", [False, True], ids=["neox", "interleaved"])
def test_rotary_qk(backend, hk, interleaved):
    dev = device_for(backend)
    B, Hq, S, D, P = 2, 4, 13, 64, 30
    cos, sin = tk.rotary_cos_sin(P, 48, device=dev)  # partial: 48 of 64
    ids = torch.randint(0, P, (B, S), device=dev)
    q64 = torch.randn(B, Hq, S, D, dtype=torch.float64, device=dev)
    k64 = torch.randn(B, S, hk, D, dtype=torch.float64, device=dev).transpose(1, 2)  # strided
    kw = {"position_ids": ids, "interleaved": interleaved}
    for dtype in (torch.float32, torch.bfloat16):
        q, k = leaf(q64, dtype), leaf(k64, dtype)
        oq, ok = tk.apply_rotary_qk(q, k, cos, sin, backend=backend, **kw)
        dq64, dk64 = torch.randn_like(q64), torch.randn_like(k64)
        torch.autograd.backward((oq, ok), (dq64.to(dtype), dk64.to(dtype)))
        rq, rk = leaf(q.detach().double()), leaf(k.detach().double())
        eq, ek = reference.apply_rotary(rq, cos, sin, **kw), reference.apply_rotary(rk, cos, sin, **kw)
        torch.autograd.backward((eq, ek), (dq64, dk64))
        bq, bk = leaf(q64, dtype), leaf(k64, dtype)
        baseq, basek = eager(bq, cos, sin, **kw), eager(bk, cos, sin, **kw)
        torch.autograd.backward((baseq, basek), (dq64.to(dtype), dk64.to(dtype)))
        with bf16_rounding_known(backend, dtype):
            assert_close(f"q[{dtype}]", oq, eq, baseq)
            assert_close(f"k[{dtype}]", ok, ek, basek)
            assert_close(f"dq[{dtype}]", q.grad, rq.grad, bq.grad)
            assert_close(f"dk[{dtype}]", k.grad, rk.grad, bk.grad)


@pytest.mark.parametrize("backend", BACKENDS)
def test_rotary_qk_matches_apply_rotary(backend):
    """One pass over q and k gives what two apply_rotary calls give, bit for bit."""
    dev = device_for(backend)
    cos, sin = tk.rotary_cos_sin(40, 32, device=dev)
    q, k = torch.randn(3, 6, 9, 32, device=dev), torch.randn(3, 2, 9, 32, device=dev)
    oq, ok = tk.apply_rotary_qk(q, k, cos, sin, offset=5, backend=backend)
    assert torch.equal(oq, tk.apply_rotary(q, cos, sin, offset=5, backend=backend))
    assert torch.equal(ok, tk.apply_rotary(k, cos, sin, offset=5, backend=backend))


CPU_ISAS = ["portable", "avx2", "avx512", "avx512bf16"]


@pytest.mark.parametrize("isa", CPU_ISAS)
def test_rotary_cpu_instruction_sets(isa, monkeypatch):
    """Every compiled instruction-set path of the CPU kernel (capped by TRUTHGPT_CPU_ISA;
    a path the CPU lacks falls back to the best one it has)."""
    if not tk.available_backends()["cpu"]["available"]:
        pytest.skip("C++ CPU extension not built")
    monkeypatch.setenv("TRUTHGPT_CPU_ISA", isa)
    B, H, S, P = 2, 3, 7, 12
    for D, R in [(80, 80), (80, 42), (6, 2), (40, 36)]:
        x64 = torch.randn(B, H, S, D, dtype=torch.float64)
        ids = torch.randint(0, P, (B, S))
        for interleaved in (False, True):
            for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
                for cdtype in {torch.float32, dtype}:
                    cos, sin = tk.rotary_cos_sin(P, R, dtype=cdtype)
                    _check("cpu", x64, cos, sin, {"position_ids": ids, "interleaved": interleaved},
                           dtype, name=f"D{D} R{R}")


@pytest.mark.parametrize("isa", CPU_ISAS)
def test_rotary_cpu_float16_conversions_are_exact(isa, monkeypatch):
    """float16 loads widen exactly and stores round to nearest even like torch, on every path,
    overflow to inf, subnormal halves and NaN included: with sin = 0 the kernel computes x * c
    in float32 and rounds it once, so it must equal torch's (x.float() * c).half() bit for bit."""
    if not tk.available_backends()["cpu"]["available"]:
        pytest.skip("C++ CPU extension not built")
    monkeypatch.setenv("TRUTHGPT_CPU_ISA", isa)
    bits = torch.arange(0, 1 << 16, dtype=torch.int32).to(torch.int16)  # every half value
    x1 = bits.view(torch.float16).reshape(1, 1, 1 << 11, 32)
    x = torch.cat([x1, torch.zeros_like(x1)], -1)  # rotated pairs (x1, 0): out1 = x1 * c - 0
    for c in (1.0, 0.37, 3.1e-5, 1e-3 / 7, 1.9990234375, 12345.6):
        cos = torch.full((1 << 11, 32), c)
        out = tk.apply_rotary(x, cos, torch.zeros_like(cos), backend="cpu")[..., :32]
        want = (x1.float() * c).half()
        nan = torch.isnan(want)
        assert torch.equal(torch.isnan(out), nan), f"c={c}: NaN lanes"
        assert torch.equal(out[~nan].view(torch.int16), want[~nan].view(torch.int16)), f"c={c}"


def test_rotary_gradcheck_cpu():
    if not tk.available_backends()["cpu"]["available"]:
        pytest.skip("C++ CPU extension not built")
    cos, sin = tk.rotary_cos_sin(8, 4, dtype=torch.float64)
    ids = torch.tensor([[3, 0, 7], [1, 1, 5]])
    x = torch.randn(2, 2, 3, 6, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, 1, 3, 6, dtype=torch.float64, requires_grad=True)
    for interleaved in (False, True):
        assert torch.autograd.gradcheck(
            lambda a: tk.apply_rotary(a, cos, sin, position_ids=ids, interleaved=interleaved,
                                      backend="cpu"), (x,))
        assert torch.autograd.gradcheck(
            lambda a, b: tk.apply_rotary_qk(a, b, cos, sin, position_ids=ids, interleaved=interleaved,
                                            backend="cpu"), (x, k))


def test_rotary_bad_input():
    x = torch.randn(2, 3, 5, 8)
    cos, sin = tk.rotary_cos_sin(6, 8)
    with pytest.raises(ValueError, match="cos/sin cover 6 positions"):
        tk.apply_rotary(x, cos, sin, offset=2)  # positions 2..6 need 7 rows
    with pytest.raises(ValueError, match=r"position_ids must lie in \[0, 6\)"):
        tk.apply_rotary(x, cos, sin, position_ids=torch.tensor([0, 1, 2, 3, 6]))
    with pytest.raises(ValueError, match=r"position_ids must lie in \[0, 6\)"):
        tk.apply_rotary(x, cos, sin, position_ids=torch.tensor([0, 1, -1, 3, 4]))
    with pytest.raises(TypeError, match="position_ids must have dtype"):
        tk.apply_rotary(x, cos, sin, position_ids=torch.arange(5.0))
    with pytest.raises(ValueError, match="position_ids must have shape"):
        tk.apply_rotary(x, cos, sin, position_ids=torch.arange(4))
    with pytest.raises(ValueError, match="position_ids must have shape"):
        tk.apply_rotary(x, cos, sin, position_ids=torch.zeros(3, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="rotary_dim must be even"):
        tk.rotary_cos_sin(6, 5)
    big_cos, big_sin = tk.rotary_cos_sin(6, 10)
    with pytest.raises(ValueError, match="cos: rotary dim .* exceeds the head dim 8"):
        tk.apply_rotary(x, big_cos, big_sin)
    with pytest.raises(ValueError, match="sin must have shape"):
        tk.apply_rotary(x, cos, sin[:, :2])
    with pytest.raises(TypeError, match="sin must have the dtype of cos"):
        tk.apply_rotary(x, cos, sin.double())
    with pytest.raises(ValueError, match="x must have 4 dimensions"):
        tk.apply_rotary(x[0], cos, sin)
    with pytest.raises(ValueError, match="k must match q"):
        tk.apply_rotary_qk(x, torch.randn(2, 3, 4, 8), cos, sin)
    with pytest.raises(TypeError, match="k must have the dtype of q"):
        tk.apply_rotary_qk(x, x.double(), cos, sin)


def test_rotary_kernel_checks_positions_cpu():
    """The kernel op itself refuses out-of-range positions (no out-of-bounds reads)."""
    if not tk.available_backends()["cpu"]["available"]:
        pytest.skip("C++ CPU extension not built")
    x = torch.randn(1, 2, 3, 8)
    cos, sin = tk.rotary_cos_sin(4, 8)
    bad = torch.tensor([[0, 4, 1]])
    with pytest.raises(RuntimeError, match="position_ids must lie in"):
        torch.ops.truthgpt.rotary_fwd(x, cos, sin, bad, False)
