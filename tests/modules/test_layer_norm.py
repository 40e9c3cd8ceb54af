"""LayerNorm against torch.nn.LayerNorm (same arguments, parameters, state_dict and repr),
forward and backward."""
import pytest
import torch

import truthgpt_kernels as tk
from truthgpt_kernels.modules import LayerNorm

from ..helpers import assert_close, check_module_against_torch, leaf

f64 = torch.float64


def _pair(shape, eps, affine, bias, dtype):
    ours = LayerNorm(shape, eps=eps, elementwise_affine=affine, bias=bias, dtype=dtype)
    theirs = torch.nn.LayerNorm(shape, eps=eps, elementwise_affine=affine, bias=bias, dtype=dtype)
    with torch.no_grad():
        for p in ours.parameters():
            p.normal_(0.5, 0.3)
    theirs.load_state_dict(ours.state_dict())
    return ours, theirs


@pytest.mark.parametrize("shape", [16, (16,), (3, 8), 1], ids=["int", "tuple", "2d", "one"])
@pytest.mark.parametrize("eps", [1e-5, 1e-2])
@pytest.mark.parametrize("affine,bias", [(True, True), (True, False), (False, False)])
def test_matches_torch_layernorm_float64(shape, eps, affine, bias):
    ours, theirs = _pair(shape, eps, affine, bias, f64)
    norm_shape = (shape,) if isinstance(shape, int) else shape
    x = torch.randn(2, 5, *norm_shape, dtype=f64) * 2 + 1
    xa, xb = leaf(x), leaf(x)
    ya, yb = ours(xa), theirs(xb)
    torch.testing.assert_close(ya, yb, rtol=1e-12, atol=1e-12)
    dy = torch.randn_like(ya)
    ya.backward(dy)
    yb.backward(dy)
    torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-10, atol=1e-10)
    for pa, pb in zip(ours.parameters(), theirs.parameters()):
        torch.testing.assert_close(pa.grad, pb.grad, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision_within_torch_error(dtype):
    """Our error against float64 is at most 2x torch.nn.LayerNorm's in the same dtype (+ atol)."""
    ours, theirs = _pair(64, 1e-5, True, True, dtype)
    ref = torch.nn.LayerNorm(64, dtype=f64)
    ref.load_state_dict({k: v.double() for k, v in ours.state_dict().items()})
    x = torch.randn(4, 7, 64, dtype=dtype) * 3
    check_module_against_torch(ours, theirs, ref, x, ("weight", "bias"))


def test_state_dict_and_repr_like_torch():
    for kwargs in ({}, {"bias": False}, {"elementwise_affine": False}, {"eps": 1e-6}):
        ours, theirs = LayerNorm(8, **kwargs), torch.nn.LayerNorm(8, **kwargs)
        assert ours.state_dict().keys() == theirs.state_dict().keys()
        for k, v in theirs.state_dict().items():
            assert torch.equal(ours.state_dict()[k], v), k  # same initial values
        assert repr(ours) == repr(theirs)
        theirs.load_state_dict(ours.state_dict())  # and back
        ours.load_state_dict(theirs.state_dict())
        assert (ours.weight is None) == (theirs.weight is None)
        assert (ours.bias is None) == (theirs.bias is None)


def test_loads_torch_weights_and_matches():
    torch_ln = torch.nn.LayerNorm(24)
    with torch.no_grad():
        torch_ln.weight.normal_()
        torch_ln.bias.normal_()
    ours = LayerNorm(24)
    ours.load_state_dict(torch_ln.state_dict())
    x = torch.randn(3, 24) + 2
    assert_close("out", ours(x).detach(), torch_ln.double()(x.double()).detach(), torch_ln.float()(x).detach())


def test_uses_the_fused_op(monkeypatch):
    calls = []
    real = tk.modules.norm.layer_norm
    monkeypatch.setattr(tk.modules.norm, "layer_norm", lambda *a, **k: calls.append(1) or real(*a, **k))
    LayerNorm(8)(torch.randn(2, 8))
    assert calls


def test_bad_shape():  # torch's own exception, as torch.nn.LayerNorm (a drop-in)
    with pytest.raises(RuntimeError, match=r"expected input with shape \[\*"):
        LayerNorm(8)(torch.randn(2, 7))
