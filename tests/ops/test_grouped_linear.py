"""tk.grouped_linear (the GEMMs of routed MoE experts) against the float64 reference, torch's
grouped_mm and a loop of F.linear, values and gradients, on every backend that has the kernel."""
import pytest
import torch
import torch.nn.functional as F

import truthgpt_kernels as tk
from truthgpt_kernels import backends

from ..helpers import assert_close, backend_params, device_for

BACKENDS = backend_params("grouped_linear")
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
# (rows of x, K, M, group ends): empty groups first, in the middle and last; rows past the last
# end; one group; groups of 1..8 rows (tk.linear's few-rows kernel) and more (the GEMM engine)
CASES = [
    (20, 16, 9, [3, 3, 11, 17]),
    (40, 33, 70, [0, 0, 5, 40]),
    (70, 64, 130, [9, 9, 30, 31, 70, 70]),
    (12, 8, 5, [12]),
    (6, 5, 7, [0, 0]),
]


def _case(case, dtype, dev, seed=0, offsets_dtype=torch.int32):
    N, K, M, ends = case
    g = torch.Generator().manual_seed(seed)
    x64 = torch.randn(N, K, generator=g, dtype=torch.float64)
    w64 = torch.randn(len(ends), M, K, generator=g, dtype=torch.float64)
    offsets = torch.tensor(ends, dtype=offsets_dtype, device=dev)
    return x64.to(dev, dtype), w64.to(dev, dtype), offsets, x64.to(dev), w64.to(dev)


def _loop(x, w, ends):
    """The same product as a loop of F.linear in x's dtype (rows past the last end zero)."""
    out, r0 = x.new_zeros(x.shape[0], w.shape[1]), 0
    for e, r1 in enumerate(ends):
        out[r0:r1] = F.linear(x[r0:r1], w[e])
        r0 = r1
    return out


def _grads(fn, x, w, dy):
    x, w = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    out = fn(x, w)
    out.backward(dy)
    return out, x.grad, w.grad


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"N{c[0]}K{c[1]}M{c[2]}-{c[3]}")
def test_grouped_linear_matches_reference(backend, case):
    """Values, dx and dweight in every dtype against the float64 loop; the error bound is that
    of the same loop of F.linear in the dtype (rows past the last end: zeros, zero gradients)."""
    dev = device_for(backend)
    ends = case[3]
    for dtype in DTYPES:
        x, w, offsets, x64, w64 = _case(case, dtype, dev)
        dy64 = torch.randn(x.shape[0], w.shape[1], dtype=torch.float64, device=dev)
        ours = _grads(lambda a, b: tk.grouped_linear(a, b, offsets, backend=backend), x, w, dy64.to(dtype))
        base = _grads(lambda a, b: _loop(a, b, ends), x, w, dy64.to(dtype))
        ref = _grads(lambda a, b: _loop(a, b, ends), x64, w64, dy64)
        for name, o, r, b in zip(("out", "dx", "dweight"), ours, ref, base):
            assert_close(f"{name}[{dtype}]", o, r, b)
        tail = ends[-1]
        assert not ours[0][tail:].any() and not ours[1][tail:].any(), "rows past the last end"


@pytest.mark.skipif(not hasattr(F, "grouped_mm") and not hasattr(torch, "_grouped_mm"),
                    reason="this torch has no grouped_mm")
@pytest.mark.parametrize("offsets_dtype", [torch.int32, torch.int64], ids=["int32", "int64"])
def test_grouped_linear_is_grouped_mm(offsets_dtype):
    """The rows up to the last end are torch's grouped_mm(x, weight^T, offs=offsets) (int32
    offsets, which grouped_mm takes; ours takes int64 too)."""
    grouped = getattr(F, "grouped_mm", None) or torch._grouped_mm
    x, w, offsets, _, _ = _case((40, 32, 48, [5, 5, 17, 40]), torch.float32, "cpu", offsets_dtype=offsets_dtype)
    with torch.no_grad():
        ours = tk.grouped_linear(x, w, offsets)
    torch.testing.assert_close(ours, grouped(x, w.transpose(-2, -1), offs=offsets.int()))


@pytest.mark.parametrize("backend", [p for p in BACKENDS if p.values[0] in ("cpu", "reference")])
def test_grouped_linear_gradcheck(backend):
    x, w, offsets, _, _ = _case((9, 5, 4, [2, 2, 7]), torch.float64, "cpu", seed=1)
    fn = lambda a, b: torch.ops.truthgpt.grouped_linear(a, b, offsets, backend)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x.requires_grad_(), w.requires_grad_()))
    # only one input tracked
    assert torch.autograd.gradcheck(lambda b: fn(x.detach(), b), (w.detach().requires_grad_(),))


