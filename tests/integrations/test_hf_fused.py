"""Issue #16 wiring in integrations.hf: Gemma 2 / Gemma 3 GELU-gated MLPs on tk.geglu, and the
CausalLM training loss through tk.linear_cross_entropy (no logits). Tiny random models."""
import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

from truthgpt_kernels.integrations import hf  # noqa: E402
from .test_hf import COMMON, assert_same_grads  # noqa: E402

MODELS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM",
               {"head_dim": 16, "sliding_window": 6, "attn_logit_softcapping": 20.0,
                "final_logit_softcapping": 3.0}),  # small: the softcap changes the loss
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM",
               {"head_dim": 16, "sliding_window": 6,
                "layer_types": ["sliding_attention", "full_attention"]}),
}


def make(name, **overrides):
    cfg_cls, model_cls, extra = MODELS[name]
    cfg = getattr(transformers, cfg_cls)(**COMMON, **{**extra, **overrides}, attn_implementation="eager")
    torch.manual_seed(0)
    return getattr(transformers, model_cls)(cfg).double()


def batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 96, (2, 12), generator=g)
    labels = ids.clone()
    labels[0, :4] = -100
    return ids, labels


def _spy(monkeypatch, name):
    calls = []
    real = getattr(hf.ops, name)
    monkeypatch.setattr(hf.ops, name, lambda *a, **k: calls.append(k) or real(*a, **k))
    return calls


@pytest.mark.parametrize("act,approx", [("gelu_pytorch_tanh", "tanh"), ("gelu", "none")])
@pytest.mark.parametrize("name", ["gemma2", "gemma3"])
def test_gemma_mlp_runs_geglu_same_logits_and_grads(name, act, approx, monkeypatch):
    calls = _spy(monkeypatch, "geglu")
    model = make(name, hidden_activation=act).eval()
    ref = copy.deepcopy(model)
    hf.apply_to(model)
    assert model.truthgpt_patched["mlp"] == 2 and model.truthgpt_patched["attention"] == 2
    ids, labels = batch()
    out, exp = model(ids, labels=labels), ref(ids, labels=labels)  # eval: the logits path
    assert [k["approximate"] for k in calls] == [approx] * 2
    # HF's RMSNorm rounds through float32 even for float64 models; ours stays in float64
    torch.testing.assert_close(out.logits, exp.logits, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out.loss, exp.loss, rtol=1e-6, atol=1e-6)
    out.loss.backward()
    exp.loss.backward()
    assert_same_grads(model, ref)


@pytest.mark.parametrize("name", list(MODELS))
def test_training_loss_is_fused_without_logits(name, monkeypatch):
    model = make(name).train()
    ref = copy.deepcopy(model)
    hf.apply_to(model)
    assert model.truthgpt_patched["loss"] == 1
    calls = _spy(monkeypatch, "linear_cross_entropy")
    monkeypatch.setattr(model.lm_head, "forward", lambda *a: pytest.fail("lm_head ran"))
    ids, labels = batch()
    out, exp = model(ids, labels=labels), ref(ids, labels=labels)
    assert out.logits is None and len(calls) == 1
    assert calls[0]["logit_softcap"] == (3.0 if name == "gemma2" else 0.0)
    assert out.loss.dtype == torch.float64  # ours; HF's loss upcasts float64 logits to float32
    torch.testing.assert_close(out.loss.float(), exp.loss, rtol=1e-6, atol=1e-6)
    out.loss.backward()
    exp.loss.backward()
    assert_same_grads(model, ref)


def test_fused_loss_honours_num_items_in_batch_and_shift_labels():
    model = make("llama").train()
    ref = copy.deepcopy(model)
    hf.apply_to(model)
    ids, labels = batch()
    shift = torch.roll(labels, 2, dims=1)  # shift_labels replace the shifted labels
    for kw in (dict(labels=labels, num_items_in_batch=torch.tensor(7)),
               dict(labels=labels, shift_labels=shift)):
        out, exp = model(ids, **kw), ref(ids, **kw)
        assert out.logits is None
        torch.testing.assert_close(out.loss.float(), exp.loss, rtol=1e-6, atol=1e-6)


