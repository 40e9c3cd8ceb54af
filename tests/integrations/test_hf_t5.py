"""integrations.hf.apply_to on tiny randomly initialised T5 / mT5 models (no downloads): the
relative position bias through tk.attention's rel_bias, T5LayerNorm through tk.rms_norm, the
gated-GELU feed-forward through tk.geglu."""
import copy
import types

import pytest
import torch

transformers = pytest.importorskip("transformers")

from truthgpt_kernels.integrations import hf  # noqa: E402

if not hf.SUPPORTED_TRANSFORMERS.contains(transformers.__version__, prereleases=True) or \
        transformers.__version__.startswith("4."):
    pytest.skip("T5 is served for transformers 5.x", allow_module_level=True)

from transformers.models.t5 import modeling_t5  # noqa: E402

VOCAB = 64
# 3 encoder layers, 2 decoder layers; few buckets and a short max_distance so that the log buckets
# and the last bucket are reached by sequences of ~20 tokens
CONFIG = dict(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=3, num_decoder_layers=2,
              num_heads=4, relative_attention_num_buckets=8, relative_attention_max_distance=12,
              decoder_start_token_id=0, pad_token_id=0, eos_token_id=1, dropout_rate=0.0)


def make(ff="relu", impl="sdpa", cls="T5ForConditionalGeneration", config="T5Config", **overrides):
    cfg = getattr(transformers, config)(**{**CONFIG, **overrides}, feed_forward_proj=ff,
                                        attn_implementation=impl)
    torch.manual_seed(0)
    return getattr(transformers, cls)(cfg).double().eval()


def inputs(B=2, S=20, pads=(0, 7), T=9):
    """Encoder ids right-padded by `pads`, and labels (the decoder inputs are their shift)."""
    torch.manual_seed(1)
    ids = torch.randint(2, VOCAB, (B, S))
    mask = torch.ones(B, S, dtype=torch.long)
    for row, pad in enumerate(pads):
        if pad:
            mask[row, -pad:] = 0
            ids[row, -pad:] = 0
    labels = torch.randint(2, VOCAB, (B, T))
    return ids, mask, labels


def assert_same_grads(model, ref, rtol=1e-5, atol=1e-6):
    names = []
    for (n, a), b in zip(model.named_parameters(), ref.parameters()):
        assert (a.grad is None) == (b.grad is None), n
        if a.grad is not None:
            torch.testing.assert_close(a.grad, b.grad, rtol=rtol, atol=atol, msg=lambda m: f"{n}: {m}")
            names.append(n)
    assert any("relative_attention_bias" in n for n in names)


def assert_same_step(model, ref, out_rtol=1e-5, out_atol=1e-6, grad_rtol=1e-5, grad_atol=1e-6, field="logits"):
    """model and ref on inputs(): the same `field` (logits or loss) and parameter gradients."""
    ids, mask, labels = inputs()
    out = model(input_ids=ids, attention_mask=mask, labels=labels)
    exp = ref(input_ids=ids, attention_mask=mask, labels=labels)
    torch.testing.assert_close(getattr(out, field), getattr(exp, field), rtol=out_rtol, atol=out_atol)
    out.loss.backward()
    exp.loss.backward()
    assert_same_grads(model, ref, rtol=grad_rtol, atol=grad_atol)


def _spy(monkeypatch, owner, attr, calls, tag=None):
    real = getattr(owner, attr)

    def spy(*a, **k):
        calls.append(k if tag is None else tag)
        return real(*a, **k)
    monkeypatch.setattr(owner, attr, spy)


def _no_fallback(monkeypatch, model):
    """The patched model builds no (Sq, Sk) bias and runs no replaced attention function."""
    for m in model.modules():
        if isinstance(m, modeling_t5.T5Attention):
            monkeypatch.setattr(m, "compute_bias",
                                lambda *a, **k: pytest.fail("materialised the (Sq, Sk) position bias"))
    monkeypatch.setattr(hf, "_run", lambda *a, **k: pytest.fail("fell back to the replaced function"))


