"""MultiheadAttention as a drop-in for torch.nn.MultiheadAttention, and replace_modules()."""
import copy

import pytest
import torch
from torch import nn

import truthgpt_kernels as tk
from truthgpt_kernels.modules.multihead import MultiheadAttention
from truthgpt_kernels.patch import replace_modules


def _pair(**kw):
    ref = nn.MultiheadAttention(16, 4, **kw).double()
    ours = MultiheadAttention(16, 4, **kw).double()
    ours.load_state_dict(ref.state_dict())  # same keys: loads unchanged
    assert set(ours.state_dict()) == set(ref.state_dict())
    return ref, ours


def _inputs(batch_first, L, S, kdim=16, vdim=16, B=3):
    def t(n, d):
        x = torch.randn(B, n, d, dtype=torch.float64)
        return (x if batch_first else x.transpose(0, 1)).requires_grad_()
    return t(L, 16), t(S, kdim), t(S, vdim)


CONFIGS = {
    "self": dict(), "bias_kv": dict(add_bias_kv=True), "kdim_vdim": dict(kdim=12, vdim=10),
    "no_bias": dict(bias=False),
}


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("mask", ["none", "padding", "causal", "need_weights"])
def test_mha_matches_torch(batch_first, config, mask):
    kw = CONFIGS[config]
    ref, ours = _pair(batch_first=batch_first, **kw)
    L = 6
    S = L if mask == "causal" or config == "self" else 9
    q, k, v = _inputs(batch_first, L, S, kw.get("kdim", 16), kw.get("vdim", 16))
    if config == "self":
        k = v = q
    call = dict(need_weights=mask == "need_weights")
    if mask == "padding":
        kpm = torch.rand(3, S) > 0.6
        kpm[:, 0] = False
        call["key_padding_mask"] = kpm
    if mask == "causal":
        call["attn_mask"] = nn.Transformer.generate_square_subsequent_mask(L, dtype=torch.float64)
        call["is_causal"] = True
    a, wa = ref(q, k, v, **call)
    grads_a = torch.autograd.grad(a.sum(), [q] + ([k, v] if k is not q else []) + list(ref.parameters()))
    b, wb = ours(q, k, v, **call)
    grads_b = torch.autograd.grad(b.sum(), [q] + ([k, v] if k is not q else []) + list(ours.parameters()))
    torch.testing.assert_close(b, a)
    assert (wa is None) == (wb is None)
    if wa is not None:
        torch.testing.assert_close(wb, wa)
    for ga, gb in zip(grads_a, grads_b):  # backward recomputes P from the float32 lse
        torch.testing.assert_close(gb, ga, rtol=1e-5, atol=1e-6)


def test_mha_fast_path_uses_tk_attention(monkeypatch):
    calls = []
    import truthgpt_kernels.modules.multihead as mh
    real = mh.attention
    monkeypatch.setattr(mh, "attention", lambda *a, **k: calls.append(k) or real(*a, **k))
    _, ours = _pair(batch_first=True)
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    kpm = torch.zeros(2, 5, dtype=torch.bool)
    ours(x, x, x, key_padding_mask=kpm, need_weights=False)
    ours(x, x, x, need_weights=False, attn_mask=nn.Transformer.generate_square_subsequent_mask(5), is_causal=True)
    assert len(calls) == 2 and calls[1]["causal"] is True
    ours(x, x, x, need_weights=True)  # slow path: torch's own
    assert len(calls) == 2


def test_mha_unbatched_input():
    ref, ours = _pair()
    x = torch.randn(5, 16, dtype=torch.float64)
    torch.testing.assert_close(ours(x, x, x, need_weights=False)[0], ref(x, x, x, need_weights=False)[0])


def _encoder(norm_first=False):
    layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True, norm_first=norm_first)
    return nn.TransformerEncoder(layer, 2, enable_nested_tensor=True).double()


@pytest.mark.parametrize("train", [False, True])
def test_replace_modules_transformer_encoder(train):
    model = _encoder()
    model.train(train)
    ref = copy.deepcopy(model)
    x = torch.randn(2, 7, 32, dtype=torch.float64)
    kpm = torch.zeros(2, 7, dtype=torch.bool)
    kpm[1, 5:] = True
    params_before = [id(p) for p in model.parameters()]
    replace_modules(model)
    assert [id(p) for p in model.parameters()] == params_before  # weights kept, not copied
    assert all(type(layer.self_attn) is MultiheadAttention for layer in model.layers)
    swapped = [t for _, t in model.truthgpt_report.swapped]
    # 2 x (attn + 2 norms + the feed-forward's 2 linears)
    assert sorted(swapped) == ["LayerNorm"] * 4 + ["Linear"] * 4 + ["MultiheadAttention"] * 2
    with torch.set_grad_enabled(train):
        out = model(x, src_key_padding_mask=kpm)
        expected = ref(x, src_key_padding_mask=kpm)
    valid = ~kpm
    torch.testing.assert_close(out[valid], expected[valid])


def test_replace_modules_encoder_eval_runs_our_attention(monkeypatch):
    """nn.TransformerEncoderLayer's fused eval fast path must not bypass the swapped module."""
    calls = []
    import truthgpt_kernels.modules.multihead as mh
    real = mh.attention
    monkeypatch.setattr(mh, "attention", lambda *a, **k: calls.append(1) or real(*a, **k))
    model = replace_modules(_encoder().eval())
    with torch.no_grad():
        model(torch.randn(2, 7, 32, dtype=torch.float64))
    assert len(calls) == 2


