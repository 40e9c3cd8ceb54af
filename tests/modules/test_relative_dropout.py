"""The modules on rel_bias and attention dropout: Attention(position="relative") with a
RelativePositionBias against transformers' T5Attention (identical weights), the Transformer's
`position: relative` stacks (decoding with a cache matches the full forward), attention dropout
in Attention / Transformer / MultiheadAttention (training only, reproducible, served by the
fused kernel), config validation."""
import pytest
import torch
from torch import nn

import truthgpt_kernels as tk
import truthgpt_kernels.modules.multihead as mh
from truthgpt_kernels.config import ConfigError

f64 = torch.float64
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("decoder", [False, True])
def test_attention_matches_t5_attention(decoder):
    t5 = pytest.importorskip("transformers.models.t5.modeling_t5")
    from transformers import T5Config
    d, H, nb, md = 32, 4, 16, 20
    cfg = T5Config(d_model=d, d_kv=d // H, num_heads=H, relative_attention_num_buckets=nb,
                   relative_attention_max_distance=md, is_decoder=decoder)
    cfg._attn_implementation = "eager"
    ref = t5.T5Attention(cfg, has_relative_attention_bias=True).to(f64).eval()
    ours = tk.Attention(d, H, causal=decoder, position="relative", scale=1.0, dtype=f64).eval()
    rel = tk.RelativePositionBias(H, nb, md, bidirectional=not decoder, dtype=f64)
    with torch.no_grad():
        ours.qkv.weight.copy_(torch.cat([ref.q.weight, ref.k.weight, ref.v.weight]))
        ours.out.weight.copy_(ref.o.weight)
        rel.relative_attention_bias.weight.copy_(ref.relative_attention_bias.weight)
    x = torch.randn(2, 23, d, dtype=f64)
    S = x.shape[1]
    mask = None
    if decoder:  # T5's decoder gets the causal mask from its stack, as an additive bias
        mask = torch.full((S, S), float("-inf"), dtype=f64).triu(1)[None, None]
    want = ref(x, mask=mask)[0]
    got = ours(x, position_bias=rel())
    torch.testing.assert_close(got, want, rtol=1e-7, atol=1e-7)
    # the bias table learns: its gradient equals T5's (to the float32 lse the backward
    # rebuilds P from, DESIGN.md: ~1e-7 relative per term)
    got.sum().backward()
    want.sum().backward()
    torch.testing.assert_close(rel.relative_attention_bias.weight.grad,
                               ref.relative_attention_bias.weight.grad, rtol=1e-5, atol=1e-6)


def _model(model_type="decoder", **kw):
    torch.manual_seed(0)
    return tk.Transformer(vocab_size=97, d_model=64, n_layers=2, n_heads=4, position="relative",
                          model_type=model_type, relative_buckets=16, relative_max_distance=24,
                          max_seq_len=128, **kw)


def test_relative_decoder_cache_matches_full_forward():
    m = _model().eval()
    toks = torch.randint(0, 97, (2, 40))
    full = m(toks)
    cache = m.make_cache(2)
    step = [m(toks[:, :25], cache=cache)]
    for t in range(25, 40):
        step.append(m(toks[:, t:t + 1], cache=cache))
    torch.testing.assert_close(torch.cat(step, 1), full, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("model_type", ["encoder", "encoder_decoder"])
def test_relative_stacks_train(model_type):
    m = _model(model_type)
    toks = torch.randint(0, 97, (2, 30))
    kw = {"encoder_tokens": torch.randint(0, 97, (2, 17))} if model_type == "encoder_decoder" else {}
    _, loss = m(toks, toks, **kw)
    loss.backward()
    assert m.rel_pos.bidirectional == (model_type == "encoder")
    assert m.rel_pos.relative_attention_bias.weight.grad.abs().sum() > 0
    if model_type == "encoder_decoder":
        assert m.encoder_rel_pos.bidirectional
        assert m.encoder_rel_pos.relative_attention_bias.weight.grad.abs().sum() > 0


def test_relative_config_and_bad_input(tmp_path):
    path = tmp_path / "t5.yaml"
    path.write_text("position: relative\nrelative_buckets: 32\nrelative_max_distance: 128\n")
    cfg = tk.TransformerConfig.from_yaml(str(path))
    assert cfg.position == "relative"
    with pytest.raises(ConfigError, match="relative_buckets"):
        tk.TransformerConfig(position="relative", relative_buckets=7)
    with pytest.raises(ConfigError, match="relative_max_distance"):
        tk.TransformerConfig(position="relative", relative_buckets=32, relative_max_distance=8)
    with pytest.raises(ConfigError, match="attn_dropout"):
        tk.TransformerConfig(attn_dropout=1.0)
    m = _model().eval()
    with pytest.raises(ValueError, match="position_bias"):
        m.layers[0].attn(torch.randn(1, 4, 64))


def test_attention_dropout_training_only_and_reproducible():
    torch.manual_seed(0)
    attn = tk.Attention(64, 4, attn_dropout=0.3)
    plain = tk.Attention(64, 4)
    plain.load_state_dict(attn.state_dict())
    x = torch.randn(2, 33, 64)
    attn.eval(), plain.eval()
    torch.testing.assert_close(attn(x), plain(x), rtol=0, atol=0)
    attn.train()
    torch.manual_seed(5)
    a = attn(x)
    torch.manual_seed(5)
    b = attn(x)
    c = attn(x)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert not torch.allclose(a, plain(x))
    a.sum().backward()
    assert attn.qkv.weight.grad.isfinite().all()


def test_multihead_dropout_runs_the_kernel(monkeypatch):
    calls = []
    real = mh.attention
    monkeypatch.setattr(mh, "attention", lambda *a, **k: calls.append(k) or real(*a, **k))
    torch.manual_seed(0)
    ref = nn.MultiheadAttention(32, 4, dropout=0.2, batch_first=True)
    ours = tk.MultiheadAttention(32, 4, dropout=0.2, batch_first=True)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(3, 40, 32)
    out = ours(x, x, x, need_weights=False)[0]
    assert calls and calls[-1]["dropout_p"] == 0.2
    ours.eval(), ref.eval()
    torch.testing.assert_close(ours(x, x, x, need_weights=False)[0], ref(x, x, x, need_weights=False)[0])
    assert calls[-1]["dropout_p"] == 0.0
    # training: same distribution as torch's (different positions): the mean output over many
    # draws approaches the eval output, as inverted dropout's expectation does
    ours.train()
    mean = sum(ours(x, x, x, need_weights=False)[0] for _ in range(64)) / 64
    evald = ours.eval()(x, x, x, need_weights=False)[0]
    assert (mean - evald).abs().mean() < 0.25 * evald.abs().mean()
    out.sum().backward()