# (the T5LayerNorm rounds its variance through float32 also in float64 models; tk.rms_norm stays
# in float64: the tolerances below are that rounding, the attention itself agrees to ~1e-15)
@pytest.mark.parametrize("ff", ["relu", "gated-gelu"])
@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_conditional_generation_same_logits_loss_and_grads(ff, impl, monkeypatch):
    model = make(ff, impl)
    ref = copy.deepcopy(model)
    hf.apply_to(model)
    patched = model.truthgpt_patched
    assert patched["attention"] == 3 + 2 * 2 and patched["left"] == {}
    assert patched["rms_norm"] == (3 * 2 + 1) + (2 * 3 + 1)
    assert patched["mlp"] == (5 if ff == "gated-gelu" else 0)  # the ReLU feed-forward is left as it is
    assert patched["linear"] > 0 and patched["embedding"] > 0
    calls = []
    _spy(monkeypatch, hf.ops, "attention", calls)
    _no_fallback(monkeypatch, model)
    ids, mask, labels = inputs()
    dmask = torch.ones_like(labels)
    dmask[1, -3:] = 0  # right-padded decoder inputs too
    out = model(input_ids=ids, attention_mask=mask, labels=labels, decoder_attention_mask=dmask)
    exp = ref(input_ids=ids, attention_mask=mask, labels=labels, decoder_attention_mask=dmask)
    torch.testing.assert_close(out.logits, exp.logits, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.loss, exp.loss, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(out.encoder_last_hidden_state, exp.encoder_last_hidden_state,
                               rtol=1e-5, atol=1e-6)
    # one call per attention module: encoder self (bidirectional buckets), decoder self (causal),
    # decoder cross (no bias); the key masks are the padding masks
    assert len(calls) == 7
    enc, dec = calls[:3], calls[3:]
    for k in enc:
        assert not k["causal"] and k["rel_buckets"] == (True, 8, 12) and k["scale"] == 1.0
        assert k["rel_bias"].shape == (4, 8) and torch.equal(k["key_mask"], mask.bool())
    for k in dec[0::2]:
        assert k["causal"] and k["rel_buckets"] == (False, 8, 12)
        assert torch.equal(k["key_mask"], dmask.bool())
    for k in dec[1::2]:
        assert not k["causal"] and k["rel_bias"] is None and torch.equal(k["key_mask"], mask.bool())
    table = model.encoder.block[0].layer[0].SelfAttention.relative_attention_bias.weight
    assert torch.equal(enc[2]["rel_bias"], table.t())  # the first layer's table in every layer
    out.loss.backward()
    exp.loss.backward()
    assert_same_grads(model, ref)


def _exact_layer_norm(self, x):
    """T5LayerNorm with its variance in x's dtype (float64 here), as tk.rms_norm in float64."""
    return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))


@pytest.mark.parametrize("ff", ["relu", "gated-gelu"])
def test_float64_attention_and_ffn_agree_to_rounding(ff, monkeypatch):
    """With the norms out of the comparison (both models' T5LayerNorm in plain float64: HF's
    rounds its variance through float32, tk.rms_norm's backward reads a float32 rstd), logits,
    loss and every gradient agree to float64 rounding: the attention with its bias in the
    kernel (and the table's gradient), the gated GELU, the linears and the embeddings."""
    model = make(ff)
    ref = copy.deepcopy(model)
    hf.apply_to(model)
    monkeypatch.setattr(modeling_t5.T5LayerNorm, "forward", _exact_layer_norm)
    for m in model.modules():
        if isinstance(m, modeling_t5.T5LayerNorm):
            monkeypatch.setattr(m, "forward", types.MethodType(_exact_layer_norm, m))
    assert_same_step(model, ref, 1e-11, 1e-12, 1e-9, 1e-12)


def test_mt5_is_served():
    model = make("gated-gelu", cls="MT5ForConditionalGeneration", config="MT5Config")
    ref = copy.deepcopy(model)
    hf.apply_to(model)
    assert model.truthgpt_patched["attention"] == 7 and model.truthgpt_patched["mlp"] == 5
    assert_same_step(model, ref)