class TinyGPT(nn.Module):
    def __init__(self, d=32, heads=4, layers=2, vocab=50):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList(nn.ModuleDict({
            "norm1": nn.RMSNorm(d), "attn": nn.MultiheadAttention(d, heads, batch_first=True),
            "norm2": nn.RMSNorm(d), "mlp": nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d)),
        }) for _ in range(layers))
        self.head = nn.Linear(d, vocab)

    def forward(self, ids):
        x = self.emb(ids)
        S = ids.shape[1]
        mask = nn.Transformer.generate_square_subsequent_mask(S, dtype=x.dtype)
        for b in self.blocks:
            h = b["norm1"](x)
            x = x + b["attn"](h, h, h, attn_mask=mask, is_causal=True, need_weights=False)[0]
            x = x + b["mlp"](b["norm2"](x))
        return self.head(x)


def test_replace_modules_gpt_same_results_and_trains():
    torch.manual_seed(0)
    model = TinyGPT().double()
    ref = copy.deepcopy(model)
    replace_modules(model)
    assert len(model.truthgpt_report.swapped) == 12  # 2 x (attn + 2 norms + 2 mlp linears) + head + emb
    assert ('emb', 'Embedding') in model.truthgpt_report.swapped
    ids = torch.randint(0, 50, (2, 12))
    out, expected = model(ids), ref(ids)
    torch.testing.assert_close(out, expected)
    g = torch.autograd.grad(out.logsumexp(-1).sum(), list(model.parameters()))
    ge = torch.autograd.grad(expected.logsumexp(-1).sum(), list(ref.parameters()))
    for a, b in zip(g, ge):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        loss = nn.functional.cross_entropy(model(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


def test_replace_modules_include_exclude_and_report():
    model = TinyGPT()
    replace_modules(model, include=["RMSNorm"])
    assert {t for _, t in model.truthgpt_report.swapped} == {"RMSNorm"}
    model = TinyGPT()
    replace_modules(model, exclude=["blocks.0"])
    assert all(not n.startswith("blocks.0") for n, _ in model.truthgpt_report.swapped)
    replace_modules(model := TinyGPT(), exclude=["Linear"])
    assert "Linear" not in {t for _, t in model.truthgpt_report.swapped}
    empty = replace_modules(nn.Sequential(nn.GELU(), nn.Dropout()))
    assert empty.truthgpt_report.swapped == [] and "nothing to replace" in str(empty.truthgpt_report)
    multi = replace_modules(nn.Sequential(nn.RMSNorm([4, 5])))
    assert multi.truthgpt_report.skipped and "more than the last dim" in multi.truthgpt_report.skipped[0][1]


def test_replace_modules_embedding_keeps_parameter_and_options():
    """nn.Embedding -> modules.Embedding with the same Parameter (a tied head stays tied); the
    options torch's embedding serves are left, with the reason in the report."""
    model = nn.Sequential(nn.Embedding(30, 8, padding_idx=2), nn.Linear(8, 30))
    model[1].weight = model[0].weight
    w = model[0].weight
    replace_modules(model)
    assert type(model[0]).__name__ == "Embedding" and model[0].weight is w and model[1].weight is w
    assert model[0].padding_idx == 2
    sparse = nn.Sequential(nn.Embedding(30, 8, sparse=True))
    replace_modules(sparse)
    assert type(sparse[0]) is nn.Embedding
    assert any("sparse" in why for _, why in sparse.truthgpt_report.skipped)


def test_replace_modules_keeps_hooks_and_leaves_hook_computed_weights():
    """The user's forward / pre-forward / state_dict hooks serve the new module (their handles
    still remove them); pruned and (old-style) weight-normed layers, whose weight a pre-hook
    recomputes, are left with the reason (the converter used to fail on them with TypeError)."""
    import torch.nn.utils.prune as prune
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8), nn.Linear(8, 8), nn.Linear(8, 8), nn.Embedding(5, 8))
    seen = []
    handle = m[0].register_forward_hook(lambda mod, args, out: out * 0 + 1)
    m[1].register_forward_pre_hook(lambda mod, args: seen.append(type(mod).__module__))
    m[4].register_forward_hook(lambda mod, args, out: seen.append("emb"))
    m[0]._register_state_dict_hook(lambda mod, sd, prefix, meta: sd.__setitem__(prefix + "extra", torch.ones(1)))
    prune.l1_unstructured(m[2], "weight", 0.5)
    with pytest.warns(FutureWarning):
        nn.utils.weight_norm(m[3])
    x = torch.randn(2, 8)
    want = m[:4](x).detach()
    replace_modules(m)
    left = dict(m.truthgpt_report.skipped)
    assert [n for n, _ in m.truthgpt_report.swapped] == ["0", "1", "4"]
    assert "weight_mask, weight_orig" in left["2"] and "weight_g, weight_v" in left["3"]
    torch.testing.assert_close(m[:4](x), want)
    m[4](torch.tensor([1]))
    assert seen == ["torch.nn.modules.normalization", "truthgpt_kernels.modules.norm", "emb"]
    assert "0.extra" in m.state_dict()
    handle.remove()
    assert not torch.equal(m[0](x), torch.ones(2, 8))
