"""Drop-in cases: Hugging Face models patched by integrations.hf.apply_to vs unpatched
(transformers' sdpa attention, eager where it has none), one fwd+bwd case per served family, and an nn.TransformerEncoder
after replace_modules vs as built. Needs transformers for the HF cases."""
import copy

import torch
from torch import nn

from ..patch import replace_modules
from . import Case

VOCAB = 1000
# family -> its config fields beyond the common ones (4 layers, d 512, 8 heads, 2 kv heads)
FAMILIES = {
    "llama": {},
    "mistral": {"sliding_window": None},
    "qwen2": {},
    "qwen3": {"head_dim": 64},
    "gemma2": {"head_dim": 64, "hidden_activation": "gelu_pytorch_tanh"},
    "gemma3_text": {"head_dim": 64, "hidden_activation": "gelu_pytorch_tanh"},
    "phi3": {},
    "olmo2": {},
    "mixtral": {"num_local_experts": 8, "num_experts_per_tok": 2},
    "qwen2_moe": {"num_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 344,
                  "shared_expert_intermediate_size": 1376},
    "qwen3_moe": {"head_dim": 64, "num_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 344},
}
# families whose transformers code has no sdpa path (Gemma 2: attention-logit softcapping)
EAGER_ONLY = {"gemma2"}


def _attn(family):
    return "eager" if family in EAGER_ONLY else "sdpa"


def _model(family, device, quick, **overrides):
    import transformers
    cfg = transformers.AutoConfig.for_model(
        family, vocab_size=VOCAB, hidden_size=128 if quick else 512,
        intermediate_size=256 if quick else 1376, num_hidden_layers=2 if quick else 4,
        num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=4096,
        pad_token_id=0, bos_token_id=1, eos_token_id=2,  # some defaults lie past VOCAB
        **{**FAMILIES[family], **overrides})
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation=_attn(family)).to(device)


def _train_step(model, autocast=None):
    """forward + loss (under torch.autocast in `autocast`, as transformers' Trainer with bf16=True
    runs them), backward outside it."""
    def run(x):
        with torch.autocast(x["ids"].device.type, dtype=autocast, enabled=autocast is not None):
            out = model(x["ids"], labels=x["ids"])
        out.loss.backward()
        model.zero_grad(set_to_none=True)
    return run


def _generate(model, n_new, **kw):
    def run(x):
        with torch.no_grad():
            return model.generate(x["prompt"], max_new_tokens=n_new, min_new_tokens=n_new,
                                  do_sample=False, pad_token_id=0, **kw)
    return run


def _compiled_forward(model):
    """model with its forward under torch.compile(fullgraph=True) (transformers' recipe for
    static-cache decoding; the runner's warm-up call compiles)."""
    model.forward = torch.compile(model.forward, fullgraph=True)
    return model


