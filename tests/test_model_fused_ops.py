"""Issue #16 wiring: config norm "layernorm" on our LayerNorm, ffn "geglu", the fused LM-head
loss of Transformer.forward (return_logits=False), and replace_modules for nn.LayerNorm."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from truthgpt_kernels import Transformer, TransformerConfig
from truthgpt_kernels.modules.feed_forward import GeGLU
from truthgpt_kernels.modules.norm import LayerNorm, make_norm
from truthgpt_kernels.patch import replace_modules

V = 97  # a vocabulary no other dim of the tiny model equals


def _config(**kw):
    base = dict(vocab_size=V, d_model=32, n_layers=2, n_heads=4, max_seq_len=16, dtype="float64")
    return TransformerConfig(**{**base, **kw})


def _data(B=2, S=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, V, (B, S), generator=g)
    targets = torch.randint(0, V, (B, S), generator=g)
    targets[0, :3] = -100  # ignored positions: not counted by the mean
    return tokens, targets


# ----------------------------------------------------------------------------- 1. norm
def test_layernorm_config_builds_our_layer_norm_with_torch_state_dict():
    norm = make_norm("layernorm", 8, 1e-6)
    assert type(norm) is LayerNorm and norm.eps == 1e-6
    assert set(norm.state_dict()) == set(nn.LayerNorm(8).state_dict()) == {"weight", "bias"}
    model = Transformer(_config(norm="layernorm"))
    norms = [m for m in model.modules() if isinstance(m, (nn.LayerNorm, LayerNorm))]
    assert norms and all(type(m) is LayerNorm for m in norms)
    assert model.num_parameters() == model.config.num_parameters()
    # reset_parameters covers ours: ones / zeros again
    with torch.no_grad():
        for m in norms:
            m.weight.normal_()
            m.bias.normal_()
    model.reset_parameters()
    assert all(bool((m.weight == 1).all()) and bool((m.bias == 0).all()) for m in norms)


def test_layernorm_model_matches_torch_layer_norm():
    torch.manual_seed(0)
    model = Transformer(_config(norm="layernorm"))
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LayerNorm):
                m.weight.normal_(1.0, 0.2)
                m.bias.normal_(0.0, 0.2)
    ref = copy.deepcopy(model)
    for name, m in list(ref.named_modules()):  # the same model on torch's LayerNorm
        if isinstance(m, LayerNorm):
            parent, _, attr = name.rpartition(".")
            new = nn.LayerNorm(m.normalized_shape, eps=m.eps, dtype=torch.float64)
            new.load_state_dict(m.state_dict())
            setattr(ref.get_submodule(parent), attr, new)
    tokens, targets = _data()
    _, loss = model(tokens, targets)
    _, expected = ref(tokens, targets)
    torch.testing.assert_close(loss, expected)
    g = torch.autograd.grad(loss, list(model.parameters()))
    ge = torch.autograd.grad(expected, list(ref.parameters()))
    for a, b in zip(g, ge):
        torch.testing.assert_close(a, b)


# ----------------------------------------------------------------------------- 2. geglu
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("ffn", ["geglu", "swiglu", "moe"])
def test_gated_ffn_parameter_count(ffn, bias):
    cfg = _config(ffn=ffn, bias=bias, n_experts=2, experts_top_k=1)
    assert Transformer(cfg).num_parameters() == cfg.num_parameters()


def test_geglu_config_builds_tanh_geglu_with_swiglu_width():
    cfg = _config(ffn="geglu", d_model=48, n_heads=4)
    assert cfg.ffn_dim == _config(ffn="swiglu", d_model=48, n_heads=4).ffn_dim == 128
    model = Transformer(cfg)
    ffns = [layer.ffn for layer in model.layers]
    assert all(type(f) is GeGLU and f.approximate == "tanh" for f in ffns)
    x = torch.randn(2, 3, 48, dtype=torch.float64)
    f = ffns[0]
    gate, up = f.gate_up(x).chunk(2, dim=-1)
    torch.testing.assert_close(f(x), f.down(F.gelu(gate, approximate="tanh") * up))
    tokens, targets = _data()
    _, loss = model(tokens, targets, return_logits=False)
    assert torch.isfinite(loss)


def test_unknown_ffn_lists_geglu():
    with pytest.raises(ValueError, match="swiglu, geglu, mlp, moe"):
        _config(ffn="gelu")


# ----------------------------------------------------------------------------- 3. fused loss
def _reference_loss(model, tokens, targets):
    """F.cross_entropy on materialised float64 logits, plus the MoE loss."""
    logits = model(tokens)
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100) + model.aux_loss()


@pytest.mark.parametrize("kw", [dict(), dict(tie_embeddings=False), dict(ffn="moe", n_experts=2),
                                dict(norm="layernorm", ffn="geglu")],
                         ids=["tied", "untied", "moe", "layernorm-geglu"])
@pytest.mark.parametrize("return_logits", [True, False])
def test_loss_and_grads_match_cross_entropy_on_logits(kw, return_logits):
    torch.manual_seed(0)
    model = Transformer(_config(**kw))
    tokens, targets = _data()
    expected = _reference_loss(model, tokens, targets)
    ge = torch.autograd.grad(expected, list(model.parameters()))
    logits, loss = model(tokens, targets, return_logits=return_logits)
    assert (logits is None) == (not return_logits)
    if return_logits:
        assert logits.shape == (2, 7, V)
    # the logits path takes the loss in float32 (as it always has); the fused one in float64
    tol = dict(rtol=1e-6, atol=1e-6) if return_logits else dict(rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(loss.double(), expected, **tol)
    g = torch.autograd.grad(loss, list(model.parameters()))
    for (name, _), a, b in zip(model.named_parameters(), g, ge):
        torch.testing.assert_close(a.double(), b, **tol, msg=name)


def test_float32_fused_loss_matches_float64():
    torch.manual_seed(0)
    model = Transformer(_config(dtype="float32"))
    ref = copy.deepcopy(model).double()
    tokens, targets = _data()
    _, loss = model(tokens, targets, return_logits=False)
    expected = _reference_loss(ref, tokens, targets)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)  # float32 GEMMs, d=32
    for a, b in zip(torch.autograd.grad(loss, list(model.parameters())),
                    torch.autograd.grad(expected, list(ref.parameters()))):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-6)


def test_fused_loss_uses_lm_head_bias():
    torch.manual_seed(0)
    model = Transformer(_config(tie_embeddings=False))
    model.lm_head.bias = nn.Parameter(torch.randn(V, dtype=torch.float64))
    tokens, targets = _data()
    expected = _reference_loss(model, tokens, targets)
    _, loss = model(tokens, targets, return_logits=False)
    torch.testing.assert_close(loss, expected, rtol=1e-10, atol=1e-12)
    gb, = torch.autograd.grad(loss, [model.lm_head.bias])
    geb, = torch.autograd.grad(expected, [model.lm_head.bias])
    torch.testing.assert_close(gb, geb, rtol=1e-10, atol=1e-12)


class _Shapes(TorchDispatchMode):
    """Records the shape of every tensor an op takes or returns."""

    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves((args, kwargs, out)):
            if isinstance(t, torch.Tensor):
                self.shapes.append(tuple(t.shape))
        return out


def test_fused_path_never_materialises_logits(monkeypatch):
    torch.manual_seed(0)
    model = Transformer(_config(dtype="float32", tie_embeddings=False))
    tokens, targets = _data()
    monkeypatch.setattr(model.lm_head, "forward", lambda *a: pytest.fail("lm_head ran"))
    with _Shapes() as rec:
        _, loss = model(tokens, targets, return_logits=False)
        loss.backward()
    # weights (V, d) and their grads pass through; no tensor of (B*S) x V elements
    assert (V, 32) in rec.shapes
    assert not [s for s in rec.shapes if V in s and len(s) >= 2 and s != (V, 32)], \
        sorted({s for s in rec.shapes if V in s})


def test_fused_loss_under_autocast_follows_the_autocast_dtype():
    torch.manual_seed(0)
    model = Transformer(_config(dtype="float32"))
    tokens, targets = _data()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, fused = model(tokens, targets, return_logits=False)
        _, plain = model(tokens, targets)
    assert fused.dtype == torch.float32
    torch.testing.assert_close(fused, plain, rtol=2e-2, atol=2e-2)  # bf16 logits either way


def test_return_logits_bad_arguments():
    model = Transformer(_config())
    tokens, _ = _data()
    with pytest.raises(ValueError, match="return_logits=False needs targets"):
        model(tokens, return_logits=False)
    with pytest.raises(TypeError, match="return_logits"):
        model(tokens, tokens, return_logits="no")


# ----------------------------------------------------------------------------- 4. replace_modules
LN_CASES = {"affine": dict(), "no_bias": dict(bias=False), "no_affine": dict(elementwise_affine=False),
            "eps": dict(eps=1e-3)}


@pytest.mark.parametrize("case", list(LN_CASES))
def test_replace_modules_swaps_layer_norm(case):
    torch.manual_seed(0)
    ref = nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16, **LN_CASES[case])).double()
    if ref[1].weight is not None:
        with torch.no_grad():
            ref[1].weight.normal_(1.0, 0.3)
            if ref[1].bias is not None:
                ref[1].bias.normal_(0.0, 0.3)
    model = copy.deepcopy(ref)
    params = [id(p) for p in model.parameters()]
    replace_modules(model)
    new = model[1]
    assert type(new) is LayerNorm and model.truthgpt_report.swapped == [("0", "Linear"), ("1", "LayerNorm")]
    assert [id(p) for p in model.parameters()] == params  # the same Parameters
    assert (new.eps, new.elementwise_affine, new.bias is None) == \
        (ref[1].eps, ref[1].elementwise_affine, ref[1].bias is None)
    x = torch.randn(3, 5, 8, dtype=torch.float64, requires_grad=True)
    out, expected = model(x), ref(x)
    torch.testing.assert_close(out, expected)
    w = torch.randn_like(out)
    g = torch.autograd.grad((out * w).sum(), [x] + list(model.parameters()))
    ge = torch.autograd.grad((expected * w).sum(), [x] + list(ref.parameters()))
    for a, b in zip(g, ge):
        torch.testing.assert_close(a, b)
    # state_dicts load both ways
    assert set(model.state_dict()) == set(ref.state_dict())
    back = copy.deepcopy(ref)
    back.load_state_dict(model.state_dict())
    model.load_state_dict(ref.state_dict())


def test_replace_modules_leaves_multi_dim_layer_norm():
    model = replace_modules(nn.Sequential(nn.LayerNorm([4, 5]), nn.LayerNorm(5)))
    assert type(model[0]) is nn.LayerNorm and type(model[1]) is LayerNorm
    assert model.truthgpt_report.skipped[0][0] == "0"
    assert "more than the last dim" in model.truthgpt_report.skipped[0][1]


def test_replace_modules_encoder_eval_runs_our_layer_norm(monkeypatch):
    """nn.TransformerEncoderLayer's fused eval fast path must not bypass the swapped norms."""
    import truthgpt_kernels.modules.norm as norm_mod
    calls = []
    real = norm_mod.layer_norm
    monkeypatch.setattr(norm_mod, "layer_norm", lambda *a, **k: calls.append(1) or real(*a, **k))
    layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True)
    ref = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).double().eval()
    model = replace_modules(copy.deepcopy(ref), include=["LayerNorm"])
    assert len(model.truthgpt_report.swapped) == 4
    x = torch.randn(2, 7, 32, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x))
    assert len(calls) == 4


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors is in prototype stage")
@pytest.mark.parametrize("layout", [torch.strided, torch.jagged])
def test_layer_norm_nested_input(layout):
    """nn.TransformerEncoder's padding fast path hands nested tensors to the swapped norms."""
    torch.manual_seed(0)
    norm = LayerNorm(6, dtype=torch.float64)
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    parts = [torch.randn(n, 6, dtype=torch.float64) for n in (3, 1, 4)]
    out = norm(torch.nested.as_nested_tensor(parts, layout=layout))
    assert out.is_nested and out.layout == layout
    for o, p in zip(out.unbind(), parts):
        torch.testing.assert_close(o, F.layer_norm(p, (6,), norm.weight, norm.bias, norm.eps))