def test_grouped_linear_under_autocast():
    """Under CPU autocast x and weight are cast to the autocast dtype, as F.linear's are."""
    x, w, offsets, x64, w64 = _case(CASES[1], torch.float32, "cpu")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = tk.grouped_linear(x, w, offsets)
    assert out.dtype == torch.bfloat16
    assert_close("out", out, _loop(x64, w64, CASES[1][3]), _loop(x.bfloat16(), w.bfloat16(), CASES[1][3]))


@pytest.mark.parametrize("backend", [p for p in BACKENDS if p.values[0] in ("cpu", "reference")])
def test_grouped_linear_opcheck(backend):
    x, w, offsets, _, _ = _case((10, 8, 5, [3, 3, 10]), torch.float32, "cpu")
    dy = torch.randn(10, 5)
    torch.library.opcheck(torch.ops.truthgpt.grouped_linear.default, (x, w, offsets, backend))
    torch.library.opcheck(torch.ops.truthgpt.grouped_linear_backward.default, (dy, x, w, offsets, True, True, backend))
    torch.library.opcheck(torch.ops.truthgpt.grouped_linear_backward.default,
                          (dy, x, w, offsets, False, True, backend))
    if backend == "cpu":
        torch.library.opcheck(torch.ops.truthgpt.grouped_linear_fwd.default, (x, w, offsets))
        torch.library.opcheck(torch.ops.truthgpt.grouped_linear_bwd.default, (dy, x, w, offsets, True, True))


def test_grouped_linear_compiles_without_graph_breaks():
    """torch.compile(fullgraph=True) of a loss through the op: the offsets' value check is
    skipped while tracing (the kernel keeps its own), values and gradients equal eager's."""
    x, w, offsets, _, _ = _case((20, 16, 9, [3, 3, 17]), torch.float32, "cpu")
    fn = lambda a, b: tk.grouped_linear(a, b, offsets).square().sum()  # noqa: E731
    args = (x.requires_grad_(), w.requires_grad_())
    compiled = torch.compile(fn, fullgraph=True)
    got = [compiled(*args), *torch.autograd.grad(compiled(*args), args)]
    want = [fn(*args), *torch.autograd.grad(fn(*args), args)]
    for g, e in zip(got, want):
        torch.testing.assert_close(g, e)


def test_grouped_linear_kernel_checks_offsets():
    """The C++ kernel checks the group ends itself (a compiled graph skips the Python check)."""
    if backends.unavailable_reason("cpu"):
        pytest.skip(backends.unavailable_reason("cpu"))
    x, w, _, _, _ = _case((10, 8, 5, [3, 3, 10]), torch.float32, "cpu")
    with pytest.raises(RuntimeError, match="offsets must be non-decreasing"):
        torch.ops.truthgpt.grouped_linear_fwd(x, w, torch.tensor([3, 2, 10], dtype=torch.int32))


BAD = [
    ("x rank", lambda x, w, o: (x[0], w, o), ValueError, "x must have 2 dimensions"),
    ("weight rank", lambda x, w, o: (x, w[0], o), ValueError, "weight must have 3 dimensions"),
    ("weight K", lambda x, w, o: (x, w[..., :-1], o), ValueError, r"weight must have shape \(\*, \*, 8\)"),
    ("dtype", lambda x, w, o: (x, w.double(), o), TypeError, "weight must have the dtype of x"),
    ("int x", lambda x, w, o: (x.long(), w, o), TypeError, "x must have dtype"),
    ("offsets dtype", lambda x, w, o: (x, w, o.float()), TypeError, "offsets must have dtype int32, int64"),
    ("offsets count", lambda x, w, o: (x, w, o[:-1]), ValueError, r"offsets must have shape \(3\)"),
    ("offsets type", lambda x, w, o: (x, w, o.tolist()), TypeError, "offsets must be a torch.Tensor"),
    ("offsets decrease", lambda x, w, o: (x, w, torch.tensor([3, 2, 10], dtype=torch.int32)), ValueError,
     "offsets must be non-decreasing"),
    ("offsets past x", lambda x, w, o: (x, w, torch.tensor([3, 3, 11], dtype=torch.int32)), ValueError,
     r"in \[0, 10\]"),
    ("offsets negative", lambda x, w, o: (x, w, torch.tensor([-1, 3, 10], dtype=torch.int32)), ValueError,
     "offsets must be non-decreasing"),
]


@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
def test_grouped_linear_bad_input(case):
    _, change, exc, match = case
    x, w, offsets, _, _ = _case((10, 8, 5, [3, 3, 10]), torch.float32, "cpu")
    with pytest.raises(exc, match=match):
        tk.grouped_linear(*change(x, w, offsets))
