import io

import pytest
import torch
import torch.nn.functional as F

import truthgpt_kernels as tk
from truthgpt_kernels.ops import reference

from ..helpers import (CPU_ISAS, assert_close, backend_params, check_gated_limits, device_for,
                       gated_isa_inputs, leaf)
from .interpreter import bf16_rounding_known

BACKENDS = backend_params("swiglu")
SHAPES = [(7,), (9, 41, 341), (2, 4231), (3, 5, 64), (4096,), (2, 5120)]


def _dtypes(backend):
    return ([torch.float32, torch.bfloat16] + ([torch.float64] if backend in ("cpu", "reference") else [])
            + ([torch.float16] if backend == "cpu" else []))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("packed", [False, True], ids=["separate", "packed"])
def test_swiglu_matches_reference(backend, shape, packed):
    dev = device_for(backend)
    for dtype in _dtypes(backend):
        full = shape[:-1] + (2 * shape[-1],)
        x64 = torch.randn(full, dtype=torch.float64, device=dev) * 3
        dy64 = torch.randn(shape, dtype=torch.float64, device=dev)
        x = leaf(x64, dtype)
        if packed:
            out = tk.swiglu(x, backend=backend)
        else:
            g, u = x.chunk(2, -1)
            out = tk.swiglu(g, u, backend=backend)
        out.backward(dy64.to(dtype))
        ref_x = leaf(x64)
        ref = reference.swiglu(ref_x)
        ref.backward(dy64)
        base_x = leaf(x64, dtype)
        bg, bu = base_x.chunk(2, -1)
        base = F.silu(bg) * bu
        base.backward(dy64.to(dtype))
        assert_close(f"out[{dtype}]", out, ref, base)
        assert_close(f"grad[{dtype}]", x.grad, ref_x.grad, base_x.grad)


@pytest.mark.parametrize("backend", BACKENDS)
def test_swiglu_non_contiguous(backend):
    dev = device_for(backend)
    g = torch.randn(6, 40, device=dev).t()  # (40, 6), strides (1, 40)
    u = torch.randn(40, 6, device=dev)
    expected = reference.swiglu(g.double(), u.double())
    assert_close("out", tk.swiglu(g, u, backend=backend), expected, F.silu(g) * u)


def _check_grads(backend, g64, u64, dtype, make_g, make_u, name):
    """Value and both gradients of swiglu(make_g(g), make_u(u)) against the reference."""
    g, u = leaf(g64, dtype), leaf(u64, dtype)
    out = tk.swiglu(make_g(g), make_u(u), backend=backend)
    dy64 = torch.randn(out.shape, dtype=torch.float64, device=g64.device)
    out.backward(dy64.to(dtype))
    rg, ru = leaf(g64), leaf(u64)
    ref = reference.swiglu(make_g(rg), make_u(ru))
    ref.backward(dy64)
    bg, bu = leaf(g64, dtype), leaf(u64, dtype)
    base = F.silu(make_g(bg)) * make_u(bu)
    base.backward(dy64.to(dtype))
    assert_close(f"out{name}[{dtype}]", out, ref, base)
    assert_close(f"dgate{name}[{dtype}]", g.grad, rg.grad, bg.grad)
    assert_close(f"dup{name}[{dtype}]", u.grad, ru.grad, bu.grad)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["transposed", "row_slice", "strided_inner", "packed_bshd"])
def test_swiglu_non_contiguous_grads(backend, layout):
    dev = device_for(backend)
    shape = (5, 7, 130)
    g64 = torch.randn(shape, dtype=torch.float64, device=dev) * 3
    u64 = torch.randn(shape, dtype=torch.float64, device=dev)
    same = lambda t: t  # noqa: E731
    if layout == "transposed":  # (7, 5, 130) views of (5, 7, 130)
        make_g = make_u = lambda t: t.transpose(0, 1)
    elif layout == "row_slice":  # the first 100 columns: row stride 130
        make_g = make_u = lambda t: t[..., :100]
    elif layout == "strided_inner":  # every other column: inner stride 2
        make_g, make_u = (lambda t: t[..., ::2]), same
        u64 = u64[..., :65].contiguous()
    else:  # a packed [gate | up] tensor laid out (S, B, 2n) and viewed as (B, S, 2n)
        for dtype in (torch.float32, torch.bfloat16):
            x64 = torch.randn(7, 5, 260, dtype=torch.float64, device=dev) * 3
            x = leaf(x64, dtype)
            out = tk.swiglu(x.transpose(0, 1), backend=backend)
            dy64 = torch.randn(out.shape, dtype=torch.float64, device=dev)
            out.backward(dy64.to(dtype))
            rx = leaf(x64)
            ref = reference.swiglu(rx.transpose(0, 1))
            ref.backward(dy64)
            bx = leaf(x64, dtype)
            bg, bu = bx.transpose(0, 1).chunk(2, -1)
            base = F.silu(bg) * bu
            base.backward(dy64.to(dtype))
            with bf16_rounding_known(backend, dtype):
                assert_close(f"out[{dtype}]", out, ref, base)
                assert_close(f"grad[{dtype}]", x.grad, rx.grad, bx.grad)
        return
    for dtype in (torch.float32, torch.bfloat16):
        with bf16_rounding_known(backend, dtype):
            _check_grads(backend, g64, u64, dtype, make_g, make_u, f"[{layout}]")