@pytest.mark.parametrize("ff", ["relu", "gated-gelu"])
def test_greedy_generate_with_cache_same_tokens(ff, monkeypatch):
    model = make(ff).float()
    ref = copy.deepcopy(model)
    ids, mask, _ = inputs()
    expected = ref.generate(input_ids=ids, attention_mask=mask, max_new_tokens=14, do_sample=False,
                            use_cache=True, min_new_tokens=14)
    hf.apply_to(model)
    calls = []
    _spy(monkeypatch, hf.ops, "attention", calls)
    _no_fallback(monkeypatch, model)
    got = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=14, do_sample=False,
                         use_cache=True, min_new_tokens=14)
    assert got.shape == (2, 15) and torch.equal(got, expected)
    # decoding steps: one query over the cached keys, the bias aligned at its position
    steps = [k for k in calls if k["causal"]]
    assert len(steps) == 2 * 14 and all(k["rel_buckets"] == (False, 8, 12) for k in steps)


def test_greedy_generate_with_a_static_cache_same_tokens():
    model = make("gated-gelu").float()
    ref = copy.deepcopy(model)
    ids, mask, _ = inputs()
    kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=10, min_new_tokens=10,
              do_sample=False, cache_implementation="static")
    expected = ref.generate(**kw)
    got = hf.apply_to(model).generate(**kw)
    assert torch.equal(got, expected)


def test_cached_decoding_logits_match():
    """Prefill then one token at a time through the EncoderDecoderCache: the logits of every
    step equal the unpatched model's (the bias of query i is at position past + i)."""
    model = make("gated-gelu")
    ref = copy.deepcopy(model)
    hf.apply_to(model)
    ids, mask, labels = inputs()
    dec = torch.cat([torch.zeros(2, 1, dtype=torch.long), labels], 1)
    for m in (model, ref):
        m._enc = m.get_encoder()(input_ids=ids, attention_mask=mask)
    caches = {}
    for step, (lo, hi) in enumerate([(0, 4), (4, 5), (5, 6), (6, 10)]):
        outs = []
        for m in (model, ref):
            o = m(encoder_outputs=m._enc, attention_mask=mask, decoder_input_ids=dec[:, lo:hi],
                  cache=caches.get(id(m)), use_cache=True)
            caches[id(m)] = o.cache
            outs.append(o.logits)
        torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-6, msg=lambda s: f"step {step}: {s}")


def test_encoder_model_and_t5_model(monkeypatch):
    for cls in ("T5EncoderModel", "T5Model"):
        model = make("gated-gelu", cls=cls)
        ref = copy.deepcopy(model)
        hf.apply_to(model)
        _no_fallback(monkeypatch, model)
        assert model.truthgpt_patched["attention"] == (3 if cls == "T5EncoderModel" else 7)
        ids, mask, labels = inputs()
        kw = {} if cls == "T5EncoderModel" else {"decoder_input_ids": labels}
        out = model(input_ids=ids, attention_mask=mask, **kw).last_hidden_state
        exp = ref(input_ids=ids, attention_mask=mask, **kw).last_hidden_state
        torch.testing.assert_close(out, exp, rtol=1e-5, atol=1e-6)
        out.square().mean().backward()
        exp.square().mean().backward()
        assert_same_grads(model, ref)


