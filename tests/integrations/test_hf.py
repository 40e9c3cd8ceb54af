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


def make(name, impl=None, **overrides):
    cfg_cls, model_cls, extra = MODELS[name]
    impl = impl or ("eager" if name == "gemma2" else "sdpa")
    cfg = getattr(transformers, cfg_cls)(**COMMON, **{**extra, **overrides}, attn_implementation=impl)
    torch.manual_seed(0)
    return getattr(transformers, model_cls)(cfg).double().eval()


def set_impl(model, impl):
    if hasattr(model, "set_attn_implementation"):  # transformers >= 4.54
        model.set_attn_implementation(impl)
    else:
        model.config._attn_implementation = impl


def left_padded(seq=16, pads=(5, 0)):
    ids = torch.randint(0, 96, (len(pads), seq))
    mask = torch.ones(len(pads), seq, dtype=torch.long)
    for row, pad in enumerate(pads):
        mask[row, :pad] = 0
    return ids, mask


def assert_same_grads(model, ref, rtol=1e-5, atol=1e-6):
    for (n, a), b in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=rtol, atol=atol, msg=lambda m: f"{n}: {m}")


@pytest.mark.parametrize("name", list(MODELS))
def test_apply_to_same_logits_and_grads(name):
    model = make(name)
    ref = copy.deepcopy(model)
    ids, mask = left_padded(pads=(4, 0))
    if name == "gemma2":  # float64 eager gives NaN on fully masked rows: see test_left_padded_loss_...
        mask[:] = 1
    hf.apply_to(model)
    patched = model.truthgpt_patched
    assert patched["attention"] == 2 and patched["rms_norm"] >= 5
    assert patched["mlp"] == 2  # SiLU-gated: tk.swiglu; Gemma's GELU-gated: tk.geglu
    out = model(ids, attention_mask=mask, labels=ids)
    exp = ref(ids, attention_mask=mask, labels=ids)
    valid = mask.bool()
    # HF's RMSNorm rounds through float32 even for float64 models; ours stays in float64
    torch.testing.assert_close(out.logits[valid], exp.logits[valid], rtol=1e-6, atol=1e-6)
    out.loss.backward()
    exp.loss.backward()
    assert_same_grads(model, ref)


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


@pytest.mark.parametrize("inputs", ["plain", "left_padded", "packed"])
def test_attention_dropout_in_training_runs_in_the_kernels(inputs, monkeypatch):
    """attention_dropout in training: tk.attention / tk.attention_varlen drop in the kernel (no
    fallback to the replaced function), keyed from torch's CPU generator (reproducible under
    torch.manual_seed); the same seeds through the float64 reference backend give the same loss
    and gradients (the kernels' dropout is tk.attention's); eval runs without dropout."""
    model = hf.apply_to(make("llama", attention_dropout=0.25))
    ids = torch.randint(0, 96, (2, 12))
    kw = {"use_cache": False}
    if inputs == "left_padded":
        ids, kw["attention_mask"] = left_padded(seq=12, pads=(3, 0))
    elif inputs == "packed":  # two documents in row 0 (positions restart), one in row 1
        kw["position_ids"] = torch.tensor([list(range(5)) + list(range(7)), list(range(12))])
    calls, backend = [], {}
    for name in ("attention", "attention_varlen"):
        real = getattr(hf.ops, name)
        monkeypatch.setattr(hf.ops, name, lambda *a, _real=real, _name=name, **k: calls.append(
            (_name, k.get("dropout_p"))) or _real(*a, **k, **backend))
    if inputs == "plain":
        monkeypatch.setattr(hf, "_run", lambda *a, **k: pytest.fail("fell back to the replaced function"))

    def step(seed):
        model.zero_grad()
        torch.manual_seed(seed)
        loss = model(ids, labels=ids, **kw).loss
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]
    model.train()
    loss, grads = step(3)
    kind = "attention_varlen" if inputs == "packed" else "attention"
    assert calls == [(kind, 0.25)] * 2
    again, grads_again = step(3)
    assert torch.equal(loss, again) and all(torch.equal(a, b) for a, b in zip(grads, grads_again))
    assert not torch.equal(loss, step(4)[0])
    backend["backend"] = "reference"
    ref, ref_grads = step(3)
    torch.testing.assert_close(loss, ref, rtol=1e-10, atol=1e-12)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)
    backend.clear()
    calls.clear()
    model.eval()
    model(ids, **kw)
    assert calls == [(kind, 0.0)] * 2


def test_unsupported_model_is_left_with_warning():
    cfg = transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50)
    model = transformers.GPT2LMHeadModel(cfg)
    before = copy.deepcopy(model.state_dict())
    with pytest.warns(UserWarning, match="supports llama, mistral, qwen2, gemma2"):
        hf.apply_to(model)
    assert not hasattr(model, "truthgpt_patched")
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


