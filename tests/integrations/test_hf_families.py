"""Issue #20: integrations.hf for Qwen3, Phi-3, OLMo 2, Mixtral, Qwen2-MoE and Qwen3-MoE, and the
entry points apply_to_class / AutoTruthgptForCausalLM / attn_implementation="truthgpt".
Tiny random models (no downloads), each compared with the unpatched model (sdpa attention,
transformers' eager experts: its default grouped_mm has no float64)."""
import copy
import warnings

import pytest
import torch
from packaging.version import Version

transformers = pytest.importorskip("transformers")

from truthgpt_kernels.integrations import hf  # noqa: E402
from .test_hf import COMMON, assert_same_grads  # noqa: E402

# transformers 4.x lays out MoE experts as one module per expert (no static cache for them) and its
# vision-language models differently; the layouts served and counted here are 5.x's (on 4.x
# apply_to leaves those kinds, with a warning)
TF5 = Version(transformers.__version__) >= Version("5")
MOE_FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe")
needs_tf5 = pytest.mark.skipif(not TF5, reason="the transformers 5.x layout (fused experts, VLM text towers)")


def _needs_tf5_layout(name):
    if name in MOE_FAMILIES and not TF5:
        pytest.skip("MoE experts are served in transformers 5.x's fused layout")

TOKENS = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)  # Phi-3's defaults exceed the vocab
MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)
# family: (config, model, config overrides, report counts for 2 layers)
MODELS = {
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM",
              {"head_dim": 16, "use_sliding_window": True, "sliding_window": 6,
               "layer_types": ["sliding_attention", "full_attention"]},
              {"attention": 2, "rms_norm": 9, "mlp": 2, "experts": 0}),  # 4 per layer (q/k norms) + final
    "phi3": ("Phi3Config", "Phi3ForCausalLM",
             {**TOKENS, "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0,
                                            "partial_rotary_factor": 0.5}},
             {"attention": 2, "rms_norm": 5, "mlp": 2, "experts": 0}),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", TOKENS,
              {"attention": 2, "rms_norm": 9, "mlp": 2, "experts": 0}),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM",
                {"num_local_experts": 4, "num_experts_per_tok": 2, "sliding_window": 6},
                {"attention": 2, "rms_norm": 5, "mlp": 0, "experts": 2}),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM", {**MOE, "shared_expert_intermediate_size": 64},
                  {"attention": 2, "rms_norm": 5, "mlp": 2, "experts": 2}),  # mlp: the shared experts
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", {**MOE, "head_dim": 16, "mlp_only_layers": [0]},
                  {"attention": 2, "rms_norm": 9, "mlp": 1, "experts": 1}),  # layer 0 dense
}
VOCAB = COMMON["vocab_size"]


def config(name, **overrides):
    cfg_cls, _, extra, _ = MODELS[name]
    overrides = {"attn_implementation": "sdpa", "experts_implementation": "eager", **extra, **overrides}
    return getattr(transformers, cfg_cls)(**COMMON, **overrides)


def make(name, dtype=torch.float64, **overrides):
    torch.manual_seed(0)
    return getattr(transformers, MODELS[name][1])(config(name, **overrides)).to(dtype).eval()