def test_output_attentions_returns_eager_weights():
    model = make("relu")
    ref = copy.deepcopy(model)
    ref.set_attn_implementation("eager")
    hf.apply_to(model)
    ids, mask, labels = inputs()
    got = model(input_ids=ids, attention_mask=mask, labels=labels, output_attentions=True)
    exp = ref(input_ids=ids, attention_mask=mask, labels=labels, output_attentions=True)
    for name, n, shape in (("encoder_attentions", 3, (2, 4, 20, 20)),
                           ("decoder_attentions", 2, (2, 4, 9, 9)),
                           ("cross_attentions", 2, (2, 4, 9, 20))):
        a_all, b_all = getattr(got, name), getattr(exp, name)
        assert a_all is not None and len(a_all) == n, name
        for a, b in zip(a_all, b_all):
            assert a.shape == shape
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(got.logits, exp.logits, rtol=1e-5, atol=1e-6)
    assert model.config._attn_implementation == hf.NAME  # only that call ran eager


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_rows_that_see_no_key_match_the_replaced_function(impl, monkeypatch):
    """A fully padded encoder row (every query of it and the decoder's cross-attention to it
    see no key) and a left-padded decoder (its first queries see no key): eager and sdpa, with
    T5's additive bias, give those rows a uniform softmax over every key (with gradients); the
    patched forward runs the replaced function for such a call."""
    model = make("gated-gelu", impl)
    ref = copy.deepcopy(model)
    hf.apply_to(model)
    ids, mask, labels = inputs(pads=(0, 20))
    dmask = torch.ones_like(labels)
    dmask[0, :3] = 0
    calls = []
    _spy(monkeypatch, hf, "_run", calls, "fallback")
    out = model(input_ids=ids, attention_mask=mask, labels=labels, decoder_attention_mask=dmask)
    exp = ref(input_ids=ids, attention_mask=mask, labels=labels, decoder_attention_mask=dmask)
    assert calls  # those calls ran the replaced function
    torch.testing.assert_close(out.logits, exp.logits, rtol=1e-5, atol=1e-6)
    out.loss.backward()
    exp.loss.backward()
    assert_same_grads(model, ref)


def test_set_attn_implementation_runs_exactly_that_function(monkeypatch):
    model = hf.apply_to(make("relu"))
    ref = make("relu")
    ids, mask, labels = inputs()
    calls = []
    _spy(monkeypatch, modeling_t5, "eager_attention_forward", calls, "eager")
    _spy(monkeypatch, hf.ops, "attention", calls, "truthgpt")
    for impl in ("eager", "truthgpt", "sdpa"):
        model.set_attn_implementation(impl)
        if impl != "truthgpt":
            ref.set_attn_implementation(impl)
        calls.clear()
        got = model(input_ids=ids, attention_mask=mask, labels=labels).logits
        assert calls == ([impl] * 7 if impl != "sdpa" else []), impl
        exp = ref(input_ids=ids, attention_mask=mask, labels=labels).logits
        torch.testing.assert_close(got, exp, rtol=1e-5, atol=1e-6, msg=lambda m: f"{impl}: {m}")


def test_unpatched_t5_with_truthgpt_attention_stays_exact():
    """attn_implementation="truthgpt" on a T5 model that apply_to did not patch: transformers'
    forward passes the materialised bias to the registered function, which runs the replaced
    function with it (it must not drop the bias)."""
    model = make("relu", impl="truthgpt")
    ref = make("relu")
    ids, mask, labels = inputs()
    torch.testing.assert_close(model(input_ids=ids, attention_mask=mask, labels=labels).logits,
                               ref(input_ids=ids, attention_mask=mask, labels=labels).logits,
                               rtol=1e-12, atol=1e-12)


def test_attention_dropout_in_training_runs_in_the_kernels(monkeypatch):
    model = hf.apply_to(make("gated-gelu", dropout_rate=0.2)).train()
    calls = []
    _spy(monkeypatch, hf.ops, "attention", calls)
    monkeypatch.setattr(hf, "_run", lambda *a, **k: pytest.fail("fell back to the replaced function"))
    ids, mask, labels = inputs()
    losses = []
    for _ in range(2):
        torch.manual_seed(3)
        losses.append(model(input_ids=ids, attention_mask=mask, labels=labels).loss)
    assert calls and all(k["dropout_p"] == 0.2 for k in calls)
    torch.testing.assert_close(losses[0], losses[1], rtol=0, atol=0)  # reproducible under the seed
    losses[0].backward()
    model.eval()
    calls.clear()
    model(input_ids=ids, attention_mask=mask, labels=labels)
    assert calls and all(k["dropout_p"] == 0.0 for k in calls)


