"""tk.geglu on every backend against the float64 reference and torch's F.gelu(g, approximate) * u:
values and both gradients, both gelu forms."""
import pytest
import torch
import torch.nn.functional as F

import truthgpt_kernels as tk
from truthgpt_kernels.ops import reference

from ..helpers import (CPU_ISAS, assert_close, backend_params, check_gated_limits, device_for,
                       gated_isa_inputs, leaf)
from .interpreter import bf16_rounding_known

BACKENDS = backend_params("geglu")
# last dims: 1, below / not a multiple of every vector width (8, 16), long rows
SHAPES = [(7,), (5, 1), (9, 41, 341), (2, 4231), (3, 5, 64), (2, 5120)]
FORMS = ["tanh", "none"]


def _dtypes(backend):
    return [torch.float32, torch.bfloat16] + ([torch.float64] if backend in ("cpu", "reference") else [])


def eager(g, u, approximate):
    return F.gelu(g, approximate=approximate) * u


@pytest.mark.parametrize("approximate", FORMS)
def test_reference_is_torch_gelu(approximate):
    """The spec agrees with torch's F.gelu in float64, and the reference backend's written-out
    backward with autograd of the spec."""
    g, u = leaf(torch.randn(200, dtype=torch.float64) * 4), leaf(torch.randn(200, dtype=torch.float64))
    ours, theirs = reference.geglu(g, u, approximate), eager(g, u, approximate)
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-14)
    dy = torch.randn_like(ours)
    expected = torch.autograd.grad(theirs, (g, u), dy)
    for a, c in zip(reference.geglu_bwd(dy, g.detach(), u.detach(), approximate), expected):
        torch.testing.assert_close(a, c, rtol=1e-12, atol=1e-14)


def _check_grads(backend, g64, u64, dtype, approximate, make_g=None, make_u=None, name=""):
    """Value and both gradients of geglu(make_g(g), make_u(u)) against the reference."""
    make_g, make_u = make_g or (lambda t: t), make_u or (lambda t: t)
    g, u = leaf(g64, dtype), leaf(u64, dtype)
    out = tk.geglu(make_g(g), make_u(u), approximate, backend=backend)
    dy64 = torch.randn(out.shape, dtype=torch.float64, device=g64.device)
    out.backward(dy64.to(dtype))
    rg, ru = leaf(g64), leaf(u64)
    ref = reference.geglu(make_g(rg), make_u(ru), approximate)
    ref.backward(dy64)
    bg, bu = leaf(g64, dtype), leaf(u64, dtype)
    base = eager(make_g(bg), make_u(bu), approximate)
    base.backward(dy64.to(dtype))
    tag = f"{name}[{dtype}, {approximate}]"
    with bf16_rounding_known(backend, dtype):
        assert_close(f"out{tag}", out, ref, base)
        assert_close(f"dgate{tag}", g.grad, rg.grad, bg.grad)
        assert_close(f"dup{tag}", u.grad, ru.grad, bu.grad)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("approximate", FORMS)
def test_geglu_matches_reference(backend, shape, approximate):
    dev = device_for(backend)
    for dtype in _dtypes(backend):
        g64 = torch.randn(shape, dtype=torch.float64, device=dev) * 3
        u64 = torch.randn(shape, dtype=torch.float64, device=dev)
        _check_grads(backend, g64, u64, dtype, approximate)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("approximate", FORMS)
def test_geglu_packed(backend, approximate):
    """up=None: [gate | up] halves of one tensor, also laid out (S, B, 2n) viewed as (B, S, 2n)."""
    dev = device_for(backend)
    for dtype in (torch.float32, torch.bfloat16):
        x64 = torch.randn(7, 5, 2 * 131, dtype=torch.float64, device=dev) * 3
        for view in (lambda t: t, lambda t: t.transpose(0, 1)):
            x = leaf(x64, dtype)
            out = tk.geglu(view(x), approximate=approximate, backend=backend)
            dy64 = torch.randn(out.shape, dtype=torch.float64, device=dev)
            out.backward(dy64.to(dtype))
            rx = leaf(x64)
            ref = reference.geglu(view(rx), approximate=approximate)
            ref.backward(dy64)
            bx = leaf(x64, dtype)
            base = eager(*view(bx).chunk(2, -1), approximate)
            base.backward(dy64.to(dtype))
            with bf16_rounding_known(backend, dtype):
                assert_close(f"out[{dtype}]", out, ref, base)
                assert_close(f"grad[{dtype}]", x.grad, rx.grad, bx.grad)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["transposed", "row_slice", "strided_inner"])
