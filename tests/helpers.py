"""Shared test helpers: backend parametrization and the tolerance rule of DESIGN.md
(our error against the float64 reference <= 2x the error of the same-dtype PyTorch
computation + a small atol)."""
import pytest
import torch

from truthgpt_kernels import backends

# atol per dtype: a few ulps at unit scale, for values whose same-dtype PyTorch error is ~0
ATOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}


def device_for(backend: str) -> str:
    if backend == "cuda" or (backend == "triton" and torch.cuda.is_available()):
        return "cuda"
    return "cpu"


def backend_params(family: str, *, include_reference: bool = True):
    """pytest params over every backend, skipped with the reason where it cannot run here."""
    params = []
    for name in backends.BACKENDS:
        if name == "reference" and not include_reference:
            continue
        marks = {"triton": [pytest.mark.triton], "cuda": [pytest.mark.cuda]}.get(name, [])
        why = backends.unavailable_reason(name)
        if not why and not backends.implements(family, name):
            why = f"backend {name!r} has no {family} kernel yet"
        if why:
            marks = marks + [pytest.mark.skip(reason=why)]
        params.append(pytest.param(name, marks=marks, id=name))
    return params


def assert_close(name, ours, expected64, baseline, *, atol=None):
    """ours: result of our backend; expected64: the float64 reference; baseline: the same
    computation in ours' dtype by plain PyTorch."""
    assert ours.shape == expected64.shape, f"{name}: shape {tuple(ours.shape)} != {tuple(expected64.shape)}"
    assert ours.dtype == baseline.dtype, f"{name}: dtype {ours.dtype} != {baseline.dtype}"
    finite = torch.isfinite(expected64)
    assert torch.equal(torch.isfinite(ours.double()), finite), f"{name}: non-finite values differ"
    err = (ours.double() - expected64)[finite].abs().max().item() if finite.any() else 0.0
    base = (baseline.double() - expected64)[finite].abs().max().item() if finite.any() else 0.0
    tol = 2 * base + (ATOL[ours.dtype] if atol is None else atol)
    assert err <= tol, f"{name}: max error {err:.3g} > 2 x PyTorch's {base:.3g} + atol"


def leaf(t: torch.Tensor, dtype=None, device=None) -> torch.Tensor:
    return t.detach().to(dtype=dtype or t.dtype, device=device or t.device).requires_grad_(True)


CPU_ISAS = ["portable", "avx2", "avx512", "avx512bf16"]


def gated_isa_inputs(isa: str, monkeypatch):
    """(shape, gate64, up64) for the CPU instruction-set tests of the gated activations, with the
    C++ CPU kernels capped at `isa` (TRUTHGPT_CPU_ISA; a path the CPU lacks falls back to the
    best one it has). Skips when the extension is not built."""
    import pytest
    import truthgpt_kernels as tk
    if not tk.available_backends()["cpu"]["available"]:
        pytest.skip("C++ CPU extension not built")
    monkeypatch.setenv("TRUTHGPT_CPU_ISA", isa)
    for shape in [(3, 7), (2, 4231), (33,), (4, 40)]:
        yield shape, torch.randn(shape, dtype=torch.float64) * 4, torch.randn(shape, dtype=torch.float64)


ROW_LAYOUTS = ["transposed", "row_slice", "strided_inner"]


def row_layout(layout: str):
    """(shape, make): a float64 tensor of `shape` and the non-contiguous view `make(t)` of it
    that the row-wise ops (norms) are tested on."""
    if layout == "transposed":  # (41, 9, 341) viewed as (9, 41, 341): rows not evenly strided
        return (41, 9, 341), lambda t: t.transpose(0, 1)
    if layout == "row_slice":  # the first 333 columns of (20, 500): row stride 500
        return (20, 500), lambda t: t[:, :333]
    return (12, 2 * 257), lambda t: t[:, ::2]  # every other column: inner stride 2


def check_module_against_torch(ours, theirs, ref, x, params, *, param_atol=None):
    """Our module and torch's (`theirs`) in x's dtype against torch's in float64 (`ref`, same
    weights): output, dx and the gradients of `params` (attribute names), each with our error at
    most 2x torch's (assert_close)."""
    xa, xb, xr = leaf(x), leaf(x), leaf(x, torch.float64)
    ya, yb, yr = ours(xa), theirs(xb), ref(xr)
    assert_close("out", ya, yr, yb)
    dy = torch.randn(ya.shape, dtype=torch.float64)
    ya.backward(dy.to(x.dtype))
    yb.backward(dy.to(x.dtype))
    yr.backward(dy)
    assert_close("dx", xa.grad, xr.grad, xb.grad)
    for name in params:
        assert_close(f"d{name}", getattr(ours, name).grad, getattr(ref, name).grad,
                     getattr(theirs, name).grad, atol=param_atol)


def check_gated_limits(op, big, dtypes=(torch.float32, torch.bfloat16, torch.float64)):
    """A gated activation op(gate, up) (SiLU / GELU forms) at gates far past exp's range: out,
    dgate, dup at their limits (0 below, g and 1 above; up = 1, grad 0.5), and NaN in all three
    for NaN gates (three of them after `big`)."""
    for dtype in dtypes:
        g = torch.tensor(list(big) + [float("nan")] * 3, dtype=dtype).requires_grad_()
        u = torch.ones_like(g).requires_grad_()
        out = op(g, u)
        out.backward(torch.full_like(out, 0.5))
        n = len(big)
        gd = g.detach()[:n]
        pos = gd > 0
        torch.testing.assert_close(out.detach()[:n], torch.where(pos, gd, 0.0), rtol=1e-2, atol=1e-30)
        torch.testing.assert_close(g.grad[:n], torch.where(pos, 0.5, 0.0).to(dtype), rtol=1e-2, atol=1e-30)
        torch.testing.assert_close(u.grad[:n], torch.where(pos, 0.5 * gd, 0.0), rtol=1e-2, atol=1e-30)
        for name, t in (("out", out.detach()), ("dgate", g.grad), ("dup", u.grad)):
            assert t[n:].isnan().all(), (dtype, name, t[n:])
