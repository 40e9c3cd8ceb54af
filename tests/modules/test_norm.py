"""RMSNorm against torch.nn.RMSNorm (same arguments, weights and state_dict), forward and backward."""
import pytest
import torch

import truthgpt_kernels as tk
from truthgpt_kernels.modules import LayerNorm, RMSNorm, make_norm

from ..helpers import assert_close, backend_params, check_module_against_torch, leaf

f64 = torch.float64


def _pair(shape, eps, affine, dtype):
    ours = RMSNorm(shape, eps=eps, elementwise_affine=affine, dtype=dtype)
    theirs = torch.nn.RMSNorm(shape, eps=eps, elementwise_affine=affine, dtype=dtype)
    if affine:
        with torch.no_grad():
            ours.weight.normal_(1.0, 0.3)
    theirs.load_state_dict(ours.state_dict())
    return ours, theirs


@pytest.mark.parametrize("shape", [16, (16,), (3, 8)], ids=["int", "tuple", "2d"])
@pytest.mark.parametrize("eps", [None, 1e-5])
@pytest.mark.parametrize("affine", [True, False])
def test_matches_torch_rmsnorm_float64(shape, eps, affine):
    ours, theirs = _pair(shape, eps, affine, f64)
    norm_shape = (shape,) if isinstance(shape, int) else shape
    x = torch.randn(2, 5, *norm_shape, dtype=f64)
    xa, xb = leaf(x), leaf(x)
    ya, yb = ours(xa), theirs(xb)
    torch.testing.assert_close(ya, yb, rtol=1e-12, atol=1e-12)
    dy = torch.randn_like(ya)
    ya.backward(dy)
    yb.backward(dy)
    # the op saves its statistics (rstd) in float32 (DESIGN.md: "statistics in float32"), so
    # float64 gradients are float32-accurate
    torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-5, atol=1e-6)
    if affine:
        torch.testing.assert_close(ours.weight.grad, theirs.weight.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision_within_torch_error(dtype):
    """Our error against float64 is at most 2x torch.nn.RMSNorm's in the same dtype (+ atol)."""
    ours, theirs = _pair(64, 1e-6, True, dtype)
    ref = torch.nn.RMSNorm(64, eps=1e-6, dtype=f64)
    ref.load_state_dict({"weight": ours.weight.double()})
    x = torch.randn(4, 7, 64, dtype=dtype) * 3
    check_module_against_torch(ours, theirs, ref, x, ("weight",),
                               param_atol=0.5 if dtype == torch.bfloat16 else None)


def test_state_dict_and_repr_like_torch():
    ours, theirs = RMSNorm(8), torch.nn.RMSNorm(8)
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    assert ours.weight.shape == theirs.weight.shape and torch.equal(ours.weight, theirs.weight)
    assert repr(ours) == repr(theirs)
    theirs.load_state_dict(ours.state_dict())  # and back
    ours.load_state_dict(theirs.state_dict())
    assert RMSNorm(8, elementwise_affine=False).weight is None


def test_eps_none_uses_dtype_eps():
    x = torch.full((1, 4), 1e-4)  # mean(x^2) = 1e-8, comparable to float32 eps
    y = RMSNorm(4, eps=None, elementwise_affine=False)(x)
    expected = x / torch.sqrt(torch.tensor(1e-8) + torch.finfo(torch.float32).eps)
    torch.testing.assert_close(y, expected)
    # bfloat16 / float16: torch's kernel computes in float32 and takes float32's epsilon
    for dtype in (torch.bfloat16, torch.float16, torch.float64):
        x = (torch.randn(3, 64, generator=torch.Generator().manual_seed(0)) * 1e-2).to(dtype)
        for affine in (False, True):
            torch.testing.assert_close(RMSNorm(64, elementwise_affine=affine).to(dtype)(x),
                                       torch.nn.RMSNorm(64, elementwise_affine=affine).to(dtype)(x))


def test_bad_shape():  # torch's own exception, as torch.nn.RMSNorm (a drop-in)
    with pytest.raises(RuntimeError, match=r"expected input with shape \[\*"):
        RMSNorm(8)(torch.randn(2, 7))


def test_make_norm():
    assert isinstance(make_norm("rmsnorm", 8, 1e-5), RMSNorm)
    assert type(make_norm("layernorm", 8, 1e-5)) is LayerNorm  # ours (fused), not torch.nn.LayerNorm
    with pytest.raises(ValueError, match="rmsnorm"):
        make_norm("batchnorm", 8, 1e-5)


# ------------------------------------------------------------------ double backward (gradgrad)
GRADGRAD_BACKENDS = [p for p in backend_params("rms_norm") if p.values[0] in ("cpu", "reference")]


@pytest.mark.parametrize("backend", GRADGRAD_BACKENDS)
@pytest.mark.parametrize("affine", [True, False])
def test_rms_norm_gradgradcheck(backend, affine):
    """Second derivatives in x, weight and the incoming gradient, numerically. The saved rstd is
    float32 by contract, so every evaluation of the first backward carries its ~6e-8 relative
    rounding: the finite-difference step is 1e-3 (noise ~6e-8 / 2e-3 = 3e-5, truncation
    O(step^2) ~ 1e-6) and atol 1e-4 covers it."""
    torch.manual_seed(0)
    x = torch.randn(3, 2, 7, dtype=f64, requires_grad=True)
    w = (1 + 0.3 * torch.randn(7, dtype=f64)).requires_grad_() if affine else None
    inputs = (x, w) if affine else (x,)
    fn = (lambda x, w=None: tk.rms_norm(x, w, 1e-5, backend=backend))
    assert torch.autograd.gradgradcheck(fn, inputs, eps=1e-3, atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize("backend", GRADGRAD_BACKENDS)
@pytest.mark.parametrize("affine", [True, False])
def test_rmsnorm_double_and_triple_backward_match_torch(backend, affine):
    """create_graph=True, then backward again (and once more), against torch.nn.RMSNorm's
    autograd in float64; float32-accurate because of the float32 rstd (see above)."""
    torch.manual_seed(0)
    ours, theirs = _pair(9, 1e-5, affine, f64)
    ours.backend = backend
    x = torch.randn(4, 3, 9, dtype=f64)
    dy = torch.randn(4, 3, 9, dtype=f64)

    def derivatives(module):
        xl, dyl = leaf(x), leaf(dy)
        params = [xl] + ([module.weight] if affine else [])
        first = torch.autograd.grad(module(xl), params, dyl, create_graph=True)
        s = sum((g * torch.cos(g)).sum() for g in first)  # nonlinear in the gradients
        second = torch.autograd.grad(s, params + [dyl], create_graph=True)
        third = torch.autograd.grad(sum((g ** 2).sum() for g in second), params + [dyl])
        return first + second + third

    # (with a float64 rstd the formulas agree to ~1e-15 relative; the float32 one leaves ~3e-8
    # of the largest value, third derivatives reach ~1e3)
    for a, b in zip(derivatives(ours), derivatives(theirs)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6 * b.abs().max().item())


# ------------------------------------------------------------------ memory format
@pytest.mark.parametrize("shape,layout", [
    ((2, 3, 4, 6), "channels_last"), ((2, 3, 4, 5, 6), "channels_last_3d"),
    ((2, 3, 4, 12), "channels_last_slice"), ((2, 3, 4, 6), "transposed"),
    ((2, 1, 4, 6), "channels_last_one_channel")])
def test_output_memory_format_like_torch(shape, layout):
    """torch.nn.RMSNorm's output is dense in x's suggested memory format: channels_last input,
    channels_last output (ours too); other layouts come back contiguous."""
    ours, theirs = _pair(6, 1e-5, True, torch.float32)
    x = torch.randn(shape)
    if layout == "transposed":
        x = x.transpose(1, 2)
    else:
        x = x.to(memory_format=torch.channels_last_3d if x.dim() == 5 else torch.channels_last)
        x = x[..., :6]
    xa, xb = leaf(x), leaf(x)
    ya, yb = ours(xa), theirs(xb)
    # the same layout (strides of size-1 dims are free, so compare by memory format)
    for fmt in (torch.contiguous_format, torch.channels_last_3d if x.dim() == 5 else torch.channels_last):
        assert ya.is_contiguous(memory_format=fmt) == yb.is_contiguous(memory_format=fmt), (
            fmt, ya.stride(), yb.stride())
    torch.testing.assert_close(ya, yb)
    dy = torch.randn_like(yb)
    ya.backward(dy)
    yb.backward(dy)
    torch.testing.assert_close(xa.grad, xb.grad)


def test_drop_in_forwards_take_torchs_argument_names_and_raise_torchs_exceptions():
    """nn.Linear / nn.LayerNorm / nn.Embedding's forward(input=...), nn.RMSNorm's forward(x=...);
    inputs the ops do not take run torch's function: its result, or its exception type."""
    import truthgpt_kernels as tk
    from truthgpt_kernels.modules.embeddings import Embedding
    torch.manual_seed(0)
    pairs = [(tk.modules.Linear(8, 3), torch.nn.Linear(8, 3)), (tk.modules.LayerNorm(8), torch.nn.LayerNorm(8)),
             (tk.modules.RMSNorm(8), torch.nn.RMSNorm(8)), (Embedding(10, 8), torch.nn.Embedding(10, 8))]
    for ours, theirs in pairs:
        theirs.load_state_dict(ours.state_dict())
        x = torch.randint(0, 10, (2, 3)) if isinstance(theirs, torch.nn.Embedding) else torch.randn(2, 8)
        kw = "x" if isinstance(theirs, torch.nn.RMSNorm) else "input"
        torch.testing.assert_close(ours(**{kw: x}), theirs(**{kw: x}))
        bad = [x.float()] if isinstance(theirs, torch.nn.Embedding) else [torch.randn(2, 7), x.double(), x.int()]
        for b in bad:
            try:
                want = theirs(b)
            except Exception as e:  # noqa: BLE001 - whatever torch raises, ours must too
                with pytest.raises(type(e)):
                    ours(b)
            else:
                torch.testing.assert_close(ours(b), want)
    lin = pairs[0]
    x = torch.randn(1, 1, 1, 1, 1, 1, 1, 1, 2, 8)  # 10 dims: beyond tk.linear's 8, F.linear's result
    torch.testing.assert_close(lin[0](x), lin[1](x))


def test_norms_are_subclasses_of_torchs():
    """isinstance(m, nn.LayerNorm / nn.RMSNorm) holds (weight-decay groups, HF's _init_weights),
    and replace_modules does not convert ours again (exact types only)."""
    import truthgpt_kernels as tk
    ln, rms = tk.modules.LayerNorm(8, bias=False), RMSNorm(8, eps=1e-5)
    assert isinstance(ln, torch.nn.LayerNorm) and isinstance(rms, torch.nn.RMSNorm)
    assert ln.bias is None and rms.eps == 1e-5 and torch.equal(rms.weight, torch.ones(8))
    model = torch.nn.Sequential(ln, rms)
    tk.replace_modules(model)
    assert model[0] is ln and model[1] is rms and not model.truthgpt_report.swapped
