"""tk.layer_norm on every backend against the float64 reference and torch's F.layer_norm:
values, dx, dweight and dbias."""
import pytest
import torch
import torch.nn.functional as F

import truthgpt_kernels as tk
from truthgpt_kernels.ops import reference

from ..helpers import assert_close, backend_params, device_for, leaf, row_layout, ROW_LAYOUTS
from .interpreter import bf16_rounding_known

BACKENDS = backend_params("layer_norm")
# last dims: 1, below / not a multiple of every vector width (8, 16), long rows
SHAPES = [(7,), (5, 1), (4, 13), (9, 41, 341), (2, 4231), (3, 4096), (2, 5120)]
EPS = 1e-5


def _dtypes(backend):
    return [torch.float32, torch.bfloat16] + ([torch.float64] if backend in ("cpu", "reference") else [])


def _param_dtypes(dtype):
    return [None, dtype] + ([torch.float32] if dtype != torch.float32 else [])


def eager(x, w, b, eps=EPS):
    """torch's F.layer_norm in x's dtype: the baseline error (parameters cast to x's dtype)."""
    cast = lambda p: p.to(x.dtype) if p is not None else None  # noqa: E731
    return F.layer_norm(x, (x.shape[-1],), cast(w), cast(b), eps)


def _check(backend, x64, w64, b64, dy64, dtype, wdtype, bdtype, make_x=None):
    """Out, dx, dweight and dbias of backend `backend` against the float64 reference and the
    same-dtype F.layer_norm. make_x(t) lays out the input (e.g. a non-contiguous view)."""
    make_x = make_x or (lambda t: t)
    x, base_x = leaf(x64, dtype), leaf(x64, dtype)
    w = leaf(w64, wdtype) if wdtype else None
    b = leaf(b64, bdtype) if bdtype else None
    base_w = leaf(w64, wdtype) if wdtype else None
    base_b = leaf(b64, bdtype) if bdtype else None
    out = tk.layer_norm(make_x(x), w, b, EPS, backend=backend)
    assert out.dtype == dtype
    out.backward(dy64.to(dtype))
    ref_x = leaf(x.detach().double())
    ref_w = leaf(w.detach().double()) if w is not None else None
    ref_b = leaf(b.detach().double()) if b is not None else None
    ref = reference.layer_norm(make_x(ref_x), ref_w, ref_b, EPS)
    ref.backward(dy64)
    base = eager(make_x(base_x), base_w, base_b)
    base.backward(dy64.to(dtype))
    tag = f"[{dtype}, weight {wdtype}, bias {bdtype}]"
    with bf16_rounding_known(backend, dtype):
        assert_close(f"out{tag}", out, ref, base)
        assert_close(f"dx{tag}", x.grad, ref_x.grad, base_x.grad)
        if w is not None:
            assert_close(f"dweight{tag}", w.grad, ref_w.grad, base_w.grad)
        if b is not None:
            assert_close(f"dbias{tag}", b.grad, ref_b.grad, base_b.grad)


def _inputs(shape, dev):
    x64 = torch.randn(shape, dtype=torch.float64, device=dev) * 2 + 0.5
    w64 = 1 + 0.5 * torch.randn(shape[-1], dtype=torch.float64, device=dev)
    b64 = 0.5 * torch.randn(shape[-1], dtype=torch.float64, device=dev)
    return x64, w64, b64, torch.randn(shape, dtype=torch.float64, device=dev)


