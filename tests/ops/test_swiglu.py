import pytest
import torch
import torch.nn.functional as F

import truthgpt_kernels as tk
from truthgpt_kernels.ops import reference

from ..helpers import assert_close, backend_params, device_for, leaf

BACKENDS = backend_params("swiglu")
SHAPES = [(7,), (9, 41, 341), (2, 4231), (3, 5, 64)]


def _dtypes(backend):
    return [torch.float32, torch.bfloat16] + ([torch.float64] if backend in ("cpu", "reference") else [])


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


def test_swiglu_bad_input():
    with pytest.raises(ValueError, match="even last dim"):
        tk.swiglu(torch.randn(3, 5))
    with pytest.raises(ValueError, match="up must have the shape"):
        tk.swiglu(torch.randn(3, 4), torch.randn(3, 5))
    with pytest.raises(TypeError, match="up must have the dtype"):
        tk.swiglu(torch.randn(3, 4), torch.randn(3, 4, dtype=torch.float64))
    with pytest.raises(TypeError, match="gate must be a torch.Tensor"):
        tk.swiglu([1.0, 2.0])
