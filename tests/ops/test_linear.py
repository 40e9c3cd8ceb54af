"""tk.linear against the float64 reference and F.linear, on every backend that has the kernel."""
import pytest
import torch
import torch.nn.functional as F

import truthgpt_kernels as tk
from truthgpt_kernels import backends

from ..helpers import CPU_ISAS, assert_close, backend_params, device_for

BACKENDS = backend_params("linear")
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
# (rows of x, K, N): 1..8 rows take the C++ kernel's own path (chunks of 4 rows, 8/4/3/2
# weight rows at a time, tails of both), more rows at::linear
SHAPES = [(1, 64, 50), (2, 7, 5), (3, 513, 97), (4, 1, 9), (5, 40, 3), (7, 96, 49), (8, 130, 200),
          (9, 64, 33), (33, 17, 11)]


def _case(shape, dtype, dev, bias=True, seed=0):
    M, K, N = shape
    g = torch.Generator().manual_seed(seed)
    x64, w64 = torch.randn(M, K, generator=g, dtype=torch.float64), torch.randn(N, K, generator=g, dtype=torch.float64)
    b64 = torch.randn(N, generator=g, dtype=torch.float64) if bias else None
    to = lambda t: None if t is None else t.to(dev, dtype)  # noqa: E731
    return (to(x64), to(w64), to(b64)), (x64.to(dev), w64.to(dev), None if b64 is None else b64.to(dev))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("bias", [False, True], ids=["no_bias", "bias"])
def test_linear_matches_reference(backend, shape, bias):
    dev = device_for(backend)
    for dtype in DTYPES:
        (x, w, b), (x64, w64, b64) = _case(shape, dtype, dev, bias)
        with torch.no_grad():
            out = tk.linear(x, w, b, backend=backend)
        assert_close(f"out[{dtype}]", out, F.linear(x64, w64, b64), F.linear(x, w, b))


@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_leading_dims_and_strides(backend):
    """x (B, S, K) and a non-contiguous x (rows strided) and weight (a transposed view)."""
    dev = device_for(backend)
    x = torch.randn(2, 3, 24, device=dev, dtype=torch.float64)[:, :, :20].float()  # contiguous rows
    xs = torch.randn(2, 40, device=dev)[:, ::2]                                     # inner stride 2
    w = torch.randn(20, 11, device=dev).t()                                         # (11, 20), strides (1, 20)
    with torch.no_grad():
        for inp in (x, xs):
            out = tk.linear(inp, w, backend=backend)
            assert out.shape == inp.shape[:-1] + (11,)
            assert_close("out", out, F.linear(inp.double(), w.double()), F.linear(inp, w))


@pytest.mark.parametrize("isa", CPU_ISAS)
def test_linear_cpu_instruction_sets(isa, monkeypatch):
    """Every instruction-set path of the C++ kernel (TRUTHGPT_CPU_ISA caps it; a path the CPU
    lacks falls back to the next one down)."""
    if backends.unavailable_reason("cpu"):
        pytest.skip(backends.unavailable_reason("cpu"))
    monkeypatch.setenv("TRUTHGPT_CPU_ISA", isa)
    for shape in [(1, 67, 21), (4, 64, 17), (8, 33, 50)]:
        for dtype in DTYPES:
            (x, w, b), (x64, w64, b64) = _case(shape, dtype, "cpu")
            out = torch.ops.truthgpt.linear_fwd(x, w, b)
            assert_close(f"{isa} {shape} {dtype}", out, F.linear(x64, w64, b64), F.linear(x, w, b))


def test_linear_gradients_are_f_linear():
    """With a gradient to track tk.linear is F.linear: the same values and gradients."""
    (x, w, b), _ = _case((3, 16, 5), torch.float32, "cpu")
    leaves = [t.clone().requires_grad_() for t in (x, w, b)]
    base = [t.clone().requires_grad_() for t in (x, w, b)]
    out = tk.linear(*leaves)
    ref = F.linear(*base)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    dy = torch.randn_like(out)
    out.backward(dy)
    ref.backward(dy)
    for a, r in zip(leaves, base):
        torch.testing.assert_close(a.grad, r.grad, rtol=0, atol=0)


def test_linear_autocast_dtype_like_f_linear():
    (x, w, b), (x64, w64, b64) = _case((2, 32, 7), torch.float32, "cpu")
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out, base = tk.linear(x, w, b), F.linear(x, w, b)
    assert out.dtype == base.dtype == torch.bfloat16
    assert_close("out", out, F.linear(x64, w64, b64), base)


def test_linear_module_is_nn_linear():
    """tk.Linear keeps nn.Linear's parameters and state dict, and its output."""
    torch.manual_seed(0)
    ref = torch.nn.Linear(12, 6)
    ours = tk.modules.Linear(12, 6)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(1, 2, 12)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x))
    assert isinstance(ours, torch.nn.Linear) and list(ours.state_dict()) == list(ref.state_dict())


@pytest.mark.parametrize("backend", [p for p in BACKENDS if p.values[0] in ("cpu", "reference")])
def test_linear_opcheck(backend):
    (x, w, b), _ = _case((3, 8, 5), torch.float32, "cpu")
    torch.library.opcheck(torch.ops.truthgpt.linear.default, (x, w, b, backend))
    if backend == "cpu":
        torch.library.opcheck(torch.ops.truthgpt.linear_fwd.default, (x, w, b))


BAD = [
    ("x rank", lambda x, w, b: (x[0, 0], w, b), ValueError, "x must have"),
    ("weight rank", lambda x, w, b: (x, w[0], b), ValueError, "weight must have 2 dimensions"),
    ("weight K", lambda x, w, b: (x, w[:, :-1], b), ValueError, r"weight must have shape \(\*, 8\)"),
    ("bias shape", lambda x, w, b: (x, w, b[:-1]), ValueError, r"bias must have shape \(5\)"),
    ("dtype", lambda x, w, b: (x, w.double(), b), TypeError, "weight must have the dtype of x"),
    ("int x", lambda x, w, b: (x.long(), w, b), TypeError, "x must have dtype"),
    ("weight type", lambda x, w, b: (x, w.tolist(), b), TypeError, "weight must be a torch.Tensor"),
]


@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
def test_linear_bad_input(case):
    _, change, exc, match = case
    (x, w, b), _ = _case((3, 8, 5), torch.float32, "cpu")
    with pytest.raises(exc, match=match):
        tk.linear(*change(x, w, b))