def cases(device, quick):
    out = []
    seq = 128 if quick else 1024
    try:
        import transformers  # noqa: F401
        from ..integrations import hf
    except ImportError:
        transformers = None
    if transformers is not None:
        for family in FAMILIES:
            fbase = _model(family, device, quick)
            fpatched = hf.apply_to(copy.deepcopy(fbase))
            out.append(Case(
                op="dropin", name=f"HF {family} fwd+bwd seq {seq}",
                setup=lambda: {"ids": torch.randint(0, VOCAB, (1, seq), device=device)},
                impls={"truthgpt (apply_to)": _train_step(fpatched),
                       f"transformers {_attn(family)}": _train_step(fbase)},
                extra={"tokens": seq}))
        base = _model("llama", device, quick)
        patched = hf.apply_to(copy.deepcopy(base))
        out.append(Case(
            op="dropin", name=f"HF Llama fwd+bwd seq {seq} bf16 autocast",
            setup=lambda: {"ids": torch.randint(0, VOCAB, (1, seq), device=device)},
            impls={"truthgpt (apply_to)": _train_step(patched, torch.bfloat16),
                   "transformers sdpa": _train_step(base, torch.bfloat16)},
            extra={"tokens": seq, "dtype": "bfloat16"}))
        # attention dropout in training: in the kernels since the twenty-first session (before:
        # every call fell back to sdpa)
        dbase = _model("llama", device, quick, attention_dropout=0.1).train()
        dpatched = hf.apply_to(copy.deepcopy(dbase)).train()
        out.append(Case(
            op="dropin", name=f"HF Llama fwd+bwd seq {seq} attention_dropout 0.1",
            setup=lambda: {"ids": torch.randint(0, VOCAB, (1, seq), device=device)},
            impls={"truthgpt (apply_to)": _train_step(dpatched), "transformers sdpa": _train_step(dbase)},
            extra={"tokens": seq}))
        n_new, n_prompt = (16, 32) if quick else (128, 512)  # issue #14: 128 after 512
        out.append(Case(
            op="dropin", name=f"HF Llama greedy generate {n_new} tokens after {n_prompt}",
            setup=lambda: {"prompt": torch.randint(1, VOCAB, (1, n_prompt), device=device)},
            impls={"truthgpt (apply_to)": _generate(patched, n_new), "transformers sdpa": _generate(base, n_new)},
            extra={"tokens": n_new}))
        # the same with transformers' static cache and the forward compiled, on both sides
        static = {"cache_implementation": "static"}
        cpatched, cbase = (_compiled_forward(copy.deepcopy(m)) for m in (patched, base))
        out.append(Case(
            op="dropin", name=f"HF Llama greedy generate {n_new} tokens after {n_prompt} static cache compiled",
            setup=lambda: {"prompt": torch.randint(1, VOCAB, (1, n_prompt), device=device)},
            impls={"truthgpt (apply_to)": _generate(cpatched, n_new, **static),
                   "transformers sdpa": _generate(cbase, n_new, **static)},
            extra={"tokens": n_new}, peak_memory=False))
        out += _t5_cases(device, quick)
    d = 128 if quick else 512
    layer = nn.TransformerEncoderLayer(d, 8, 4 * d, dropout=0.0, batch_first=True)
    enc = nn.TransformerEncoder(layer, 2 if quick else 6, enable_nested_tensor=False).to(device)
    ours = replace_modules(copy.deepcopy(enc))

    def enc_step(model):
        def run(x):
            model(x["x"]).sum().backward()
            model.zero_grad(set_to_none=True)
        return run

    out.append(Case(
        op="dropin", name=f"nn.TransformerEncoder fwd+bwd seq {seq}",
        setup=lambda: {"x": torch.randn(1, seq, d, device=device)},
        impls={"truthgpt (replace_modules)": enc_step(ours), "torch": enc_step(enc)},
        extra={"tokens": seq}))
    return out


def _t5_cases(device, quick):
    """HF T5 (flan-T5-small's shape: d 512, 6 heads of 64, gated-GELU d_ff 1024, 8 + 8 layers;
    quick: 2 + 2 layers, d 128) patched vs unpatched (transformers' sdpa with its materialised
    relative bias): a training step (source 512, target 128) and greedy generation (32 tokens
    after a 512-token source; quick: 8 after 64)."""
    import transformers
    from ..integrations import hf
    layers, d = (2, 128) if quick else (8, 512)
    cfg = transformers.T5Config(vocab_size=VOCAB, d_model=d, d_kv=64, num_heads=6, d_ff=2 * d, num_layers=layers,
                                num_decoder_layers=layers, feed_forward_proj="gated-gelu", dropout_rate=0.0,
                                decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    torch.manual_seed(0)
    base = transformers.T5ForConditionalGeneration._from_config(cfg, attn_implementation="sdpa").to(device)
    patched = hf.apply_to(copy.deepcopy(base))
    src, tgt = (64, 16) if quick else (512, 128)
    n_new = 8 if quick else 32

    def step(model):
        def run(x):
            model(input_ids=x["src"], labels=x["tgt"]).loss.backward()
            model.zero_grad(set_to_none=True)
        return run

    def gen(model):
        def run(x):
            with torch.no_grad():
                return model.generate(x["src"], max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False)
        return run
    data = lambda: {"src": torch.randint(2, VOCAB, (1, src), device=device),  # noqa: E731
                    "tgt": torch.randint(2, VOCAB, (1, tgt), device=device)}
    return [
        Case(op="dropin", name=f"HF T5 (flan-T5-small shape) fwd+bwd source {src} target {tgt}", setup=data,
             impls={"truthgpt (apply_to)": step(patched), "transformers sdpa": step(base)},
             extra={"tokens": src + tgt}),
        Case(op="dropin", name=f"HF T5 greedy generate {n_new} tokens after source {src}", setup=data,
             impls={"truthgpt (apply_to)": gen(patched), "transformers sdpa": gen(base)},
             extra={"tokens": n_new}),
    ]