def test_revert_restores_original_forwards(monkeypatch):
    model = make("gated-gelu")
    untouched = copy.deepcopy(model)
    before = {name: dict(m.__dict__) for name, m in model.named_modules()}
    hf.apply_to(model)
    assert hf.revert(model) is model
    assert not hasattr(model, "truthgpt_patched")
    assert model.config._attn_implementation == "sdpa"
    assert model.encoder.config._attn_implementation == "sdpa"
    assert model.decoder.config._attn_implementation == "sdpa"
    for name, m in model.named_modules():
        assert m.__dict__.keys() == before[name].keys(), name
    calls = []
    _spy(monkeypatch, hf.ops, "attention", calls, "attention")
    _spy(monkeypatch, hf.ops, "rms_norm", calls, "rms_norm")
    _spy(monkeypatch, hf.ops, "geglu", calls, "geglu")
    ids, mask, labels = inputs()
    got = model(input_ids=ids, attention_mask=mask, labels=labels).logits
    assert calls == []
    assert torch.equal(got, untouched(input_ids=ids, attention_mask=mask, labels=labels).logits)


@pytest.mark.parametrize("weight_dtype,x_dtype", [(torch.bfloat16, torch.bfloat16),
                                                  (torch.bfloat16, torch.float32),
                                                  (torch.float16, torch.float16),
                                                  (torch.float32, torch.bfloat16),
                                                  (torch.float32, torch.float32)])
def test_layer_norm_matches_t5_dtypes(weight_dtype, x_dtype):
    """T5LayerNorm's dtypes and roundings: with a half weight the normalised x is rounded to the
    weight's dtype before the product; with a float32 weight the output is float32."""
    norm = modeling_t5.T5LayerNorm(64, eps=1e-6)
    torch.manual_seed(0)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(64))
    norm = norm.to(weight_dtype)
    x = (3 * torch.randn(5, 7, 64)).to(x_dtype)
    exp = norm(x)
    got = hf._t5_layer_norm_forward(norm, x)
    assert got.dtype == exp.dtype
    tol = dict(rtol=0, atol=0) if weight_dtype in (torch.bfloat16, torch.float16) else dict(rtol=1e-6, atol=1e-6)
    # (half weights: bit for bit but for a rare rounding tie flipped by the float32 sum's order)
    torch.testing.assert_close(got.float(), exp.float(), **tol) if weight_dtype == torch.float32 else \
        _mostly_equal(got, exp)


def _mostly_equal(got, exp):
    same = (got == exp).float().mean().item()
    assert same > 0.99, same
    torch.testing.assert_close(got.float(), exp.float(), rtol=1e-2, atol=1e-2)


def test_gradient_checkpointing_passes_the_bias_on():
    """T5Block's gradient checkpointing re-runs the layers with the _T5Bias the first layer
    passed on: the same loss and gradients as the unpatched model."""
    model = make("gated-gelu")
    ref = copy.deepcopy(model)
    hf.apply_to(model)
    for m in (model, ref):
        m.gradient_checkpointing_enable()
        m.train()
    assert_same_step(model, ref, 1e-6, 1e-7, field="loss")


def test_apply_to_class_patches_t5_models():
    assert "T5ForConditionalGeneration" in hf.apply_to_class("t5")
    try:
        model = make("gated-gelu")
        assert model.truthgpt_patched["attention"] == 7 and model.truthgpt_patched["mlp"] == 5
    finally:
        hf.revert_class("t5")
    assert not hasattr(make("gated-gelu"), "truthgpt_patched")


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_a_custom_4d_mask_runs_the_replaced_function(impl, monkeypatch):
    """A 4-D mask (here two blocks of a bidirectional encoder) is not a key padding mask: the
    replaced function runs with transformers' materialised bias, as the unpatched model."""
    model = make("gated-gelu", impl, cls="T5EncoderModel")
    ref = copy.deepcopy(model)
    hf.apply_to(model)
    ids, _, _ = inputs()
    doc = (torch.arange(20) >= 8).long()
    mask = (doc[:, None] == doc[None, :])[None, None].expand(2, 1, 20, 20)
    # additive, as the eager function expects a prepared 4-D mask (it adds a boolean one as 0 / 1)
    mask = torch.zeros(mask.shape, dtype=torch.float64).masked_fill(~mask, torch.finfo(torch.float64).min)
    calls = []
    _spy(monkeypatch, hf, "_run", calls, "fallback")
    out = model(input_ids=ids, attention_mask=mask).last_hidden_state
    exp = ref(input_ids=ids, attention_mask=mask).last_hidden_state
    assert calls == ["fallback"] * 3
    torch.testing.assert_close(out, exp, rtol=1e-5, atol=1e-6)