def test_geglu_non_contiguous(backend, layout):
    dev = device_for(backend)
    shape = (5, 7, 130)
    g64 = torch.randn(shape, dtype=torch.float64, device=dev) * 3
    u64 = torch.randn(shape, dtype=torch.float64, device=dev)
    if layout == "transposed":  # (7, 5, 130) views of (5, 7, 130)
        make_g = make_u = lambda t: t.transpose(0, 1)
    elif layout == "row_slice":  # the first 100 columns: row stride 130
        make_g = make_u = lambda t: t[..., :100]
    else:  # every other column: inner stride 2
        make_g, make_u = (lambda t: t[..., ::2]), None
        u64 = u64[..., :65].contiguous()
    for approximate in FORMS:
        for dtype in (torch.float32, torch.bfloat16):
            _check_grads(backend, g64, u64, dtype, approximate, make_g, make_u, f"[{layout}]")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("approximate", FORMS)
def test_geglu_extreme_gates(backend, approximate):
    """Gates where exp saturates or underflows: values and gradients stay finite and right."""
    dev = device_for(backend)
    g64 = torch.tensor([-1e4, -200.0, -104.0, -40.0, -17.0, -13.5, -9.0, -5.0, -1e-6, 0.0, 1e-6, 5.0,
                        9.0, 13.5, 17.0, 40.0, 104.0, 200.0, 1e4], dtype=torch.float64, device=dev)
    g64 = torch.cat([g64, torch.linspace(-30, 30, 301, dtype=torch.float64, device=dev)])
    u64 = torch.randn_like(g64)
    for dtype in (torch.float32, torch.bfloat16):
        _check_grads(backend, g64, u64, dtype, approximate, name="[extreme]")


@pytest.mark.parametrize("isa", CPU_ISAS)
def test_geglu_cpu_instruction_sets(isa, monkeypatch):
    """Every compiled instruction-set path of the CPU kernels."""
    for shape, g64, u64 in gated_isa_inputs(isa, monkeypatch):
        for approximate in FORMS:
            for dtype in (torch.float32, torch.bfloat16, torch.float64):
                _check_grads("cpu", g64, u64, dtype, approximate, name=f"[{isa} {shape}]")


@pytest.mark.parametrize("approximate", FORMS)
def test_geglu_gradcheck_cpu(approximate):
    if not tk.available_backends()["cpu"]["available"]:
        pytest.skip("C++ CPU extension not built")
    g = torch.randn(3, 7, dtype=torch.float64, requires_grad=True)
    u = torch.randn(3, 7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: tk.geglu(a, b, approximate, backend="cpu"), (g, u))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("approximate", FORMS)
def test_geglu_opcheck(backend, approximate):
    dev = device_for(backend)
    g = torch.randn(4, 9, device=dev, requires_grad=True)
    u = torch.randn(4, 9, device=dev, requires_grad=True)
    torch.library.opcheck(torch.ops.truthgpt.geglu.default, (g, u, approximate, backend))
    # the packed form's op (its backward returns the [gate | up] gradient whole)
    x = torch.randn(4, 18, device=dev, requires_grad=True)
    assert "geglu_packed" in tk.geglu(x, approximate=approximate, backend=backend).grad_fn.name()
    torch.library.opcheck(torch.ops.truthgpt.geglu_packed.default, (x, approximate, backend))


def test_geglu_bad_input():
    with pytest.raises(ValueError, match="even last dim"):
        tk.geglu(torch.randn(3, 5))
    with pytest.raises(ValueError, match="up must have the shape"):
        tk.geglu(torch.randn(3, 4), torch.randn(3, 5))
    with pytest.raises(TypeError, match="up must have the dtype"):
        tk.geglu(torch.randn(3, 4), torch.randn(3, 4, dtype=torch.float64))
    with pytest.raises(TypeError, match="gate must have dtype"):
        tk.geglu(torch.ones(3, 4, dtype=torch.int64))
    with pytest.raises(TypeError, match="gate must be a torch.Tensor"):
        tk.geglu([1.0, 2.0])
    for bad in ("erf", "Tanh", None, True):
        with pytest.raises(ValueError, match="approximate must be one of 'tanh', 'none'"):
            tk.geglu(torch.randn(3, 4), torch.randn(3, 4), bad)


@pytest.mark.parametrize("isa", CPU_ISAS)
@pytest.mark.parametrize("approximate", FORMS)
def test_geglu_cpu_huge_and_nan_gates(isa, approximate, monkeypatch):
    """Gates far past exp's range: gelu and its derivative at their limits (0 below, g and 1
    above), not the saturating exp's floor times g^3 (the tanh form's gelu'(-1e13) was -0.9,
    gelu'(1e20) NaN); the tanh form gives 0 at -inf (torch: NaN); a NaN gate gives NaN in
    the output and both gradients."""
    list(gated_isa_inputs(isa, monkeypatch))  # sets TRUTHGPT_CPU_ISA, skips without the extension
    big = [-1e38, -1e20, -1e13, -1e11, -3e3, 3e3, 1e11, 1e13, 1e20, 1e38]
    if approximate == "tanh":
        big = [-float("inf")] + big
    check_gated_limits(lambda g, u: tk.geglu(g, u, approximate=approximate, backend="cpu"), big)
