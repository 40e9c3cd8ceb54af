"""MultiheadAttention against torch.nn.MultiheadAttention where PyTorch's own module tests found
gaps: nested-tensor inputs (nn.TransformerEncoder's padding fast path) and malformed inputs.
(The everyday drop-in cases are in tests/test_patch.py, torch.compile in tests/test_compile.py.)"""
import copy

import pytest
import torch
from torch import nn

import truthgpt_kernels as tk
import truthgpt_kernels.modules.multihead as mh
from truthgpt_kernels.patch import replace_modules

f64 = torch.float64


@pytest.fixture
def attention_calls(monkeypatch):
    """Counts the tk.attention calls made by MultiheadAttention's fast path."""
    calls = []
    real = mh.attention
    monkeypatch.setattr(mh, "attention", lambda *a, **k: calls.append(k) or real(*a, **k))
    return calls


# ------------------------------------------------------------------------ nested tensors
def _torch_encoder(activation, d=16, heads=4, layers=2):
    layer = nn.TransformerEncoderLayer(d, heads, 2 * d, dropout=0.0, batch_first=True,
                                       activation=activation)
    return nn.TransformerEncoder(layer, layers, enable_nested_tensor=True).to(f64).eval()


def _with_ours(ref, how):
    """The same encoder (identical weights) with our MultiheadAttention in every layer."""
    if how == "replace_model":
        return replace_modules(copy.deepcopy(ref))
    layer = copy.deepcopy(ref.layers[0])
    if how == "constructor":
        attn = tk.MultiheadAttention(layer.self_attn.embed_dim, layer.self_attn.num_heads,
                                     batch_first=True, dtype=f64)
        attn.load_state_dict(layer.self_attn.state_dict())
        layer.self_attn = attn
    else:  # "replace_layer": swapped before the encoder is built
        replace_modules(nn.Sequential(layer))
    enc = nn.TransformerEncoder(layer, len(ref.layers), enable_nested_tensor=True).to(f64).eval()
    enc.load_state_dict(ref.state_dict())
    return enc


@pytest.mark.parametrize("how", ["constructor", "replace_layer", "replace_model"])
@pytest.mark.parametrize("activation", ["relu", "gelu"])
def test_encoder_nested_tensor_path_matches_torch(how, activation, attention_calls):
    """torch's encoder (eval, no grad, a padding mask) runs its layers on nested tensors and
    returns zeros at the padded positions; with our attention in the layers it must too."""
    torch.manual_seed(0)
    ref = _torch_encoder(activation)
    ours = _with_ours(ref, how)
    assert all(type(layer.self_attn) is tk.MultiheadAttention for layer in ours.layers)
    x = torch.randn(3, 7, 16, dtype=f64)
    kpm = torch.tensor([[False] * 7, [False] * 4 + [True] * 3, [False] * 2 + [True] * 5])
    with torch.no_grad():
        expected = ref(x, src_key_padding_mask=kpm)
        out = ours(x, src_key_padding_mask=kpm)
    assert torch.all(expected[kpm] == 0)  # torch did take its nested-tensor path
    torch.testing.assert_close(out, expected)  # padded positions included
    assert len(attention_calls) == 2  # our kernel served both layers


@pytest.mark.parametrize("layout", [torch.strided, torch.jagged])
@pytest.mark.parametrize("cross", [False, True])
def test_nested_inputs_match_per_sequence_torch(layout, cross, attention_calls):
    """A nested (batch, ragged length, E) query/key/value: each sequence attends only to its own
    keys, as torch's MultiheadAttention does sequence by sequence."""
    torch.manual_seed(0)
    ref = nn.MultiheadAttention(16, 4, batch_first=True, dtype=f64)
    ours = tk.MultiheadAttention(16, 4, batch_first=True, dtype=f64)
    ours.load_state_dict(ref.state_dict())
    qs = [torch.randn(n, 16, dtype=f64) for n in (5, 2, 7)]
    ks = [torch.randn(n, 16, dtype=f64) for n in (3, 6, 1)] if cross else qs
    q = torch.nested.nested_tensor(qs, layout=layout)
    k = torch.nested.nested_tensor(ks, layout=layout) if cross else q
    out, weights = ours(q, k, k, need_weights=False)
    assert weights is None and out.is_nested and out.layout == layout
    assert len(attention_calls) == 1
    for o, qi, ki in zip(out.unbind(), qs, ks):
        torch.testing.assert_close(o, ref(qi[None], ki[None], ki[None], need_weights=False)[0][0])
    if not cross and layout == torch.strided:
        torch.testing.assert_close((q + out).to_padded_tensor(0.0).shape, (3, 7, 16))  # same structure


