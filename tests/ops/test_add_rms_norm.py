"""tk.add_rms_norm (the pre-norm residual step h = residual + x, out = rms_norm(h)) on every
backend against the float64 reference: out, h, and the gradients of x, residual and weight with
gradients flowing into both outputs; the float32 residual stream beside bfloat16 / float16 x
(autocast); argument checks; the model's blocks on it give the loss of the separate add + norm."""
import pytest
import torch

import truthgpt_kernels as tk
from truthgpt_kernels.modules import norm as norm_mod
from truthgpt_kernels.ops import reference

from ..helpers import assert_close, backend_params, leaf

BACKENDS = backend_params("add_rms_norm")
EPS = 1e-5
f32, bf16, f16, f64 = torch.float32, torch.bfloat16, torch.float16, torch.float64
# (x dtype, residual dtype): one dtype, or a float32 residual stream with low-precision x
DTYPES = [(f32, f32), (bf16, f32), (f16, f32), (bf16, bf16), (f64, f64)]


def _eager(x, residual, w):
    """The same step in plain PyTorch, in the inputs' dtypes: the baseline error."""
    h = residual + x
    y = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + EPS)
    return (y * w if w is not None else y).to(x.dtype), h


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("xd,rd", DTYPES, ids=[f"{str(a)[6:]}-{str(b)[6:]}" for a, b in DTYPES])
@pytest.mark.parametrize("wd", ["none", "residual", "float32"])
@pytest.mark.parametrize("shape", [(7,), (3, 5, 67), (2, 1030)])
def test_matches_reference(backend, xd, rd, wd, shape):
    torch.manual_seed(0)
    x64, r64 = torch.randn(shape, dtype=f64), torch.randn(shape, dtype=f64)
    w64 = None if wd == "none" else torch.rand(shape[-1], dtype=f64) + 0.5
    wdt = {"none": None, "residual": rd, "float32": f32}[wd]
    dout64, dh64 = torch.randn(shape, dtype=f64), torch.randn(shape, dtype=f64)
    x, r = leaf(x64, xd), leaf(r64, rd)
    w = leaf(w64, wdt) if w64 is not None else None
    out, h = tk.add_rms_norm(x, r, w, EPS, backend=backend)
    assert out.dtype == xd and h.dtype == rd and out.shape == h.shape == shape
    torch.autograd.backward([out, h], [dout64.to(xd), dh64.to(rd)])
    rx, rr = leaf(x.detach().double()), leaf(r.detach().double())
    rw = leaf(w.detach().double()) if w is not None else None
    ref_out, ref_h = reference.add_rms_norm(rx, rr, rw, EPS)
    torch.autograd.backward([ref_out, ref_h], [dout64, dh64])
    bx, br = leaf(x64, xd), leaf(r64, rd)
    bw = leaf(w64, wdt) if w64 is not None else None
    base_out, base_h = _eager(bx, br, bw)
    torch.autograd.backward([base_out, base_h], [dout64.to(xd), dh64.to(rd)])
    # float64: the saved rstd is float32 by contract (as tk.rms_norm's), so judge at its precision
    atol = 1e-6 if xd == f64 else None
    assert_close("out", out, ref_out, base_out, atol=atol)
    assert_close("h", h, ref_h, base_h, atol=atol)
    assert_close("dx", x.grad, rx.grad, bx.grad, atol=atol)
    assert_close("dresidual", r.grad, rr.grad, br.grad, atol=atol)
    if w is not None:
        assert_close("dweight", w.grad, rw.grad, bw.grad, atol=1e-5 if xd == f64 else None)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradient_of_out_only_and_of_h_only(backend):
    """Either output may carry no gradient (h unused downstream, or out)."""
    torch.manual_seed(1)
    for which in ("out", "h"):
        x, r, w = (torch.randn(4, 33, dtype=f64 if backend in ("cpu", "reference") else f32,
                               requires_grad=True) for _ in range(3))
        w = w[0].detach().requires_grad_()
        out, h = tk.add_rms_norm(x, r, w, EPS, backend=backend)
        (out if which == "out" else h).pow(2).sum().backward()
        x2, r2, w2 = (t.detach().double().requires_grad_() for t in (x, r, w))
        o2, h2 = reference.add_rms_norm(x2, r2, w2, EPS)
        (o2 if which == "out" else h2).pow(2).sum().backward()
        for a, b in ((x, x2), (r, r2)):
            torch.testing.assert_close(a.grad.double(), b.grad, rtol=1e-5, atol=1e-5)
        if which == "h":
            assert w.grad is None or torch.all(w.grad == 0)


def test_bad_input_raises():
    x, r = torch.randn(2, 8), torch.randn(2, 8)
    with pytest.raises(ValueError, match="x"):
        tk.add_rms_norm(torch.randn(2, 9), r)
    with pytest.raises(TypeError, match="x must have residual's dtype"):
        tk.add_rms_norm(x.to(f64), r)
    with pytest.raises(TypeError, match="x must have residual's dtype"):
        tk.add_rms_norm(x, r.to(bf16))  # a low-precision stream beside float32 x
    with pytest.raises(ValueError, match="weight"):
        tk.add_rms_norm(x, r, torch.ones(9))
    with pytest.raises(ValueError, match="eps"):
        tk.add_rms_norm(x, r, eps=-1.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    if backend in ("triton", "cuda"):
        pytest.skip("no kernel there")
    args = (torch.randn(3, 6, dtype=bf16, requires_grad=True), torch.randn(3, 6, requires_grad=True),
            torch.randn(6, requires_grad=True), 1e-6, backend)
    torch.library.opcheck(torch.ops.truthgpt.add_rms_norm.default, args)


@pytest.mark.skipif(not tk.backends.implements("add_rms_norm", "cpu"), reason="needs the C++ extension")
def test_opcheck_cpp_kernels():
    x, r, w = torch.randn(3, 6, dtype=bf16), torch.randn(3, 6), torch.randn(6)
    torch.library.opcheck(torch.ops.truthgpt.add_rms_norm_fwd.default, (x, r, w, 1e-6))
    _, h, rstd = torch.ops.truthgpt.add_rms_norm_fwd(x, r, w, 1e-6)
    torch.library.opcheck(torch.ops.truthgpt.add_rms_norm_bwd.default, (torch.randn(3, 6, dtype=bf16), torch.randn(3, 6),
                                                                         h, w, rstd, bf16))


@pytest.mark.skipif(not tk.backends.implements("add_rms_norm", "cpu"), reason="needs the C++ extension")
@pytest.mark.parametrize("autocast", [False, True])
def test_model_blocks_fused_equal_apart(monkeypatch, autocast):
    """The blocks' residual add + norm through the fused op gives the loss and gradients of the
    separate add and rms_norm (which the other backends run)."""
    torch.manual_seed(0)
    model = tk.Transformer(tk.TransformerConfig.preset("tiny"))
    tokens = torch.randint(0, model.config.vocab_size, (2, 24))
    results = []
    for fused in (True, False):
        if not fused:
            monkeypatch.setattr(norm_mod, "_fused_add_rms_norm", lambda *a: False)
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=bf16, enabled=autocast):
            _, loss = model(tokens, tokens, return_logits=False)
        loss.backward()
        results.append((loss.detach().float(), [p.grad.clone() for p in model.parameters()]))
    (l1, g1), (l2, g2) = results
    tol = 2e-2 if autocast else 1e-5
    torch.testing.assert_close(l1, l2, rtol=tol, atol=tol)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol * max(1.0, b.abs().max().item()))