def test_bfloat16_model_loss_is_float32(monkeypatch):
    """A pure-bf16 model's fused loss is the float32 reduction of float32 row losses (as
    ForCausalLMLoss upcasts the bf16 logits), never a bf16-rounded value (2^-5 steps near 4)."""
    model = hf.apply_to(make("llama").to(torch.bfloat16).train())
    calls = _spy(monkeypatch, "linear_cross_entropy")
    ids, labels = batch()
    rows = []
    for kw in (dict(labels=labels), dict(labels=labels, num_items_in_batch=torch.tensor(7))):
        loss = model(ids, **kw).loss
        assert loss.dtype == torch.float32 and calls[-1]["loss_dtype"] is torch.float32
        hidden = model.model(ids)[0].reshape(-1, model.config.hidden_size)
        target = torch.nn.functional.pad(labels, (0, 1), value=-100)[..., 1:].reshape(-1)
        rows.append(hf.ops.linear_cross_entropy(hidden, model.lm_head.weight, target, reduction="none",
                                                loss_dtype=torch.float32))
        want = rows[-1].sum() / (7 if "num_items_in_batch" in kw else (target != -100).sum())
        torch.testing.assert_close(loss, want, rtol=1e-6, atol=0)
        loss.backward()


def test_logits_when_asked_for_or_not_training():
    model = hf.apply_to(make("llama").train())
    ids, labels = batch()
    assert model(ids, labels=labels, skip_logits=False).logits.shape == (2, 12, 96)
    assert model(ids, labels=labels, logits_to_keep=0).logits is None
    assert model(ids).logits.shape == (2, 12, 96)  # no labels
    with pytest.raises(ValueError, match="skip_logits=True needs labels"):
        model(ids, skip_logits=True)
    model.eval()
    assert model(ids, labels=labels).logits.shape == (2, 12, 96)
    assert model(ids, labels=labels, skip_logits=True).logits is None
    off = hf.apply_to(make("llama").train(), fused_loss=False)
    assert off.truthgpt_patched["loss"] == 0
    assert off(ids, labels=labels).logits.shape == (2, 12, 96)


def test_revert_removes_the_loss_patch():
    model = hf.apply_to(make("llama").train())
    assert "forward" in model.__dict__
    hf.revert(model)
    assert "forward" not in model.__dict__
    ids, labels = batch()
    assert model(ids, labels=labels).logits is not None


def test_patched_model_pickles_and_keeps_the_forward_signature():
    """pickle / torch.save round trips (the patched forwards were bound methods of functions the
    unpickled modules could not find), the copy still patched and revertible; the CausalLM
    forward shows the replaced forward's parameters (the Trainer and generate read them)."""
    import inspect
    import pickle
    model = make("llama").train()
    ref = copy.deepcopy(model)
    want = inspect.signature(model.forward)
    hf.apply_to(model)
    assert inspect.signature(model.forward) == want
    ids, labels = batch()
    again = pickle.loads(pickle.dumps(model))
    assert again.truthgpt_patched["loss"] == 1 and inspect.signature(again.forward) == want
    out, exp = again(ids, labels=labels), ref(ids, labels=labels)
    assert out.logits is None
    torch.testing.assert_close(out.loss.float(), exp.loss, rtol=1e-6, atol=1e-6)
    hf.revert(again)
    assert again(ids, labels=labels).logits is not None


def test_fused_loss_forward_compiles_with_fullgraph():
    """transformers' test_torch_compile_for_training: torch.compile(model, fullgraph=True) of a
    patched training step (the fused loss's forward read dataclasses.fields, which Dynamo does
    not trace: "dataclass fields failure"); loss and gradients equal eager."""
    torch._dynamo.reset()
    model = make("llama").float().train()
    hf.apply_to(model)
    ids, labels = batch()
    eager = model(ids, labels=labels).loss
    eager.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    loss = torch.compile(model, fullgraph=True)(ids, labels=labels).loss
    loss.backward()
    torch.testing.assert_close(loss, eager, rtol=1e-5, atol=1e-6)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads[n], rtol=1e-4, atol=1e-6, msg=lambda m: f"{n}: {m}")
