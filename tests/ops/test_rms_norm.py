"""tk.rms_norm on every backend against the float64 reference: values, dx and dweight."""
import pytest
import torch

import truthgpt_kernels as tk
from truthgpt_kernels.ops import reference

from ..helpers import assert_close, backend_params, device_for, leaf, row_layout, ROW_LAYOUTS
from .interpreter import bf16_rounding_known

BACKENDS = backend_params("rms_norm")
SHAPES = [(7,), (9, 41, 341), (2, 4231), (3, 4096), (2, 5120)]
EPS = 1e-6


def _dtypes(backend):
    return ([torch.float32, torch.bfloat16] + ([torch.float64] if backend in ("cpu", "reference") else [])
            + ([torch.float16] if backend == "cpu" else []))


def eager(x, w, eps=EPS):
    """The same-dtype eager PyTorch formula: the baseline error."""
    y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return (y * w).to(x.dtype) if w is not None else y


def _check(backend, x64, w64, dy64, dtype, wdtype, make_x=None):
    """Out, dx and dweight of backend `backend` against the float64 reference and the eager
    baseline. make_x(t) lays out the input (e.g. a non-contiguous view)."""
    make_x = make_x or (lambda t: t)
    x, base_x = leaf(x64, dtype), leaf(x64, dtype)
    w = leaf(w64, wdtype) if w64 is not None else None
    base_w = leaf(w64, wdtype) if w64 is not None else None
    out = tk.rms_norm(make_x(x), w, EPS, backend=backend)
    assert out.dtype == dtype
    out.backward(dy64.to(dtype))
    ref_x = leaf(x.detach().double())
    ref_w = leaf(w.detach().double()) if w is not None else None
    ref = reference.rms_norm(make_x(ref_x), ref_w, EPS)
    ref.backward(dy64)
    base = eager(make_x(base_x), base_w)
    base.backward(dy64.to(dtype))
    tag = f"[{dtype}, weight {wdtype}]"
    f64 = dtype == torch.float64
    with bf16_rounding_known(backend, dtype):
        assert_close(f"out{tag}", out, ref, base)
        # The saved rstd is float32 by contract, so float64 gradients carry its ~6e-8
        # relative rounding (the reference backend's too): judge them at that precision.
        assert_close(f"dx{tag}", x.grad, ref_x.grad, base_x.grad, atol=1e-6 if f64 else None)
        if w is not None:
            # dweight sums that rounding over the rows: float32 eps x sum |dy x r| bounds it
            xs = make_x(ref_x.detach())
            r = torch.rsqrt(xs.pow(2).mean(-1, keepdim=True) + EPS)
            bound = 2.4e-7 * (dy64 * xs * r).abs().reshape(-1, xs.shape[-1]).sum(0).max().item()
            assert_close(f"dweight{tag}", w.grad, ref_w.grad, base_w.grad, atol=bound if f64 else None)


def _weight_dtypes(dtype):
    return [None, dtype] + ([torch.float32] if dtype != torch.float32 else [])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_rms_norm_matches_reference(backend, shape):
    dev = device_for(backend)
    x64 = torch.randn(shape, dtype=torch.float64, device=dev) * 2 + 0.5
    w64 = 1 + 0.5 * torch.randn(shape[-1], dtype=torch.float64, device=dev)
    dy64 = torch.randn(shape, dtype=torch.float64, device=dev)
    for dtype in _dtypes(backend):
        for wdtype in _weight_dtypes(dtype):
            _check(backend, x64, w64 if wdtype else None, dy64, dtype, wdtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ROW_LAYOUTS)
def test_rms_norm_non_contiguous(backend, layout):
    dev = device_for(backend)
    shape, make = row_layout(layout)
    x64 = torch.randn(shape, dtype=torch.float64, device=dev)
    n = make(x64).shape[-1]
    w64 = 1 + 0.5 * torch.randn(n, dtype=torch.float64, device=dev)
    dy64 = torch.randn(make(x64).shape, dtype=torch.float64, device=dev)
    for dtype in (torch.float32, torch.bfloat16):
        _check(backend, x64, w64, dy64, dtype, dtype, make_x=make)
    # a non-contiguous weight
    w_strided = torch.randn(2 * n, device=dev)[::2]
    x = torch.randn(make(x64).shape, device=dev)
    assert_close("out[strided weight]", tk.rms_norm(x, w_strided, backend=backend),
                 reference.rms_norm(x.double(), w_strided.double()), eager(x, w_strided))


