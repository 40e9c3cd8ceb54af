"""torch.func transforms (jvp, grad, vmap) and forward-mode AD (torch.autograd.forward_ad) through
every differentiable op: the custom ops carry reverse-mode formulas only, so while a transform
or a dual level is active each op runs its pure-PyTorch reference (backends.composite_needed).
Before that, a C++ kernel dropped the tangents (jvp returned zeros, dual outputs had none) and
torch.func.grad raised. Compared with plain PyTorch / the float64 reference composites."""
import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch.func import grad, jvp, vmap

import truthgpt_kernels as tk
from truthgpt_kernels.ops import reference

D = 16


def _params(dtype):
    g = torch.Generator().manual_seed(1)
    return {name: torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
            for name, shape in (("w", (D,)), ("b", (D,)), ("W", (7, D)), ("G", (2, 7, D)),
                                ("r", (3, 5, D)))}


def _cases(p):
    cos, sin = reference.rotary_cos_sin(5, 8, dtype=p["w"].dtype)
    offs = torch.tensor([2, 5])

    def attn(fn):  # x (..., 5, D) -> one head per leading row, causal
        return lambda x: fn(x.reshape(-1, 1, 5, D)).reshape(x.shape)
    causal = torch.ones(5, 5, dtype=torch.bool).triu(1)
    return {  # name: (ours, plain PyTorch)
        "layer_norm": (lambda x: tk.layer_norm(x, p["w"], p["b"]), lambda x: F.layer_norm(x, (D,), p["w"], p["b"])),
        "rms_norm": (lambda x: tk.rms_norm(x, p["w"], 1e-6), lambda x: F.rms_norm(x, (D,), p["w"], 1e-6)),
        "add_rms_norm": (lambda x: tk.add_rms_norm(x, p["r"][:x.shape[0]] if x.dim() == 3 else p["r"][0], p["w"])[0],
                         lambda x: F.rms_norm(x + (p["r"][:x.shape[0]] if x.dim() == 3 else p["r"][0]), (D,), p["w"], 1e-6)),
        "linear": (lambda x: tk.linear(x, p["W"]), lambda x: F.linear(x, p["W"])),
        "grouped_linear": (lambda x: tk.grouped_linear(x.reshape(-1, D)[:5], p["G"], offs),
                           lambda x: torch.cat((x.reshape(-1, D)[:2] @ p["G"][0].T, x.reshape(-1, D)[2:5] @ p["G"][1].T))),
        "swiglu": (lambda x: tk.swiglu(x), lambda x: F.silu(x[..., :D // 2]) * x[..., D // 2:]),
        "geglu": (lambda x: tk.geglu(x), lambda x: F.gelu(x[..., :D // 2], approximate="tanh") * x[..., D // 2:]),
        "rotary": (attn(lambda y: tk.apply_rotary(y, cos, sin)), attn(lambda y: reference.apply_rotary(y, cos, sin))),
        "attention": (attn(lambda y: tk.attention(y, y, y, causal=True)),
                      attn(lambda y: torch.softmax((y @ y.mT / D ** 0.5).masked_fill(causal, -torch.inf), -1) @ y)),
    }


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("name", ["layer_norm", "rms_norm", "add_rms_norm", "linear", "grouped_linear",
                                  "swiglu", "geglu", "rotary", "attention"])
def test_jvp_grad_vmap_and_forward_ad(name, dtype):
    ours, plain = _cases(_params(dtype))[name]
    g = torch.Generator().manual_seed(0)
    x, t = (torch.randn(3, 5, D, generator=g, dtype=torch.float64).to(dtype) for _ in range(2))
    tol = {} if dtype == torch.float64 else dict(rtol=2e-5, atol=2e-5)
    out, tangent = jvp(ours, (x,), (t,))
    want_out, want_tangent = jvp(plain, (x,), (t,))
    torch.testing.assert_close(out, want_out, **tol)
    torch.testing.assert_close(tangent, want_tangent, **tol)
    assert tangent.abs().max() > 0
    torch.testing.assert_close(grad(lambda x: ours(x).square().sum())(x),
                               grad(lambda x: plain(x).square().sum())(x), **tol)
    if name != "grouped_linear":  # (its rows are groups: not a per-sample function)
        torch.testing.assert_close(vmap(ours)(x), vmap(plain)(x), **tol)
    for grad_mode in (False, True):
        with fwAD.dual_level(), torch.set_grad_enabled(grad_mode):
            dual = fwAD.make_dual(x, t)
            got = fwAD.unpack_dual(ours(dual)).tangent
            assert got is not None, f"{name}: the output of a dual input has no tangent (grad mode {grad_mode})"
            torch.testing.assert_close(got, fwAD.unpack_dual(plain(dual)).tangent, **tol)


def test_embedding_and_linear_cross_entropy_under_transforms():
    g = torch.Generator().manual_seed(0)
    E = torch.randn(10, 4, generator=g, dtype=torch.float64)
    idx = torch.randint(0, 10, (3, 5), generator=g)
    torch.testing.assert_close(grad(lambda E: tk.embedding(idx, E, padding_idx=2).square().sum())(E),
                               grad(lambda E: F.embedding(idx, E, padding_idx=2).square().sum())(E))
    _, tangent = jvp(lambda E: tk.embedding(idx, E), (E,), (torch.ones_like(E),))
    assert torch.all(tangent == 1)
    x, W = torch.randn(6, D, generator=g, dtype=torch.float64), torch.randn(7, D, generator=g, dtype=torch.float64)
    target = torch.randint(0, 7, (6,), generator=g)

    def ours(x):
        return tk.linear_cross_entropy(x, W, target, label_smoothing=0.1)

    def plain(x):
        return F.cross_entropy(x @ W.T, target, label_smoothing=0.1)
    torch.testing.assert_close(grad(ours)(x), grad(plain)(x))
    torch.testing.assert_close(jvp(ours, (x,), (x,))[1], jvp(plain, (x,), (x,))[1])


def test_modules_under_func_grad():
    """torch.func.functional_call + grad over the parameters of the drop-in modules."""
    torch.manual_seed(0)
    for ours, theirs in ((tk.modules.LayerNorm(D), torch.nn.LayerNorm(D)), (tk.modules.RMSNorm(D), torch.nn.RMSNorm(D)),
                         (tk.modules.Linear(D, 3), None)):
        ours.double()
        theirs = theirs.double() if theirs is not None else torch.nn.Linear(D, 3).double()
        theirs.load_state_dict(ours.state_dict())
        x = torch.randn(4, D, dtype=torch.float64)
        params = dict(ours.named_parameters())

        def loss(p, m):
            return torch.func.functional_call(m, p, (x,)).square().sum()
        got, want = grad(loss)(params, ours), grad(loss)(params, theirs)
        for k in params:
            torch.testing.assert_close(got[k], want[k])