def test_compiled_fullgraph_encoder(monkeypatch):
    """torch.compile(fullgraph=True): without padding the patched attention is traced (the
    _T5Bias passed between the layers included); with padding transformers' mask under
    compilation is 4-D and the replaced function runs."""
    model = make("gated-gelu", cls="T5EncoderModel").float()
    ref = copy.deepcopy(model)
    hf.apply_to(model)
    compiled = torch.compile(model, fullgraph=True)
    ids, mask, _ = inputs()
    for m in (None, mask):
        out = compiled(input_ids=ids, attention_mask=m).last_hidden_state
        exp = ref(input_ids=ids, attention_mask=m).last_hidden_state
        torch.testing.assert_close(out, exp, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("mode", ["autocast", "bf16_weights"])
def test_bfloat16_training_step_close_to_unpatched(mode):
    """bfloat16 training as users run it: float32 weights under torch.autocast (Trainer's
    bf16=True), or the model cast to bfloat16. The loss and the gradients of the patched model stay
    within bfloat16's rounding of the float32 unpatched model's (the unpatched bf16 model's own
    distance to it, doubled, plus a floor)."""
    model = make("gated-gelu").float().train()
    ref32 = copy.deepcopy(model)
    base = copy.deepcopy(model)
    hf.apply_to(model)
    if mode == "bf16_weights":
        model, base = model.bfloat16(), base.bfloat16()
    ids, mask, labels = inputs()

    def step(m):
        m.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode == "autocast"):
            loss = m(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        return loss.float(), {n: p.grad.float() for n, p in m.named_parameters() if p.grad is not None}
    (l_ours, g_ours), (l_base, g_base), (l_ref, g_ref) = step(model), step(base), step(ref32)
    assert abs(l_ours - l_ref) <= 2 * abs(l_base - l_ref) + 2e-2
    assert set(g_ours) == set(g_ref)
    for n in g_ref:
        scale = g_ref[n].abs().max().item() + 1e-12
        err = (g_ours[n] - g_ref[n]).abs().max().item() / scale
        base_err = (g_base[n] - g_ref[n]).abs().max().item() / scale
        assert err <= 2 * base_err + 5e-2, (n, err, base_err)


def test_umt5_is_served_with_a_table_per_layer(monkeypatch):
    """UMT5: every self-attention layer has its own table (UMT5Attention's own forward signature,
    nothing passed between layers): each goes to tk.attention as that layer's rel_bias; logits,
    loss, all gradients (every table's) and greedy tokens as the unpatched model."""
    model = make("gated-gelu", cls="UMT5ForConditionalGeneration", config="UMT5Config")
    ref = copy.deepcopy(model)
    hf.apply_to(model)
    assert model.truthgpt_patched["attention"] == 7 and not model.truthgpt_patched["left"]
    tables = []
    real = hf.ops.attention
    monkeypatch.setattr(hf.ops, "attention", lambda *a, **k: tables.append(k.get("rel_bias")) or real(*a, **k))
    assert_same_step(model, ref)
    own = [m.relative_attention_bias.weight for m in model.modules()
           if type(m).__name__ == "UMT5Attention" and m.has_relative_attention_bias]
    used = [t for t in tables if t is not None]
    assert len(used) == len(own) == 5  # 3 encoder + 2 decoder self-attention layers
    assert all(any(torch.equal(t, w.t()) for w in own) for t in used)
    assert len({t.data_ptr() for t in used}) == 5
    ids, mask, _ = inputs()
    with torch.no_grad():
        got = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
        want = ref.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    assert torch.equal(got, want)