@pytest.mark.parametrize("backend", BACKENDS)
def test_rms_norm_large_and_tiny_values(backend):
    dev = device_for(backend)
    x = torch.randn(4, 300, device=dev) * torch.tensor([[1e-3], [1.0], [1e3], [1e15]], device=dev)
    w = torch.randn(300, device=dev)
    out = tk.rms_norm(x, w, backend=backend)
    assert_close("out", out, reference.rms_norm(x.double(), w.double()), eager(x, w))


@pytest.mark.parametrize("backend", BACKENDS)
def test_rms_norm_dweight_deterministic(backend):
    dev = device_for(backend)
    x = torch.randn(1000, 333, device=dev, requires_grad=True)
    w = torch.randn(333, device=dev, requires_grad=True)
    dy = torch.randn(1000, 333, device=dev)

    def dweight():
        return torch.autograd.grad(tk.rms_norm(x, w, backend=backend), w, dy)[0]

    first = dweight()
    assert torch.equal(first, dweight())
    if dev == "cpu":  # independent of the thread count
        threads = torch.get_num_threads()
        try:
            for n in (1, 3):
                torch.set_num_threads(n)
                assert torch.equal(first, dweight()), f"dweight differs with {n} threads"
        finally:
            torch.set_num_threads(threads)


CPU_ISAS = ["portable", "avx2", "avx512", "avx512bf16"]


@pytest.mark.parametrize("isa", CPU_ISAS)
def test_rms_norm_cpu_instruction_sets(isa, monkeypatch):
    """Every compiled instruction-set path of the CPU kernels (capped by TRUTHGPT_CPU_ISA;
    a path the CPU lacks falls back to the best one it has)."""
    if not tk.available_backends()["cpu"]["available"]:
        pytest.skip("C++ CPU extension not built")
    monkeypatch.setenv("TRUTHGPT_CPU_ISA", isa)
    for shape in [(5, 7), (3, 4231), (2, 33)]:
        x64 = torch.randn(shape, dtype=torch.float64)
        w64 = 1 + 0.5 * torch.randn(shape[-1], dtype=torch.float64)
        dy64 = torch.randn(shape, dtype=torch.float64)
        for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
            for wdtype in _weight_dtypes(dtype):
                _check("cpu", x64, w64 if wdtype else None, dy64, dtype, wdtype)


def test_rms_norm_gradcheck_cpu():
    if not tk.available_backends()["cpu"]["available"]:
        pytest.skip("C++ CPU extension not built")
    x = torch.randn(4, 9, dtype=torch.float64, requires_grad=True)
    w = torch.randn(9, dtype=torch.float64, requires_grad=True)
    # rstd is saved in float32 (the contract), so the analytic gradient carries ~1e-7 error
    assert torch.autograd.gradcheck(lambda a, b: tk.rms_norm(a, b, backend="cpu"), (x, w),
                                   atol=1e-5, rtol=1e-4)
    assert torch.autograd.gradcheck(lambda a: tk.rms_norm(a, backend="cpu"), (x,), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_rms_norm_empty_rows(backend):
    dev = device_for(backend)
    x = torch.randn(0, 16, device=dev, requires_grad=True)
    w = torch.randn(16, device=dev, requires_grad=True)
    out = tk.rms_norm(x, w, backend=backend)
    assert out.shape == (0, 16)
    out.sum().backward()
    assert torch.equal(w.grad, torch.zeros(16, device=dev))


def test_rms_norm_bad_input():
    x = torch.randn(3, 8)
    with pytest.raises(ValueError, match="weight must have shape"):
        tk.rms_norm(x, torch.randn(7))
    with pytest.raises(ValueError, match="weight must have 1 dimensions"):
        tk.rms_norm(x, torch.randn(1, 8))
    with pytest.raises(TypeError, match="weight must have dtype"):
        tk.rms_norm(x, torch.randn(8, dtype=torch.float64))
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        tk.rms_norm([1.0, 2.0])
    with pytest.raises(ValueError, match="eps must be >= 0"):
        tk.rms_norm(x, None, -1.0)