@pytest.mark.parametrize("backend", BACKENDS)
def test_swiglu_extreme_gates(backend):
    """Gates where exp saturates or underflows: values and gradients stay finite and right."""
    dev = device_for(backend)
    g64 = torch.tensor([-1e4, -200.0, -104.0, -88.7, -87.4, -40.0, -17.0, -1e-6, 0.0, 1e-6, 17.0,
                        40.0, 87.4, 88.7, 104.0, 200.0, 1e4], dtype=torch.float64, device=dev)
    g64 = torch.cat([g64, torch.linspace(-30, 30, 301, dtype=torch.float64, device=dev)])
    u64 = torch.randn_like(g64)
    for dtype in (torch.float32, torch.bfloat16):
        with bf16_rounding_known(backend, dtype):
            _check_grads(backend, g64, u64, dtype, lambda t: t, lambda t: t, "[extreme]")


@pytest.mark.parametrize("isa", CPU_ISAS)
def test_swiglu_cpu_instruction_sets(isa, monkeypatch):
    """Every compiled instruction-set path of the CPU kernels."""
    for shape, g64, u64 in gated_isa_inputs(isa, monkeypatch):
        for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
            _check_grads("cpu", g64, u64, dtype, lambda t: t, lambda t: t, f"[{isa} {shape}]")


def test_swiglu_cpu_isa_env_is_checked(monkeypatch):
    if not tk.available_backends()["cpu"]["available"]:
        pytest.skip("C++ CPU extension not built")
    monkeypatch.setenv("TRUTHGPT_CPU_ISA", "sse9")
    with pytest.raises(Exception, match="TRUTHGPT_CPU_ISA must be portable, avx2, avx512 or avx512bf16"):
        tk.swiglu(torch.randn(4), torch.randn(4), backend="cpu")


def test_swiglu_gradcheck_cpu():
    if tk.available_backends()["cpu"]["available"] is False:
        pytest.skip("C++ CPU extension not built")
    g = torch.randn(3, 7, dtype=torch.float64, requires_grad=True)
    u = torch.randn(3, 7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: tk.swiglu(a, b, backend="cpu"), (g, u))


@pytest.mark.parametrize("backend", BACKENDS)
def test_swiglu_opcheck(backend):
    dev = device_for(backend)
    g = torch.randn(4, 9, device=dev, requires_grad=True)
    u = torch.randn(4, 9, device=dev, requires_grad=True)
    torch.library.opcheck(torch.ops.truthgpt.swiglu.default, (g, u, backend))


