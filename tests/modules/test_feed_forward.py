"""SwiGLU, GeGLU and MLP against their eager formulas with the same weights (forward and backward);
MoE against a per-token loop, its load-balancing loss and its capacity accounting."""

import pytest
import torch
import torch.nn.functional as F

from truthgpt_kernels.modules import MLP, GeGLU, MoE, SwiGLU

from ..helpers import assert_close

f64 = torch.float64


def eager_swiglu(m: SwiGLU, x):
    g = F.linear(x, m.gate_weight, None if m.gate_up.bias is None else m.gate_up.bias[: m.d_ff])
    u = F.linear(x, m.up_weight, None if m.gate_up.bias is None else m.gate_up.bias[m.d_ff:])
    return m.down(F.silu(g) * u)


def _same_as_eager_float64(m, eager):
    """The module and its eager formula agree in float64: output and every gradient."""
    x = torch.randn(3, 5, 16, dtype=f64, requires_grad=True)
    y, y2 = m(x), eager(m, x)
    torch.testing.assert_close(y, y2, rtol=1e-12, atol=1e-12)
    params = list(m.parameters())
    for a, b in zip(torch.autograd.grad(y.sum(), [x] + params), torch.autograd.grad(y2.sum(), [x] + params)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("bias", [False, True])
def test_swiglu_matches_eager_float64(bias):
    m = SwiGLU(16, 40, bias=bias, dtype=f64)
    _same_as_eager_float64(m, eager_swiglu)


def test_swiglu_float32_within_eager_error():
    m = SwiGLU(64, 176)
    ref = SwiGLU(64, 176, dtype=f64)
    ref.load_state_dict({k: v.double() for k, v in m.state_dict().items()})
    x = torch.randn(8, 64)
    assert_close("out", m(x).detach(), eager_swiglu(ref, x.double()).detach(), eager_swiglu(m, x).detach())


def eager_geglu(m: GeGLU, x):
    g = F.linear(x, m.gate_weight, None if m.gate_up.bias is None else m.gate_up.bias[: m.d_ff])
    u = F.linear(x, m.up_weight, None if m.gate_up.bias is None else m.gate_up.bias[m.d_ff:])
    return m.down(F.gelu(g, approximate=m.approximate) * u)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("approximate", ["tanh", "none"])
def test_geglu_matches_eager_float64(bias, approximate):
    m = GeGLU(16, 40, bias=bias, approximate=approximate, dtype=f64)
    _same_as_eager_float64(m, eager_geglu)


def test_geglu_float32_within_eager_error_and_like_swiglu():
    m = GeGLU(64, 176)
    ref = GeGLU(64, 176, dtype=f64)
    ref.load_state_dict({k: v.double() for k, v in m.state_dict().items()})
    x = torch.randn(8, 64)
    assert_close("out", m(x).detach(), eager_geglu(ref, x.double()).detach(), eager_geglu(m, x).detach())
    assert m.state_dict().keys() == SwiGLU(64, 176).state_dict().keys()
    assert "approximate='tanh'" in repr(m)
    with pytest.raises(ValueError, match="approximate must be one of"):
        GeGLU(4, 8, approximate="erf")


def test_mlp_matches_eager():
    m = MLP(16, 64, dtype=f64)
    x = torch.randn(4, 16, dtype=f64, requires_grad=True)
    y2 = m.fc2(F.gelu(m.fc1(x), approximate="tanh"))
    torch.testing.assert_close(m(x), y2)


# ----------------------------------------------------------------------------- MoE
def loop_moe(m: MoE, x):
    """Each token: sum over its top-k experts of renormalised prob * expert(token)."""
    out = torch.zeros_like(x)
    probs = torch.softmax(m.router(x).float(), -1)
    for n in range(x.shape[0]):
        w, e = probs[n].topk(m.top_k)
        w = w / w.sum()
        for wi, ei in zip(w, e):
            out[n] += wi.to(x.dtype) * m.experts[int(ei)](x[n:n + 1])[0]
    return out


def test_moe_matches_per_token_loop_and_keeps_every_token():
    torch.manual_seed(0)
    m = MoE(16, 32, n_experts=4, top_k=2, dtype=f64)
    x = torch.randn(2, 9, 16, dtype=f64, requires_grad=True)
    y = m(x)
    y2 = loop_moe(m, x.reshape(-1, 16)).reshape(x.shape)
    torch.testing.assert_close(y, y2, rtol=1e-10, atol=1e-12)
    g1 = torch.autograd.grad(y.sum(), [x, m.router.weight, m.experts[0].down.weight])
    g2 = torch.autograd.grad(y2.sum(), [x, m.router.weight, m.experts[0].down.weight])
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    assert m.dropped_assignments == 0 and m.dropped_tokens == 0
    assert int(m.expert_counts.sum()) == 18 * 2


def test_aux_loss_formula_and_uniform_router():
    torch.manual_seed(1)
    m = MoE(8, 16, n_experts=4, top_k=1, aux_loss_weight=0.5, dtype=f64)
    x = torch.randn(20, 8, dtype=f64)
    m(x)
    probs = torch.softmax(m.router(x), -1)
    f = torch.bincount(probs.argmax(-1), minlength=4).double() / 20
    expected = 0.5 * 4 * (f * probs.mean(0)).sum()
    torch.testing.assert_close(m.aux_loss.double(), expected)
    g, = torch.autograd.grad(m.aux_loss, m.router.weight)  # it trains the router
    assert g.abs().sum() > 0
    with torch.no_grad():
        m.router.weight.zero_()  # uniform probabilities: the loss is exactly its minimum, 1
    m(x)
    torch.testing.assert_close(m.aux_loss.double(), torch.tensor(0.5, dtype=f64))


def test_capacity_drops_are_counted_and_passed_through():
    torch.manual_seed(2)
    m = MoE(8, 16, n_experts=4, top_k=1, capacity_factor=1.0, dtype=f64)
    with torch.no_grad():  # route every token to expert 0: capacity ceil(1.0 * 12 / 4) = 3
        m.router.weight.zero_()
        m.router.weight[0] = 1.0
    x = torch.rand(12, 8, dtype=f64) + 0.1  # positive, so expert 0 wins for all
    y = m(x)
    assert m.dropped_assignments == 9 and m.dropped_tokens == 9 and m.total_dropped_tokens == 9
    # the first 3 tokens (queue order) were processed; the dropped ones output exactly zero,
    # so a residual block passes them through unchanged
    torch.testing.assert_close(y[:3], m.experts[0](x[:3]))
    assert torch.equal(y[3:], torch.zeros_like(y[3:]))
    m(x)
    assert m.total_dropped_tokens == 18


def test_capacity_with_top2_keeps_partial_tokens():
    torch.manual_seed(3)
    m = MoE(8, 16, n_experts=4, top_k=2, capacity_factor=100.0, dtype=f64)
    x = torch.randn(10, 8, dtype=f64)
    torch.testing.assert_close(m(x), loop_moe(m, x))  # a large capacity drops nothing
    assert m.dropped_assignments == 0


def test_moe_errors():
    with pytest.raises(ValueError, match="top_k"):
        MoE(8, 16, n_experts=2, top_k=3)
    with pytest.raises(ValueError, match="capacity_factor"):
        MoE(8, 16, capacity_factor=0.0)