# --- left padding: query rows that see no key (issue #19 item 5) ----------------------------

@pytest.mark.parametrize("name,impl", [("gemma2", "eager"), ("llama", "eager"), ("llama", "sdpa")])
def test_left_padded_loss_matches_replaced_implementation(name, impl):
    """Padded query rows see no key; the loss covers them (labels everywhere, as Liger's
    convergence test does), so they must get what the replaced implementation gives them:
    eager's uniform softmax (the mean of V), sdpa's zeros. float32: HF's eager functions take
    the softmax in float32, where a float64 model's mask minimum becomes -inf and gives NaN.
    (Gemma 2 has no sdpa in transformers 5.)"""
    model = make(name, impl).float()
    ref = copy.deepcopy(model)
    ids, mask = left_padded(pads=(5, 0, 2, 9))
    hf.apply_to(model)
    out = model(ids, attention_mask=mask, labels=ids)
    exp = ref(ids, attention_mask=mask, labels=ids)
    torch.testing.assert_close(out.logits, exp.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.loss, exp.loss, rtol=1e-6, atol=1e-6)
    out.loss.backward()
    exp.loss.backward()
    assert_same_grads(model, ref, rtol=1e-4, atol=1e-5)


# --- attention implementation switching, attention weights, revert (item 4) ------------------

def _spy(monkeypatch, owner, attr, calls, tag, setitem=False):
    real = owner[attr] if setitem else getattr(owner, attr)

    def spy(*a, **k):
        calls.append(tag)
        return real(*a, **k)
    (monkeypatch.setitem if setitem else monkeypatch.setattr)(owner, attr, spy)


@pytest.mark.parametrize("name", ["llama", "gemma2"])
def test_set_attn_implementation_runs_exactly_that_function(name, monkeypatch):
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    modeling = __import__(f"transformers.models.{name}.modeling_{name}", fromlist=["x"])
    calls = []
    _spy(monkeypatch, modeling, "eager_attention_forward", calls, "eager")
    _spy(monkeypatch, ALL_ATTENTION_FUNCTIONS._global_mapping, "sdpa", calls, "sdpa", setitem=True)
    _spy(monkeypatch, hf.ops, "attention", calls, "truthgpt")
    model = hf.apply_to(make(name, "eager"))
    ref = make(name, "eager")
    ids, mask = left_padded()
    ids, mask = ids[1:], mask[1:]  # float64 eager gives NaN on fully masked rows
    impls = ("eager", "truthgpt", "eager") if name == "gemma2" else ("eager", "sdpa", "truthgpt", "eager")
    for impl in impls:  # Gemma 2 has no sdpa in transformers 5
        set_impl(model, impl)
        if impl != "truthgpt":
            set_impl(ref, impl)
        calls.clear()
        got = model(ids, attention_mask=mask).logits
        assert calls == [impl] * 2, impl  # one call per layer, of that function only
        exp = ref(ids, attention_mask=mask).logits
        torch.testing.assert_close(got, exp, rtol=1e-6, atol=1e-6, msg=lambda m: f"{impl}: {m}")


@pytest.mark.parametrize("name", ["llama", "gemma2"])
def test_output_attentions_returns_eager_weights(name):
    model = make(name, "sdpa" if name == "llama" else "eager").float()  # float64 eager: NaN rows
    ref = copy.deepcopy(model)
    set_impl(ref, "eager")
    hf.apply_to(model)
    ids, mask = left_padded()
    got = model(ids, attention_mask=mask, output_attentions=True)
    exp = ref(ids, attention_mask=mask, output_attentions=True)
    assert got.attentions is not None and len(got.attentions) == 2
    for a, b in zip(got.attentions, exp.attentions):
        assert a is not None and a.shape == (2, 4, 16, 16)
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.logits, exp.logits, rtol=1e-5, atol=1e-5)
    assert model.config._attn_implementation == hf.NAME  # only that call ran eager


def test_revert_restores_original_forwards_and_registry(monkeypatch):
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    model = make("llama")
    untouched = copy.deepcopy(model)
    before = {name: dict(m.__dict__) for name, m in model.named_modules()}
    hf.apply_to(model)
    assert hf.NAME in ALL_ATTENTION_FUNCTIONS
    assert hf.revert(model) is model
    assert model.config._attn_implementation == "sdpa"
    assert not hasattr(model, "truthgpt_patched")
    for name, m in model.named_modules():
        assert m.__dict__.keys() == before[name].keys(), name  # no bound forward or marker left
    assert hf.NAME in ALL_ATTENTION_FUNCTIONS  # registered on import: attn_implementation="truthgpt"
    calls = []
    _spy(monkeypatch, hf.ops, "attention", calls, "truthgpt")
    _spy(monkeypatch, hf.ops, "rms_norm", calls, "rms_norm")
    ids, mask = left_padded()
    assert torch.equal(model(ids, attention_mask=mask).logits, untouched(ids, attention_mask=mask).logits)
    assert calls == []
    hf.apply_to(model)  # patches again after a revert
    assert model.truthgpt_patched["attention"] == 2 and model.config._attn_implementation == hf.NAME