@pytest.mark.parametrize("backend", BACKENDS)
def test_swiglu_packed_gradient_is_one_tensor(backend):
    """A packed [gate | up] input runs as truthgpt::swiglu_packed, whose backward returns the
    input's gradient whole (the CPU kernel writes both halves into one buffer), so autograd
    concatenates nothing; the gradient matches the float64 reference, also for a row-strided
    input (a slice of a wider projection)."""
    dev = device_for(backend)
    wide64 = torch.randn(6, 3 * 40, dtype=torch.float64, device=dev) * 2
    dy64 = torch.randn(6, 40, dtype=torch.float64, device=dev)
    for dtype in _dtypes(backend):
        wide = leaf(wide64, dtype)
        out = tk.swiglu(wide[:, 40:], backend=backend)
        assert "swiglu_packed" in out.grad_fn.name()
        out.backward(dy64.to(dtype))
        rw = leaf(wide64)
        reference.swiglu(rw[:, 40:]).backward(dy64)
        bw = leaf(wide64, dtype)
        bg, bu = bw[:, 40:].chunk(2, -1)
        (F.silu(bg) * bu).backward(dy64.to(dtype))
        with bf16_rounding_known(backend, dtype):
            assert_close(f"grad[{dtype}]", wide.grad, rw.grad, bw.grad)
    x = torch.randn(4, 18, device=dev, requires_grad=True)
    torch.library.opcheck(torch.ops.truthgpt.swiglu_packed.default, (x, backend))
    with torch.no_grad():  # no gradient: the plain kernel on the two halves
        assert_close("out[no_grad]", tk.swiglu(x, backend=backend), reference.swiglu(x.double()),
                     F.silu(x[:, :9]) * x[:, 9:])


def test_swiglu_bwd_packed_kernel_checks_its_arguments():
    if not tk.available_backends()["cpu"]["available"]:
        pytest.skip("C++ CPU extension not built")
    with pytest.raises(RuntimeError, match="even last dim"):
        torch.ops.truthgpt.swiglu_bwd_packed(torch.randn(3, 2), torch.randn(3, 5))
    with pytest.raises(RuntimeError, match="last dim halved"):
        torch.ops.truthgpt.swiglu_bwd_packed(torch.randn(3, 3), torch.randn(3, 4))
    with pytest.raises(RuntimeError, match="last dim halved"):
        torch.ops.truthgpt.swiglu_bwd_packed(torch.randn(3, 2, dtype=torch.float64), torch.randn(3, 4))


def test_swiglu_bad_input():
    with pytest.raises(ValueError, match="even last dim"):
        tk.swiglu(torch.randn(3, 5))
    with pytest.raises(ValueError, match="up must have the shape"):
        tk.swiglu(torch.randn(3, 4), torch.randn(3, 5))
    with pytest.raises(TypeError, match="up must have the dtype"):
        tk.swiglu(torch.randn(3, 4), torch.randn(3, 4, dtype=torch.float64))
    with pytest.raises(TypeError, match="gate must be a torch.Tensor"):
        tk.swiglu([1.0, 2.0])


def test_swiglu_cpu_large_outputs(monkeypatch):
    """Outputs of 4 MiB and more come from the CPU kernels' huge-page allocator and its
    reuse cache: values stay right when a freed block is handed out again, when an output
    is resized or saved, and with the allocator turned off."""
    if not tk.available_backends()["cpu"]["available"]:
        pytest.skip("C++ CPU extension not built")
    g, u = torch.randn(1100, 1000), torch.randn(1100, 1000)  # 4.4 MB outputs
    expected, base = reference.swiglu(g.double(), u.double()), F.silu(g) * u
    for _ in range(3):  # the second and third outputs reuse the first's block
        out = tk.swiglu(g, u, backend="cpu")
        assert_close("out", out, expected, base)
        out.fill_(float("nan"))  # a reused block must be fully overwritten
        del out
    out = tk.swiglu(g, u, backend="cpu")
    buf = io.BytesIO()
    torch.save(out, buf)
    buf.seek(0)
    assert torch.equal(torch.load(buf), out)
    out.resize_(2200, 1000)
    assert torch.equal(out[:1100], torch.load(io.BytesIO(buf.getvalue())))
    monkeypatch.setenv("TRUTHGPT_CPU_HUGEPAGES", "0")
    assert_close("out[allocator off]", tk.swiglu(g, u, backend="cpu"), expected, base)


@pytest.mark.parametrize("isa", CPU_ISAS)
def test_swiglu_cpu_huge_and_nan_gates(isa, monkeypatch):
    """Gates far past exp's range: silu and its derivative at their limits (0 below, x and 1
    above), not the saturating exp's floor times a huge gate (silu(-1e38) was -0.42); -inf
    gives 0 (torch: NaN), and a NaN gate gives NaN in the output and both gradients."""
    list(gated_isa_inputs(isa, monkeypatch))  # sets TRUTHGPT_CPU_ISA, skips without the extension
    big = [-float("inf"), -1e38, -1e20, -1e13, -1e11, -3e3, 3e3, 1e11, 1e13, 1e20, 1e38]
    check_gated_limits(lambda g, u: tk.swiglu(g, u, backend="cpu"), big)
