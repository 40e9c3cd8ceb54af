"""Hugging Face transformers integration: `apply_to(model)` patches one Llama-family model
instance (Llama, Mistral, Qwen2, Gemma 2) to run on truthgpt kernels:

- attention: a "truthgpt" function in transformers' attention registry (with the boolean
  sdpa-style mask), selected on this model. The 4-D mask is decomposed into causal +
  sliding window + key padding mask and checked; a mask that is not of that form (e.g. a
  static cache prefill) falls back to transformers' sdpa function, so results stay exact.
- rotary: the attention modules' forward applies `tk.apply_rotary_qk`;
- RMSNorm: `tk.rms_norm` (Gemma's `1 + weight` form included);
- MLP: `tk.swiglu` for SiLU-gated MLPs (Gemma's GELU-gated MLP is left as it is).

Patches are per instance (bound forwards); classes and other models are untouched.
transformers is an optional dependency: `pip install .[hf]`.
"""
import types
import warnings

import torch

from .. import logs as _logs
from .. import ops

SUPPORTED = ("llama", "mistral", "qwen2", "gemma2")
NAME = "truthgpt"


def _visible(mask: torch.Tensor) -> torch.Tensor:
    if mask.dtype == torch.bool:
        return mask
    return mask == 0


def attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                      sliding_window=None, softcap=None, is_causal=None, **kwargs):
    """transformers attention-function signature: q (B, Hq, Sq, D), k/v (B, Hkv, Sk, D);
    returns (out (B, Sq, Hq, D), None)."""
    Sq, Sk = query.shape[2], key.shape[2]
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    window = (sliding_window - 1, -1) if sliding_window else None
    key_mask = None
    servable = dropout == 0.0 and not kwargs.get("output_attentions", False)
    if servable and attention_mask is not None:
        vis = _visible(attention_mask)
        if attention_mask.dtype != torch.bool and not torch.all(vis | (attention_mask <= torch.finfo(attention_mask.dtype).min / 2)):
            servable = False  # an additive bias, not a mask
        else:
            vis = vis[..., -Sk:]
            key_mask = vis.any(dim=-2)[:, 0]  # (B, Sk): keys some query may see
            from ..ops.reference import attention_visibility
            expected = attention_visibility(query.shape[0], 1, Sq, Sk, causal=causal, window=window,
                                            key_mask=key_mask, device=query.device)
            servable = vis.shape[1] == 1 and torch.equal(expected, vis)
    if not servable:
        _logs.warn_once("hf-sdpa-fallback", _logs.HF_SDPA_FALLBACK, logger="integrations.hf")
        from transformers.integrations.sdpa_attention import sdpa_attention_forward
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, is_causal=is_causal, **kwargs)
    out = ops.attention(query, key, value, causal=causal, scale=scaling, window=window,
                        key_mask=key_mask, softcap=softcap or 0.0)
    return out.transpose(1, 2).contiguous(), None


def _register():
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    AttentionInterface.register(NAME, attention_forward)
    AttentionMaskInterface.register(NAME, sdpa_mask)


def _attention_forward(self, hidden_states, position_embeddings=None, attention_mask=None,
                       cache=None, past_key_values=None, **kwargs):
    """The Llama-family attention forward, with rotary through tk.apply_rotary_qk."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    cache = cache if cache is not None else past_key_values
    B, S = hidden_states.shape[:2]
    q = self.q_proj(hidden_states).view(B, S, -1, self.head_dim).transpose(1, 2)  # (B, Hq, S, D)
    k = self.k_proj(hidden_states).view(B, S, -1, self.head_dim).transpose(1, 2)  # (B, Hkv, S, D)
    v = self.v_proj(hidden_states).view(B, S, -1, self.head_dim).transpose(1, 2)
    cos, sin = position_embeddings  # (B or 1, S, R), halves repeated
    Bc, half = cos.shape[0], cos.shape[-1] // 2
    table_cos = cos[..., :half].reshape(Bc * S, half)  # one row per (batch, token)
    table_sin = sin[..., :half].reshape(Bc * S, half)
    pos = torch.arange(Bc * S, device=q.device).view(Bc, S)
    q, k = ops.apply_rotary_qk(q, k, table_cos, table_sin, position_ids=pos)
    if cache is not None:
        k, v = cache.update(k, v, self.layer_idx, kwargs=kwargs) if "kwargs" in cache.update.__code__.co_varnames \
            else cache.update(k, v, self.layer_idx)
    extra = {}
    if self.config.model_type == "mistral":
        extra["sliding_window"] = getattr(self.config, "sliding_window", None)
    elif hasattr(self, "sliding_window"):
        extra["sliding_window"] = self.sliding_window
    if getattr(self, "attn_logit_softcapping", None):
        extra["softcap"] = self.attn_logit_softcapping
    fn = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, attention_forward) \
        if hasattr(ALL_ATTENTION_FUNCTIONS, "get_interface") else ALL_ATTENTION_FUNCTIONS[self.config._attn_implementation]
    out, weights = fn(self, q, k, v, attention_mask,
                      dropout=0.0 if not self.training else self.attention_dropout,
                      scaling=self.scaling, **extra, **kwargs)
    out = out.reshape(B, S, -1).contiguous()
    return self.o_proj(out), weights


def _rms_norm_forward(self, x):
    return ops.rms_norm(x, self.weight, self.variance_epsilon)


def _gemma_rms_norm_forward(self, x):
    return ops.rms_norm(x, 1.0 + self.weight.float(), self.eps)


def _swiglu_mlp_forward(self, x):
    return self.down_proj(ops.swiglu(self.gate_proj(x), self.up_proj(x)))


def apply_to(model):
    """Patches a Llama / Mistral / Qwen2 / Gemma 2 model instance in place; returns it. Other
    model types are left untouched with a warning."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED:
        warnings.warn(f"truthgpt_kernels.integrations.hf.apply_to supports {', '.join(SUPPORTED)}; "
                      f"{model_type or type(model).__name__} was left unchanged", stacklevel=2)
        return model
    _register()
    act = getattr(config, "hidden_act", None) or getattr(config, "hidden_activation", None)
    patched = {"attention": 0, "rms_norm": 0, "mlp": 0}
    for module in model.modules():
        cls = type(module).__name__
        if cls.endswith("Attention") and all(hasattr(module, a) for a in ("q_proj", "k_proj", "v_proj", "o_proj", "layer_idx")):
            module.forward = types.MethodType(_attention_forward, module)
            patched["attention"] += 1
        elif cls.endswith("RMSNorm") and hasattr(module, "weight"):
            if model_type == "gemma2":
                module.forward = types.MethodType(_gemma_rms_norm_forward, module)
            else:
                module.forward = types.MethodType(_rms_norm_forward, module)
            patched["rms_norm"] += 1
        elif cls.endswith("MLP") and act in ("silu", "swish") and all(hasattr(module, a) for a in ("gate_proj", "up_proj", "down_proj")):
            module.forward = types.MethodType(_swiglu_mlp_forward, module)
            patched["mlp"] += 1
    model.set_attn_implementation(NAME) if hasattr(model, "set_attn_implementation") else \
        setattr(config, "_attn_implementation", NAME)
    model.truthgpt_patched = patched
    return model