def test_nested_inputs_argument_errors():
    ours = tk.MultiheadAttention(16, 4, batch_first=True)
    q = torch.nested.nested_tensor([torch.randn(3, 16), torch.randn(2, 16)])
    with pytest.raises(ValueError, match="key_padding_mask"):
        ours(q, q, q, key_padding_mask=torch.zeros(2, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="batch_first"):
        tk.MultiheadAttention(16, 4)(q, q, q)


# ------------------------------------------------------------------------ malformed inputs
E, H, B, L, S = 16, 4, 2, 5, 6


def _bad(kind):
    """(module kwargs, forward args, the argument the message must name) for one malformed call."""
    q, k, v = torch.randn(B, L, E), torch.randn(B, S, E), torch.randn(B, S, E)
    kw = dict(batch_first=True)
    call = {}
    name = {"key_2d": "key", "value_2d": "value", "key_value_len": "value",
            "key_value_len_kdim": "value", "key_batch": "key", "query_4d": "query",
            "query_embed": "query", "key_kdim": "key", "unbatched_key_3d": "key"}.get(kind)
    if kind == "key_2d":
        k = k[0]
    elif kind == "value_2d":
        v = v[0]
    elif kind == "key_value_len":
        v = v[:, :-1]
    elif kind == "key_value_len_kdim":
        kw.update(kdim=12, vdim=10)
        k, v = torch.randn(B, S, 12), torch.randn(B, S - 1, 10)
    elif kind == "key_batch":
        k = v = torch.randn(B + 1, S, E)
    elif kind == "query_4d":
        q = q[None]
    elif kind == "query_embed":
        q = torch.randn(B, L, E + 1)
    elif kind == "key_kdim":
        kw.update(kdim=12, vdim=12)
        k, v = torch.randn(B, S, 13), torch.randn(B, S, 12)
    elif kind == "unbatched_key_3d":
        q = q[0]
    elif kind.startswith("kpm"):
        name = "key_padding_mask"
        call["key_padding_mask"] = {
            "kpm_len": torch.zeros(B, S + 1, dtype=torch.bool),
            "kpm_batch": torch.zeros(B + 1, S, dtype=torch.bool),
            "kpm_3d": torch.zeros(B, 1, S, dtype=torch.bool),
            "kpm_1d": torch.zeros(S, dtype=torch.bool),
            "kpm_int": torch.zeros(B, S, dtype=torch.long),
            "kpm_float_len": torch.zeros(B, S - 2),
        }[kind]
    elif kind.startswith("mask"):
        name = "attn_mask"
        call["attn_mask"] = {
            "mask_2d": torch.zeros(L, S + 1, dtype=torch.bool),
            "mask_3d": torch.zeros(B, L, S),  # must be (B * num_heads, L, S)
            "mask_4d": torch.zeros(B, H, L, S),
            "mask_int": torch.zeros(L, S, dtype=torch.int32),
        }[kind]
    return kw, (q, k, v), call, name


BAD = ["key_2d", "value_2d", "key_value_len", "key_value_len_kdim", "key_batch", "query_4d",
       "query_embed", "key_kdim", "unbatched_key_3d", "kpm_len", "kpm_batch", "kpm_3d", "kpm_1d",
       "kpm_int", "kpm_float_len", "mask_2d", "mask_3d", "mask_4d", "mask_int"]


@pytest.mark.parametrize("need_weights", [False, True])
@pytest.mark.parametrize("kind", BAD)
def test_malformed_inputs_raise_like_torch(kind, need_weights, monkeypatch):
    """The exception type torch raises (AssertionError / RuntimeError; ours are ValueErrors too),
    with a message naming the argument, before any kernel or projection runs."""
    kw, args, call, name = _bad(kind)
    torch.manual_seed(0)
    ref = nn.MultiheadAttention(E, H, **kw)
    ours = tk.MultiheadAttention(E, H, **kw)
    with pytest.raises(Exception) as theirs:
        ref(*args, need_weights=need_weights, **call)
    monkeypatch.setattr(mh, "attention", lambda *a, **k: pytest.fail("attention kernel ran"))
    monkeypatch.setattr(mh, "linear", lambda *a, **k: pytest.fail("projection ran"))
    with pytest.raises(Exception) as e:
        ours(*args, need_weights=need_weights, **call)
    assert isinstance(e.value, type(theirs.value)), (type(e.value), type(theirs.value), theirs.value)
    assert isinstance(e.value, ValueError if "int" not in kind else TypeError)
    assert f"`{name}`" in str(e.value) or f"{name} " in str(e.value), str(e.value)


def test_inputs_of_another_dtype_than_the_weights_raise_like_torch():
    """float32 inputs into a float64 module: torch's RuntimeError (ours used to raise TypeError)."""
    x = torch.randn(2, 5, E)
    torch.manual_seed(0)
    ref = nn.MultiheadAttention(E, H, batch_first=True).double()
    ours = tk.MultiheadAttention.from_torch(copy.deepcopy(ref))
    for m in (ref, ours):
        with pytest.raises(RuntimeError):
            m(x, x, x, need_weights=False)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast decides the dtypes: served
        y = ours.float()(x, x, x, need_weights=False)[0]
    assert y.dtype == torch.bfloat16


def test_is_causal_needs_attn_mask_like_torch():
    x = torch.randn(2, 5, E)
    for m in (nn.MultiheadAttention(E, H, batch_first=True), tk.MultiheadAttention(E, H, batch_first=True)):
        with pytest.raises(RuntimeError, match="attn_mask"):
            m(x, x, x, is_causal=True, need_weights=False)