# --- cache keywords and refusal (item 7) -----------------------------------------------------

@pytest.mark.parametrize("spelling", ["cache", "past_key_values", "past_key_value"])
def test_attention_forward_updates_cache_under_each_keyword(spelling):
    """transformers 4.53-4.55 pass the cache as past_key_value=, 4.56-4.57 as past_key_values=,
    5.x as cache=; the patched forward must update it under each."""
    model = hf.apply_to(make("llama"))
    attn = model.model.layers[0].self_attn
    hidden = torch.randn(1, 5, 64, dtype=torch.float64)
    pos = torch.arange(5)[None]
    cos_sin = model.model.rotary_emb(hidden, pos)
    cache = transformers.DynamicCache()
    out, _ = attn(hidden, position_embeddings=cos_sin, attention_mask=None,
                  cache_position=torch.arange(5), **{spelling: cache})
    assert cache.get_seq_length(0) == 5


def test_attention_forward_refuses_a_cache_under_an_unknown_keyword():
    model = hf.apply_to(make("llama"))
    attn = model.model.layers[0].self_attn
    hidden = torch.randn(1, 5, 64, dtype=torch.float64)
    cos_sin = model.model.rotary_emb(hidden, torch.arange(5)[None])
    with pytest.raises(TypeError, match="kv_cache="):
        attn(hidden, position_embeddings=cos_sin, attention_mask=None, kv_cache=transformers.DynamicCache())


def test_apply_to_refuses_an_attention_forward_it_does_not_know(monkeypatch):
    from transformers.models.llama import modeling_llama

    def forward(self, hidden_states, position_embeddings, attention_mask, kv_cache=None, **kwargs):
        raise AssertionError("not called")
    monkeypatch.setattr(modeling_llama.LlamaAttention, "forward", forward)
    model = make("llama")
    with pytest.raises(RuntimeError, match="cannot patch LlamaAttention.forward"):
        hf.apply_to(model)
    assert not hasattr(model, "truthgpt_patched")
    assert all("forward" not in m.__dict__ for m in model.modules())
    assert model.config._attn_implementation == "sdpa"


@pytest.mark.parametrize("name", ["llama", "gemma2"])
def test_cached_greedy_generation_equals_unpatched(name):
    """Decoding with the KV cache: the first step's logits and 24 greedy tokens."""
    model = make(name).float()
    ref = copy.deepcopy(model)
    hf.apply_to(model)
    ids, mask = left_padded(seq=10, pads=(3, 0))
    kw = dict(attention_mask=mask, max_new_tokens=24, do_sample=False, output_logits=True,
              return_dict_in_generate=True)
    got, exp = model.generate(ids, **kw), ref.generate(ids, **kw)
    torch.testing.assert_close(got.logits[1], exp.logits[1], rtol=1e-4, atol=1e-4)  # first cached step
    assert torch.equal(got.sequences, exp.sequences)


# --- supported transformers versions (issue #19 item 6) --------------------------------------

@pytest.mark.parametrize("version", ["4.53.2", "4.52.4", "4.9.0", "3.99", "5.25.0", "6.0.0"])
def test_apply_to_refuses_unsupported_transformers(version, monkeypatch):
    model = make("llama")
    monkeypatch.setattr("transformers.__version__", version)  # the module in sys.modules now
    with pytest.raises(RuntimeError, match=f"supports transformers .*found {version}"):
        hf.apply_to(model)
    assert not hasattr(model, "truthgpt_patched") and model.config._attn_implementation == "sdpa"


@pytest.mark.parametrize("version", ["4.53.3", "4.57.6", "5.3.0", "5.24.0", "5.24.1.dev0"])
def test_version_check_compares_versions_not_strings(version):
    assert str(hf.check_transformers_version(version)) == version


def test_output_attentions_from_the_config():
    """A config built with output_attentions=True (transformers' test_attention_outputs): the
    patched model returns the weights (transformers 5 passes output_attentions=None to the
    attention function then; the weights came back as an empty tuple)."""
    model = make("llama", "eager", output_attentions=True).float()
    ref = copy.deepcopy(model)
    hf.apply_to(model)
    ids, mask = left_padded()
    got, exp = model(ids, attention_mask=mask), ref(ids, attention_mask=mask)
    assert got.attentions is not None and len(got.attentions) == 2
    for a, b in zip(got.attentions, exp.attentions):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