def test_reference_is_torch_layer_norm():
    """The spec agrees with torch's F.layer_norm in float64 (values and gradients)."""
    x, w, b = leaf(torch.randn(6, 37, dtype=torch.float64) * 3 + 1), leaf(torch.randn(37, dtype=torch.float64)), \
        leaf(torch.randn(37, dtype=torch.float64))
    ours = reference.layer_norm(x, w, b, 1e-3)
    theirs = F.layer_norm(x, (37,), w, b, 1e-3)
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)
    dy = torch.randn_like(ours)
    g1 = torch.autograd.grad(ours, (x, w, b), dy)
    g2 = torch.autograd.grad(theirs, (x, w, b), dy)
    for a, c in zip(g1, g2):
        torch.testing.assert_close(a, c, rtol=1e-10, atol=1e-10)
    # and the reference backend's written-out backward agrees with autograd of the spec
    out, mean, rstd = reference.layer_norm_fwd(x.detach(), w.detach(), b.detach(), 1e-3)
    for a, c in zip(reference.layer_norm_bwd(dy, x.detach(), w.detach(), b.detach(), mean, rstd), g1):
        torch.testing.assert_close(a, c, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_layer_norm_matches_reference(backend, shape):
    dev = device_for(backend)
    x64, w64, b64, dy64 = _inputs(shape, dev)
    for dtype in _dtypes(backend):
        for wdtype in _param_dtypes(dtype):
            for bdtype in ([None, wdtype] if wdtype else [None]):
                _check(backend, x64, w64, b64, dy64, dtype, wdtype, bdtype)
        # bias without weight, and a float32 weight with an x-dtype bias
        _check(backend, x64, w64, b64, dy64, dtype, None, dtype)
        if dtype != torch.float32:
            _check(backend, x64, w64, b64, dy64, dtype, torch.float32, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ROW_LAYOUTS)
def test_layer_norm_non_contiguous(backend, layout):
    dev = device_for(backend)
    shape, make = row_layout(layout)
    x64 = torch.randn(shape, dtype=torch.float64, device=dev)
    n = make(x64).shape[-1]
    _, w64, b64, dy64 = _inputs(make(x64).shape, dev)
    for dtype in (torch.float32, torch.bfloat16):
        _check(backend, x64, w64, b64, dy64, dtype, dtype, dtype, make_x=make)
    # non-contiguous weight and bias
    w_strided, b_strided = torch.randn(2 * n, device=dev)[::2], torch.randn(2 * n, device=dev)[1::2]
    x = torch.randn(make(x64).shape, device=dev)
    assert_close("out[strided weight]", tk.layer_norm(x, w_strided, b_strided, backend=backend),
                 reference.layer_norm(x.double(), w_strided.double(), b_strided.double()),
                 eager(x, w_strided, b_strided))


@pytest.mark.parametrize("backend", BACKENDS)
def test_layer_norm_large_mean_and_scales(backend):
    """Rows whose mean is far larger than their spread (a one-pass E[x^2] - E[x]^2 loses
    every digit there), and rows of very small and very large values."""
    dev = device_for(backend)
    n = 4231
    x = torch.randn(6, n, device=dev) * torch.tensor([[1.0], [1.0], [1e-3], [1e3], [1e15], [1.0]], device=dev)
    x = x + torch.tensor([[1e3], [3e4], [0.0], [0.0], [0.0], [-200.0]], device=dev)
    w, b = torch.randn(n, device=dev), torch.randn(n, device=dev)
    out = tk.layer_norm(x, w, b, backend=backend)
    assert_close("out", out, reference.layer_norm(x.double(), w.double(), b.double()), eager(x, w, b))


@pytest.mark.parametrize("backend", BACKENDS)
def test_layer_norm_grads_deterministic(backend):
    dev = device_for(backend)
    x = torch.randn(1000, 333, device=dev, requires_grad=True)
    w = torch.randn(333, device=dev, requires_grad=True)
    b = torch.randn(333, device=dev, requires_grad=True)
    dy = torch.randn(1000, 333, device=dev)

    def grads():
        return torch.autograd.grad(tk.layer_norm(x, w, b, backend=backend), (w, b), dy)

    first = grads()
    assert all(torch.equal(a, c) for a, c in zip(first, grads()))
    if dev == "cpu":  # independent of the thread count
        threads = torch.get_num_threads()
        try:
            for n in (1, 3):
                torch.set_num_threads(n)
                assert all(torch.equal(a, c) for a, c in zip(first, grads())), f"differs with {n} threads"
        finally:
            torch.set_num_threads(threads)


@pytest.mark.parametrize("isa", ["portable", "avx2", "avx512", "avx512bf16"])
def test_layer_norm_cpu_instruction_sets(isa, monkeypatch):
    """Every compiled instruction-set path of the CPU kernels (capped by TRUTHGPT_CPU_ISA;
    a path the CPU lacks falls back to the best one it has)."""
    if not tk.available_backends()["cpu"]["available"]:
        pytest.skip("C++ CPU extension not built")
    monkeypatch.setenv("TRUTHGPT_CPU_ISA", isa)
    for shape in [(5, 7), (3, 4231), (2, 33), (9, 1)]:
        x64, w64, b64, dy64 = _inputs(shape, "cpu")
        for dtype in (torch.float32, torch.bfloat16, torch.float64):
            for wdtype in _param_dtypes(dtype):
                _check("cpu", x64, w64, b64, dy64, dtype, wdtype, wdtype)


def test_layer_norm_gradcheck_cpu():
    if not tk.available_backends()["cpu"]["available"]:
        pytest.skip("C++ CPU extension not built")
    x = torch.randn(4, 9, dtype=torch.float64, requires_grad=True)
    w = torch.randn(9, dtype=torch.float64, requires_grad=True)
    b = torch.randn(9, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, c, d: tk.layer_norm(a, c, d, backend="cpu"), (x, w, b))
    assert torch.autograd.gradcheck(lambda a: tk.layer_norm(a, backend="cpu"), (x,))
    assert torch.autograd.gradcheck(lambda a, d: tk.layer_norm(a, None, d, backend="cpu"), (x, b))
    # double backward (create_graph), as torch's layer_norm has
    assert torch.autograd.gradgradcheck(lambda a, c, d: tk.layer_norm(a, c, d, backend="cpu"), (x, w, b))
    assert torch.autograd.gradgradcheck(lambda a, c: tk.layer_norm(a, c, None, backend="cpu"), (x, w))
    assert torch.autograd.gradgradcheck(lambda c, d: tk.layer_norm(x.detach(), c, d, backend="cpu"), (w, b))


@pytest.mark.parametrize("backend", BACKENDS)
def test_layer_norm_opcheck(backend):
    dev = device_for(backend)
    x = torch.randn(3, 6, device=dev, requires_grad=True)
    w = torch.randn(6, device=dev, requires_grad=True)
    b = torch.randn(6, device=dev, requires_grad=True)
    torch.library.opcheck(torch.ops.truthgpt.layer_norm.default, (x, w, b, 1e-5, backend))
    torch.library.opcheck(torch.ops.truthgpt.layer_norm.default, (x, None, None, 1e-5, backend))


@pytest.mark.parametrize("backend", BACKENDS)
def test_layer_norm_empty_rows(backend):
    dev = device_for(backend)
    x = torch.randn(0, 16, device=dev, requires_grad=True)
    w = torch.randn(16, device=dev, requires_grad=True)
    b = torch.randn(16, device=dev, requires_grad=True)
    out = tk.layer_norm(x, w, b, backend=backend)
    assert out.shape == (0, 16)
    out.sum().backward()
    assert torch.equal(w.grad, torch.zeros(16, device=dev))
    assert torch.equal(b.grad, torch.zeros(16, device=dev))


def test_layer_norm_bad_input():
    x = torch.randn(3, 8)
    with pytest.raises(ValueError, match="weight must have shape"):
        tk.layer_norm(x, torch.randn(7))
    with pytest.raises(ValueError, match="bias must have shape"):
        tk.layer_norm(x, torch.randn(8), torch.randn(9))
    with pytest.raises(ValueError, match="bias must have 1 dimensions"):
        tk.layer_norm(x, None, torch.randn(1, 8))
    with pytest.raises(TypeError, match="weight must have dtype"):
        tk.layer_norm(x, torch.randn(8, dtype=torch.float64))
    with pytest.raises(TypeError, match="bias must have dtype"):
        tk.layer_norm(x.bfloat16(), None, torch.randn(8, dtype=torch.float16))
    with pytest.raises(TypeError, match="x must have dtype"):
        tk.layer_norm(torch.ones(3, 8, dtype=torch.int32))
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        tk.layer_norm([1.0, 2.0])
    with pytest.raises(ValueError, match="eps must be >= 0"):
        tk.layer_norm(x, None, None, -1.0)