def batch(pad, seq=12, seed=0, side="left"):
    """ids, attention mask (row 0 padded by `pad` on `side`), labels (-100 on the padding)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (2, seq), generator=g)
    mask = torch.ones_like(ids)
    if pad:
        mask[0, :pad] = 0 if side == "left" else 1
        mask[0, pad:] = 1 if side == "left" else 0
    return ids, mask, ids.masked_fill(mask == 0, -100)


def _spy(monkeypatch, name):
    calls = []
    real = getattr(hf.ops, name)
    monkeypatch.setattr(hf.ops, name, lambda *a, **k: calls.append(name) or real(*a, **k))
    return calls


@pytest.mark.parametrize("pad,side", [(0, "left"), (4, "left"), (5, "right")],
                         ids=["unpadded", "left_padded", "right_padded"])
@pytest.mark.parametrize("name", list(MODELS))
def test_same_logits_loss_and_grads(name, pad, side, monkeypatch):
    _needs_tf5_layout(name)
    """float64: eval logits (the model's own head) and the fused training loss and its
    gradients equal the unpatched model's. HF's RMSNorm rounds through float32 even for float64
    models (ours stays in float64): 1e-6."""
    model = make(name)
    ref = copy.deepcopy(model)
    hf.apply_to(model)
    calls = {op: _spy(monkeypatch, op) for op in ("attention", "swiglu", "rms_norm", "apply_rotary_qk")}
    ids, mask, labels = batch(pad, side=side)
    got, exp = model(ids, attention_mask=mask), ref(ids, attention_mask=mask)
    valid = mask.bool()
    torch.testing.assert_close(got.logits[valid], exp.logits[valid], rtol=1e-6, atol=1e-6)
    report = MODELS[name][3]
    assert len(calls["attention"]) == len(calls["apply_rotary_qk"]) == report["attention"]
    # one call per dense MLP, one per expert hit in each MoE layer
    assert len(calls["swiglu"]) >= report["mlp"] + report["experts"]
    assert len(calls["rms_norm"]) == report["rms_norm"]  # each norm once (q/k norms included)
    model.train()
    ref.train()
    got, exp = model(ids, attention_mask=mask, labels=labels), ref(ids, attention_mask=mask, labels=labels)
    assert got.logits is None  # fused loss
    torch.testing.assert_close(got.loss.float(), exp.loss, rtol=1e-6, atol=1e-6)
    got.loss.backward()
    exp.loss.backward()
    assert_same_grads(model, ref)


def _linears(module):
    """The plain nn.Linear modules apply_to swaps to tk.linear: projections, router, lm_head."""
    return sum(type(m) is torch.nn.Linear for m in module.modules())


def _embeddings(module):
    """The plain nn.Embedding modules apply_to runs through tk.embedding (not Gemma's scaled one)."""
    return sum(hf._plain_embedding(m) for m in module.modules())


@pytest.mark.parametrize("name", list(MODELS))
def test_report_lists_what_was_swapped(name):
    _needs_tf5_layout(name)
    model = hf.apply_to(make(name))
    assert _linears(model) >= 8
    assert model.truthgpt_patched == {**MODELS[name][3], "linear": _linears(model), "embedding": _embeddings(model), "loss": 1, "left": {}}
    assert model.config._attn_implementation == hf.NAME


@pytest.mark.parametrize("name", list(MODELS))
def test_greedy_generation_dynamic_and_static_cache(name):
    _needs_tf5_layout(name)
    """float32, left padding: 5 greedy tokens equal the unpatched model's with either cache."""
    model = make(name, torch.float32)
    ref = copy.deepcopy(model)
    hf.apply_to(model)
    ids, mask, _ = batch(3, seq=8, seed=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # static cache prefill: the replaced function runs, once
        for cache in (None, "static"):
            kw = dict(attention_mask=mask, max_new_tokens=5, do_sample=False, cache_implementation=cache,
                      pad_token_id=0)
            assert torch.equal(model.generate(ids, **kw), ref.generate(ids, **kw)), cache


@pytest.mark.parametrize("name", ["qwen3", "olmo2", "phi3", "qwen2_moe"])
def test_same_logits_as_eager(name):
    _needs_tf5_layout(name)
    """The eager attention as the reference (and as the implementation replaced); float32 (HF's
    eager softmax), right padding: no query row without keys (see test_hf for those)."""
    model = make(name, torch.float32, attn_implementation="eager")
    ref = copy.deepcopy(model)
    hf.apply_to(model)
    ids, mask, _ = batch(5, side="right")
    valid = mask.bool()
    got, exp = model(ids, attention_mask=mask).logits, ref(ids, attention_mask=mask).logits
    torch.testing.assert_close(got[valid], exp[valid], rtol=1e-5, atol=1e-5)


def test_packed_batches_same_loss_and_grads():
    """Padding-free packed batches (DataCollatorWithFlattening: one row, position ids restarting
    per sequence): transformers builds a block-diagonal mask, which the truthgpt attention does not
    serve yet (no varlen path): the replaced sdpa runs, so loss and gradients stay exact."""
    model = make("qwen3").train()
    ref = copy.deepcopy(model)
    hf.apply_to(model)
    seqs = [{"input_ids": row[:n].tolist()} for row, n in zip(_random_tokens(3), (5, 9, 7))]
    packed = transformers.DataCollatorWithFlattening(return_tensors="pt")(seqs)
    assert packed["input_ids"].shape == (1, 21)
    got, exp = model(**packed, use_cache=False), ref(**packed, use_cache=False)
    torch.testing.assert_close(got.loss.float(), exp.loss, rtol=1e-6, atol=1e-6)
    got.loss.backward()
    exp.loss.backward()
    assert_same_grads(model, ref)


def test_float32_moe_against_grouped_mm():
    """transformers' default experts implementation (grouped_mm, float32) as the reference."""
    model = make("qwen3_moe", torch.float32, experts_implementation="grouped_mm")
    ref = copy.deepcopy(model)
    hf.apply_to(model)
    ids, mask, _ = batch(4)
    valid = mask.bool()
    got, exp = model(ids, attention_mask=mask).logits, ref(ids, attention_mask=mask).logits
    torch.testing.assert_close(got[valid], exp[valid], rtol=1e-4, atol=1e-5)


# --- vision-language models: the text tower ----------------------------------------------------

VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
              image_size=16, patch_size=8)  # 2 x 2 patches
VLMS = {  # name: (model, config, text config, vision config, extra config)
    "llava": ("LlavaForConditionalGeneration", "LlavaConfig", "LlamaConfig", "CLIPVisionConfig",
              {"image_token_id": 95}),
    "gemma3": ("Gemma3ForConditionalGeneration", "Gemma3Config", "Gemma3TextConfig", "SiglipVisionConfig",
               {"image_token_index": 95, "mm_tokens_per_image": 4}),
    "mistral3": ("Mistral3ForConditionalGeneration", "Mistral3Config", "MistralConfig", "PixtralVisionConfig",
                 {"image_token_index": 95}),
}
TEXT = {"Gemma3TextConfig": {"head_dim": 16, "sliding_window": 6,
                             "layer_types": ["sliding_attention", "full_attention"]}}


def make_vlm(name):
    model_cls, cfg_cls, text_cls, vision_cls, extra = VLMS[name]
    text = getattr(transformers, text_cls)(**COMMON, **TEXT.get(text_cls, {}))
    vision = getattr(transformers, vision_cls)(**VISION, **({"head_dim": 16} if name == "mistral3" else {}))
    torch.manual_seed(0)
    cfg = getattr(transformers, cfg_cls)(text_config=text, vision_config=vision, **extra)
    return getattr(transformers, model_cls)(cfg).double().eval()


@needs_tf5
@pytest.mark.parametrize("name", list(VLMS))
def test_vision_language_text_tower(name):
    """Llava (Llama text), Gemma 3 and Mistral 3: the language model is patched, the vision
    tower and projector are not; logits equal with left padding; revert restores it."""
    model = make_vlm(name)
    ref = copy.deepcopy(model)
    hf.apply_to(model)
    lm = model.model.language_model
    assert model.truthgpt_patched == {"attention": 2, "rms_norm": 13 if name == "gemma3" else 5, "mlp": 2,
                                      "experts": 0, "linear": _linears(lm), "embedding": _embeddings(lm), "loss": 0, "left": {}}  # Gemma 3: q/k norms
    assert model.config.text_config._attn_implementation == hf.NAME
    assert model.config.vision_config._attn_implementation == "sdpa"
    assert all("forward" not in m.__dict__ for m in model.model.vision_tower.modules())
    assert any("forward" in m.__dict__ for m in lm.modules())
    ids, mask, _ = batch(4)
    valid = mask.bool()
    got, exp = model(input_ids=ids, attention_mask=mask).logits, ref(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(got[valid], exp[valid], rtol=1e-6, atol=1e-6)
    hf.revert(model)
    assert model.config.text_config._attn_implementation == "sdpa"
    assert all("forward" not in m.__dict__ for m in model.modules())


def test_llava_with_an_image():
    model = make_vlm("llava")
    ref = copy.deepcopy(model)
    hf.apply_to(model)
    ids, mask, _ = batch(0)
    ids[:, 2:6] = 95  # 4 image tokens: CLIP's 2 x 2 patches (its class token dropped)
    pixels = torch.randn(2, 3, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    got = model(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits
    exp = ref(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits
    torch.testing.assert_close(got, exp, rtol=1e-6, atol=1e-6)


# --- what cannot be served is left whole, with a warning -------------------------------------

def test_unserved_activation_leaves_the_mlp_kind_with_warning():
    model = make("qwen3", hidden_act="relu")
    with pytest.warns(UserWarning, match=r"left these module kinds unpatched: mlp \(Qwen3MLP: activation 'relu'"):
        hf.apply_to(model)
    assert model.truthgpt_patched["mlp"] == 0 and "mlp" in model.truthgpt_patched["left"]
    assert all("forward" not in layer.mlp.__dict__ for layer in model.model.layers)
    assert model.truthgpt_patched["attention"] == 2  # the other kinds are served


@needs_tf5
def test_experts_without_the_expected_layout_are_left_whole():
    model = make("mixtral")
    ref = copy.deepcopy(model)
    model.model.layers[0].mlp.experts.is_transposed = True  # one layer: no layer's experts patched
    with pytest.warns(UserWarning, match=r"experts \(MixtralExperts: is_transposed=True"):
        hf.apply_to(model)
    assert model.truthgpt_patched["experts"] == 0
    assert all("forward" not in layer.mlp.experts.__dict__ for layer in model.model.layers)
    model.model.layers[0].mlp.experts.is_transposed = False
    ids, mask, _ = batch(0)
    torch.testing.assert_close(model(ids).logits, ref(ids).logits, rtol=1e-6, atol=1e-6)


def test_attention_without_the_expected_attributes_keeps_the_implementation():
    model = make("phi3")
    attn = model.model.layers[1].self_attn
    attn.qkv_proj = torch.nn.Linear(64, 60, bias=False, dtype=torch.float64)  # not q + k + v
    with pytest.warns(UserWarning, match=r"attention \(Phi3Attention: qkv_proj gives 60 features"):
        hf.apply_to(model)
    assert model.truthgpt_patched["attention"] == 0
    assert model.config._attn_implementation == "sdpa"
    assert all("forward" not in layer.self_attn.__dict__ for layer in model.model.layers)


def test_moe_router_aux_loss_runs_the_model_forward():
    """output_router_logits adds the router's aux loss: the fused loss does not compute it, so
    the model's own forward runs."""
    model = make("mixtral", output_router_logits=True).train()
    ref = copy.deepcopy(model)
    hf.apply_to(model)
    ids, mask, labels = batch(0)
    got, exp = model(ids, labels=labels), ref(ids, labels=labels)
    assert got.aux_loss is not None
    torch.testing.assert_close(got.loss, exp.loss, rtol=1e-6, atol=1e-6)


# --- entry points ----------------------------------------------------------------------------

def test_apply_to_class_patches_models_built_afterwards():
    before = make("qwen3")
    inits = {cls: cls.__dict__.get("__init__") for cls in (transformers.Qwen3ForCausalLM, transformers.Qwen3Model)}
    try:
        names = hf.apply_to_class("qwen3")
        assert "Qwen3ForCausalLM" in names and "Qwen3Model" in names
        model = make("qwen3")
        assert model.truthgpt_patched["attention"] == 2 and model.truthgpt_patched["loss"] == 1
        inner = transformers.Qwen3Model(config("qwen3"))  # a bare decoder: patched, no loss
        assert inner.truthgpt_patched["attention"] == 2 and inner.truthgpt_patched["loss"] == 0
        assert not hasattr(before, "truthgpt_patched")
        assert not hasattr(make("olmo2"), "truthgpt_patched")  # other families untouched
    finally:
        hf.revert_class("qwen3")
    assert not hasattr(make("qwen3"), "truthgpt_patched")
    assert {cls: cls.__dict__.get("__init__") for cls in inits} == inits
    with pytest.raises(ValueError, match="family must be one of"):
        hf.apply_to_class("gpt2")


def test_apply_to_class_gemma3_text():
    """The family name is the model_type; Gemma 3's text classes live in models/gemma3."""
    cfg = transformers.Gemma3TextConfig(**COMMON, head_dim=16, sliding_window=6,
                                        layer_types=["sliding_attention", "full_attention"])
    try:
        names = hf.apply_to_class("gemma3_text")
        model = transformers.Gemma3ForCausalLM(cfg)
    finally:
        hf.revert_class("gemma3_text")
    assert "Gemma3ForCausalLM" in names and "Gemma3ForConditionalGeneration" not in names
    assert model.truthgpt_patched["mlp"] == 2 and model.truthgpt_patched["attention"] == 2
    assert not hasattr(transformers.Gemma3ForCausalLM(cfg), "truthgpt_patched")


def test_auto_model_from_config_and_from_pretrained(tmp_path):
    cfg = config("phi3")
    model = hf.AutoTruthgptForCausalLM.from_config(cfg, fused_loss=False)
    assert model.truthgpt_patched["attention"] == 2 and model.truthgpt_patched["loss"] == 0
    ref = make("phi3", torch.float32)
    ref.save_pretrained(tmp_path)
    loaded = hf.AutoTruthgptForCausalLM.from_pretrained(tmp_path)
    assert loaded.truthgpt_patched == {**MODELS["phi3"][3], "linear": _linears(loaded), "embedding": _embeddings(loaded), "loss": 1, "left": {}}
    assert loaded.config._attn_implementation == hf.NAME
    ids, mask, _ = batch(4)
    valid = mask.bool()
    torch.testing.assert_close(loaded.eval()(ids, attention_mask=mask).logits[valid],
                               ref(ids, attention_mask=mask).logits[valid], rtol=1e-5, atol=1e-5)


@needs_tf5
def test_apply_to_class_and_from_pretrained(tmp_path):
    make("qwen3_moe", torch.float32).save_pretrained(tmp_path)
    try:
        hf.apply_to_class("qwen3_moe")
        model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, experts_implementation="eager")
    finally:
        hf.revert_class("qwen3_moe")
    assert model.truthgpt_patched == {**MODELS["qwen3_moe"][3], "linear": _linears(model), "embedding": _embeddings(model), "loss": 1, "left": {}}
    assert model.config._attn_implementation == hf.NAME


def test_attn_implementation_truthgpt_after_import(monkeypatch):
    calls = _spy(monkeypatch, "attention")
    cfg = config("qwen3")
    cfg._attn_implementation = None
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="truthgpt").double().eval()
    ref = make("qwen3")
    ref.load_state_dict(model.state_dict())
    ids, mask, _ = batch(4)
    valid = mask.bool()
    got, exp = model(ids, attention_mask=mask).logits, ref(ids, attention_mask=mask).logits
    assert len(calls) == 2 and not hasattr(model, "truthgpt_patched")  # attention only
    torch.testing.assert_close(got[valid], exp[valid], rtol=1e-6, atol=1e-6)


# --- training ----------------------------------------------------------------------------------

def _random_tokens(n, seq=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (n, seq), generator=g)


@pytest.mark.parametrize("name,bf16", [("qwen3", False), ("mixtral", True)])
def test_trainer_runs_with_gradient_checkpointing_and_loss_falls(name, bf16, tmp_path, monkeypatch):
    """transformers.Trainer on the CPU, gradient checkpointing on, the fused loss (bf16: under
    the Trainer's bf16 autocast): 5 steps over the same 4 random sequences; the loss is finite
    and falls (it memorises them)."""
    pytest.importorskip("accelerate")  # transformers' Trainer needs it (not a dependency of ours)
    from transformers import Trainer, TrainingArguments
    import inspect
    model = hf.apply_to(make(name, torch.float32))
    fused = _spy(monkeypatch, "linear_cross_entropy")
    data = [{"input_ids": row, "labels": row} for row in _random_tokens(4)]
    checkpointing = "activation_checkpointing"  # its name since transformers 5.x
    if checkpointing not in inspect.signature(TrainingArguments).parameters:
        checkpointing = "gradient_checkpointing"
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], max_steps=5,
                             per_device_train_batch_size=4, learning_rate=1e-2, logging_steps=1,
                             save_strategy="no", seed=0, dataloader_num_workers=0, bf16=bf16,
                             **{checkpointing: True})
    trainer = Trainer(model=model, args=args, train_dataset=data)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 5 and all(map(torch.isfinite, torch.tensor(losses)))
    assert losses[-1] < 0.8 * losses[0], losses
    assert len(fused) == 5  # the loss of every step through tk.linear_cross_entropy
    assert model.truthgpt_patched["loss"] == 1
    assert getattr(model, "is_activation_checkpointing", None) or model.is_gradient_checkpointing


def _losses(model, steps, ids):
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    out = []
    for step in range(steps):
        batch_ids = ids[step % 4 * 2:(step % 4 + 1) * 2]
        loss = model(batch_ids, labels=batch_ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        out.append(loss.item())
    return torch.tensor(out)


@pytest.mark.parametrize("name", ["qwen3", "mixtral"])
def test_convergence_32_steps_same_loss_curve(name):
    """As Liger's convergence tests: 32 AdamW steps (float32) patched and unpatched from the same
    weights give the same loss curve. float32 rounding differences grow with the steps (measured:
    at most 1e-6 relative over the 32 steps); 2e-5 leaves room, and a routing decision that moved
    in the MoE model would show."""
    model = make(name, torch.float32).train()
    ref = copy.deepcopy(model)
    hf.apply_to(model)
    ids = _random_tokens(8)
    got, exp = _losses(model, 32, ids), _losses(ref, 32, ids)
    assert exp[-1] < 0.7 * exp[0]  # it trains
    torch.testing.assert_close(got, exp, rtol=2e-5, atol=1e-5)


@needs_tf5
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_experts_forward_against_eager_experts(dtype):
    """The experts forward alone (sorted pairs, grouped GEMMs for float32 / bf16, per-expert
    GEMMs for float64; one tk.swiglu) against transformers' eager loop in float64: output and
    the gradients of the input, both weights and the routing weights. Tokens routed to the
    dropped-expert sentinel (index E) contribute nothing; an expert no token chose gets a zero
    gradient."""
    experts = make("mixtral", torch.float64).model.layers[0].mlp.experts  # E = 4, H 64, I 32
    ref = copy.deepcopy(experts)
    g = torch.Generator().manual_seed(3)
    T, K, E = 37, 2, experts.gate_up_proj.shape[0]
    x = torch.randn(T, 64, generator=g, dtype=torch.float64)
    idx = torch.stack([torch.randperm(E - 1, generator=g)[:K] for _ in range(T)])  # expert E-1 unused
    idx[5, 1] = E  # a dropped pair
    w = torch.rand(T, K, generator=g, dtype=torch.float64)
    mine = copy.deepcopy(experts).to(dtype)
    xs = [x.clone().requires_grad_(), x.to(dtype).requires_grad_()]
    ws = [w.clone().requires_grad_(), w.to(dtype).requires_grad_()]
    exp = ref(xs[0], idx, ws[0])
    got = hf._experts_forward(mine, xs[1], idx, ws[1])
    assert got.dtype == dtype
    up = torch.randn(exp.shape, generator=g, dtype=torch.float64)
    exp.backward(up)
    got.backward(up.to(dtype))
    tol = {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 3e-2}[dtype]
    for a, b in ((got, exp), (xs[1].grad, xs[0].grad), (ws[1].grad, ws[0].grad),
                 (mine.gate_up_proj.grad, ref.gate_up_proj.grad), (mine.down_proj.grad, ref.down_proj.grad)):
        scale = b.abs().max().clamp_min(1)
        assert (a.double() - b).abs().max() <= tol * scale
    assert torch.all(mine.gate_up_proj.grad[E - 1] == 0) and torch.all(mine.down_proj.grad[E - 1] == 0)
    assert torch.all(ws[1].grad[5, 1] == 0)
