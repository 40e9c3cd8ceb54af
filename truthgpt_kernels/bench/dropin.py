"""Drop-in cases: a Hugging Face Llama-architecture model patched by integrations.hf.apply_to
vs unpatched (transformers' sdpa attention), and an nn.TransformerEncoder after
replace_modules vs as built. Needs transformers for the HF cases."""
import copy

import torch
from torch import nn

from ..patch import replace_modules
from . import Case


def _llama(device, quick):
    import transformers
    cfg = transformers.LlamaConfig(
        vocab_size=1000, hidden_size=128 if quick else 512, intermediate_size=256 if quick else 1376,
        num_hidden_layers=2 if quick else 4, num_attention_heads=8, num_key_value_heads=2,
        max_position_embeddings=4096, attn_implementation="sdpa")
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).to(device)


def _train_step(model):
    def run(x):
        out = model(x["ids"], labels=x["ids"])
        out.loss.backward()
        model.zero_grad(set_to_none=True)
    return run


def _generate(model, n_new):
    def run(x):
        with torch.no_grad():
            return model.generate(x["prompt"], max_new_tokens=n_new, min_new_tokens=n_new,
                                  do_sample=False, pad_token_id=0)
    return run


def cases(device, quick):
    out = []
    seq = 128 if quick else 1024
    try:
        import transformers  # noqa: F401
        from ..integrations import hf
    except ImportError:
        transformers = None
    if transformers is not None:
        base = _llama(device, quick)
        patched = hf.apply_to(copy.deepcopy(base))
        out.append(Case(
            op="dropin", name=f"HF Llama fwd+bwd seq {seq}",
            setup=lambda: {"ids": torch.randint(0, 1000, (1, seq), device=device)},
            impls={"truthgpt (apply_to)": _train_step(patched), "transformers sdpa": _train_step(base)},
            extra={"tokens": seq}))
        n_new = 16 if quick else 128
        out.append(Case(
            op="dropin", name=f"HF Llama greedy generate {n_new} tokens",
            setup=lambda: {"prompt": torch.randint(1, 1000, (1, 32), device=device)},
            impls={"truthgpt (apply_to)": _generate(patched, n_new), "transformers sdpa": _generate(base, n_new)},
            extra={"tokens": n_new}))
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
