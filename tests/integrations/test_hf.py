"""integrations.hf.apply_to on tiny randomly initialised Hugging Face models (no downloads)."""
import copy
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")

from truthgpt_kernels.integrations import hf  # noqa: E402

COMMON = dict(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
MODELS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": 6}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", {"head_dim": 16, "sliding_window": 6,
                                                     "attn_logit_softcapping": 20.0}),
}


def make(name):
    cfg_cls, model_cls, extra = MODELS[name]
    impl = "eager" if name == "gemma2" else "sdpa"
    cfg = getattr(transformers, cfg_cls)(**COMMON, **extra, attn_implementation=impl)
    torch.manual_seed(0)
    return getattr(transformers, model_cls)(cfg).double().eval()


@pytest.mark.parametrize("name", list(MODELS))
def test_apply_to_same_logits_and_grads(name):
    model = make(name)
    ref = copy.deepcopy(model)
    ids = torch.randint(0, 96, (2, 16))
    mask = torch.ones(2, 16, dtype=torch.long)
    if name != "gemma2":  # HF's eager Gemma 2 gives NaN on left-padded rows itself
        mask[0, :4] = 0   # left padding
    hf.apply_to(model)
    patched = model.truthgpt_patched
    assert patched["attention"] == 2 and patched["rms_norm"] >= 5
    assert patched["mlp"] == (0 if name == "gemma2" else 2)  # Gemma's MLP is GELU-gated
    out = model(ids, attention_mask=mask, labels=ids)
    exp = ref(ids, attention_mask=mask, labels=ids)
    valid = mask.bool()
    # HF's RMSNorm rounds through float32 even for float64 models; ours stays in float64
    torch.testing.assert_close(out.logits[valid], exp.logits[valid], rtol=1e-6, atol=1e-6)
    out.loss.backward()
    exp.loss.backward()
    for (n, a), b in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-6, msg=lambda m: f"{n}: {m}")


@pytest.mark.parametrize("name", ["llama", "mistral", "qwen2"])
def test_apply_to_generate_same_tokens(name):
    model = make(name).float()
    ref = copy.deepcopy(model)
    ids = torch.randint(0, 96, (2, 10))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    expected = ref.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False)
    got = hf.apply_to(model).generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False)
    assert torch.equal(got, expected)


def test_apply_to_uses_truthgpt_attention(monkeypatch):
    calls = []
    real = hf.ops.attention
    monkeypatch.setattr(hf.ops, "attention", lambda *a, **k: calls.append(k) or real(*a, **k))
    model = hf.apply_to(make("mistral"))
    model(torch.randint(0, 96, (1, 9)))
    assert len(calls) == 2 and calls[0]["window"] == (5, -1) and calls[0]["causal"]


def test_unsupported_model_is_left_with_warning():
    cfg = transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50)
    model = transformers.GPT2LMHeadModel(cfg)
    before = copy.deepcopy(model.state_dict())
    with pytest.warns(UserWarning, match="supports llama, mistral, qwen2, gemma2"):
        hf.apply_to(model)
    assert not hasattr(model, "truthgpt_patched")
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
