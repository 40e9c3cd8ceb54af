"""Hugging Face transformers integration: `apply_to(model)` patches one model instance of a
SUPPORTED family (Llama, Mistral, Qwen2, Gemma 2, Gemma 3 text, Qwen3, Phi-3, OLMo 2, Mixtral,
Qwen2-MoE, Qwen3-MoE; and the language model of a vision-language model whose text_config is
one of these, e.g. Llava, Gemma 3, Mistral 3; the encoder-decoder T5 and mT5, see below) to run
on truthgpt kernels, `revert(model)` undoes it:

- attention: a "truthgpt" function in transformers' attention registry, selected on this
  model, with a "truthgpt" mask function (`padding_mask`): for the patterns tk.attention
  serves exactly (causal, sliding-window causal, bidirectional, each with optional padding)
  it returns, as transformers' flash-attention mask does, None without padding or the 2-D
  (batch, keys) boolean padding mask, so no (S x S) mask is built; any other pattern
  (packed sequences' block-diagonal mask, image-token or chunked overlays, transformers 4.x
  calls) gets transformers' 4-D sdpa mask, which the attention function decomposes into
  causal + sliding window + key padding mask and checks. Attention dropout in training runs in
  the kernels (tk.attention's / tk.attention_varlen's Philox dropout, keyed from torch's CPU
  generator: reproducible under torch.manual_seed, not the same draws as torch's). A 4-D mask
  not of that form, dropout under torch.compile with a 4-D mask, or `output_attentions=True`
  runs the function that the patch replaced (the model's own eager function for attention
  weights), so results stay exact.
  Query rows that see no key at all (left padding) get what the replaced function gives
  them: the mean of V for eager (its additive mask turns into a uniform softmax), zeros for
  sdpa with current torch; it is computed by running that function on those rows only.
- `model.set_attn_implementation("eager" | "sdpa" | ...)` after the patch runs exactly that
  function; "truthgpt" selects ours again.
- rotary: the attention modules' forward applies `tk.apply_rotary_qk` (partial rotary, as
  Phi-3's partial_rotary_factor, included); q/k/v from separate projections or Phi-3's packed
  qkv_proj; q/k RMSNorm per head (Gemma 3, Qwen3) or over the whole projection (OLMo 2);
- RMSNorm: `tk.rms_norm` (Gemma's `1 + weight` form included, q_norm / k_norm and OLMo 2's
  post-attention / post-feedforward norms);
- MLP: `tk.swiglu` for SiLU-gated MLPs (Phi-3's packed gate_up_proj as `tk.swiglu(gate_up)`),
  `tk.geglu` for Gemma's GELU-gated ones (gelu_pytorch_tanh / gelu_new: "tanh"; gelu: "none");
- MoE experts (transformers 5's fused *Experts modules, 3-D gate_up_proj / down_proj): the
  routed (token, expert) pairs sorted by expert, a grouped GEMM (`tk.ops.grouped_linear` on the
  CPU where tk.linear's own GEMMs serve the dtype, torch's grouped_mm elsewhere, a GEMM per
  expert for float64), and one `tk.swiglu` over every routed row; the router and its top-k are
  untouched.
  This forward replaces the config's experts_implementation (eager / grouped_mm / batched_mm);
- linear: every plain `nn.Linear` (projections and lm_head; subclasses, e.g. quantized or LoRA
  layers, are left as they are) runs `tk.linear`: the C++ kernel for the few rows of a decoding
  step, F.linear when a gradient may flow or the rows are many;
- embedding: every plain `nn.Embedding` (the token embedding; subclasses such as Gemma's scaled
  embedding, and max_norm / scale_grad_by_freq / sparse, are left) runs `tk.embedding`, whose
  CPU weight gradient skips torch's fresh zero-filled (vocab, hidden) tensor;
- a module kind (attention, rms_norm, mlp, experts) with a module this patch cannot serve is
  left whole, with a warning and the reason in `model.truthgpt_patched["left"]`;
- T5 / mT5 (T5ForConditionalGeneration, T5Model, T5EncoderModel, any model of T5 stacks;
  transformers 5.x): T5Attention's forward keeps transformers' projections and caches
  (DynamicCache, EncoderDecoderCache with its cross-attention reuse, StaticCache) and runs
  tk.attention with the relative position bias in the kernel: rel_bias = the stack's first-layer
  relative_attention_bias table (float32 for half tables), T5's bucketing (bidirectional in the
  encoder), scale 1, causal in the decoder, the padding mask as key_mask; cross-attention without
  bias. No (Sq, Sk) bias is built: the `position_bias` the layers pass on is a _T5Bias (the table's
  owner). The replaced function (eager / sdpa, with transformers' materialised bias) runs for
  attention weights, a mask that is not a key padding mask (4-D masks: custom ones, compilation),
  calls with query rows that see no key (eager and sdpa give them a uniform softmax over every
  key), or an implementation chosen after the patch. T5LayerNorm runs tk.rms_norm with T5's
  dtypes (a half weight: the normalised x rounded to it, then the product in it); the gated
  feed-forward (flan-T5's gated-gelu: tk.geglu "tanh"; gated-silu: tk.swiglu) keeps its dropout
  and float32 `wo`; the ReLU feed-forward is left as it is. UMT5 (a table in every layer, its own
  attention signature) runs the same forward with each layer's table.
- loss (`fused_loss=True`, the default, as Liger-Kernel): a *ForCausalLM forward given labels
  in training mode (or skip_logits=True) computes its loss with tk.linear_cross_entropy on the
  last hidden states and lm_head (final_logit_softcapping included, num_items_in_batch and
  shift_labels honoured as ForCausalLMLoss does), so no (batch, seq, vocab) logits tensor exists; `outputs.logits` is
  then None, as with Liger's `skip_logits`. In eval mode, without labels, with
  skip_logits=False, return_dict=False or logits_to_keep != 0 the model's own forward runs.

Patches are per instance (bound forwards); classes and other models are untouched.
`apply_to_class(family)` / `revert_class(family)` patch (unpatch) every model of a family built
afterwards; `AutoTruthgptForCausalLM.from_config / .from_pretrained` return a patched model;
importing this module registers attn_implementation="truthgpt" (the attention function only).
transformers is an optional dependency: `pip install .[hf]`. The versions it is tested with
are SUPPORTED_TRANSFORMERS; `apply_to` refuses others, and refuses any attention module whose
forward signature it does not know, rather than compute something else.
"""
import dataclasses
import functools
import inspect
import sys
import threading
import warnings
import weakref

import torch
from packaging.specifiers import SpecifierSet
from packaging.version import Version

from .. import backends, ops
from .. import logs as _logs
from ..ops.grouped_linear import grouped_linear
from ..ops.linear import own_cpu_backward
from ..modules.packing import Packed

SUPPORTED = ("llama", "mistral", "qwen2", "gemma2", "gemma3_text", "qwen3", "phi3", "olmo2",
             "mixtral", "qwen2_moe", "qwen3_moe", "t5", "mt5", "umt5")
GEMMA = ("gemma2", "gemma3_text")  # RMSNorm scales by 1 + weight
# families whose attention passes config.sliding_window to every layer (the others set a
# per-layer `sliding_window` attribute)
CONFIG_WINDOW = ("mistral", "mixtral", "phi3")
# apply_to_class names that are not the model_type: the modeling module's directory name
_FAMILY_MODULES = {"gemma3_text": "gemma3"}
KINDS = ("attention", "rms_norm", "mlp", "experts", "linear", "embedding", "loss")
# the GELU of a GELU-gated MLP -> tk.geglu's approximate
GELU_ACTS = {"gelu_pytorch_tanh": "tanh", "gelu_new": "tanh", "gelu": "none"}
NAME = "truthgpt"
# transformers versions the patch is tested with (tests/integrations/test_hf.py): 4.53.3 (the
# oldest passing; 4.51 and 4.52 lack transformers.masking_utils) to 5.24. The upper bound is the
# newest version tested: the attention forward it replaces changes between releases.
SUPPORTED_TRANSFORMERS = SpecifierSet(">=4.53.3,<5.25")

# keyword spellings of the KV cache in the attention forward: past_key_value (<= 4.55),
# past_key_values (4.56 - 4.57), cache (5.x)
_CACHE_ARGS = ("cache", "past_key_values", "past_key_value")
_KNOWN_ARGS = {"self", "hidden_states", "position_embeddings", "attention_mask", "cache_position",
               *_CACHE_ARGS}
_STATE = "_truthgpt_hf_state"
_patched_models = weakref.WeakSet()


class _BoundForward(functools.partial):
    """A patched forward bound to its module, as types.MethodType(fn, module) but picklable (a
    bound method pickles as getattr(module, fn.__name__), which the unpickled module lacks, so
    pickle / torch.save(model) round trips failed). `signature_of`: the replaced forward, whose
    signature it shows (transformers and the Trainer read the forward's parameters)."""

    def __new__(cls, fn, *args, signature_of=None):
        self = super().__new__(cls, fn, *args)
        self.signature_of = signature_of
        return self

    @property
    def __self__(self):
        return self.args[0]

    @property
    def __func__(self):
        return self.func

    @property
    def __name__(self):
        return "forward"

    @property
    def __signature__(self):
        if self.signature_of is None:
            return None  # inspect: the function's signature without the module
        sig = inspect.signature(self.signature_of)
        return sig.replace(parameters=list(sig.parameters.values())[1:])


def check_transformers_version(version=None):
    """Raises RuntimeError unless `version` (default: the installed transformers) is in
    SUPPORTED_TRANSFORMERS. Returns the parsed version."""
    if version is None:
        import transformers
        version = transformers.__version__
    parsed = Version(str(version))
    if not SUPPORTED_TRANSFORMERS.contains(parsed, prereleases=True):
        raise RuntimeError(
            f"truthgpt_kernels.integrations.hf supports transformers {SUPPORTED_TRANSFORMERS}, "
            f"found {version}; install a supported one: pip install 'transformers{SUPPORTED_TRANSFORMERS}'")
    return parsed


def _visible(mask: torch.Tensor) -> torch.Tensor:
    if mask.dtype == torch.bool:
        return mask
    return mask == 0


def _additive(mask, query, key, causal, window):
    """The eager functions' float mask (0 visible, dtype min hidden) for a boolean or absent
    (sdpa's causal skip) mask; a float mask is returned as it is."""
    if mask is None:
        if not causal and window is None:
            return None
        from ..ops.reference import attention_visibility
        mask = attention_visibility(1, 1, query.shape[2], key.shape[2], causal=causal,
                                    window=window, device=query.device)
    if mask.dtype != torch.bool:
        return mask
    zero = torch.zeros((), dtype=query.dtype, device=query.device)
    return torch.where(mask, zero, torch.finfo(query.dtype).min)


def _eager_function(module):
    """The eager attention function of the module's own modeling file (Gemma 2's has softcap)."""
    fn = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
    if fn is None:
        raise RuntimeError(f"{type(module).__module__} has no eager_attention_forward")
    return fn


def _run(kind, module, query, key, value, attention_mask, *, causal, window, **kwargs):
    """Runs transformers' eager or sdpa function with our (boolean or absent) mask."""
    if kind == "eager":
        return _eager_function(module)(module, query, key, value,
                                       _additive(attention_mask, query, key, causal, window), **kwargs)
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def _replaced(module):
    """The implementation the patch replaced on this module's model: "eager" or "sdpa"."""
    return "eager" if getattr(module, "_truthgpt_replaced", "sdpa") == "eager" else "sdpa"


def _dead_rows(out, dead, module, query, key, value, kwargs, causal, window):
    """Query rows that see no key: what the replaced function gives, run on those rows only.
    out (B, Sq, Hq, D), dead (B, Sq) bool."""
    kind = _replaced(module)
    if kind == "sdpa":  # softcap cannot change a row without visible keys; sdpa refuses it
        kwargs = {**kwargs, "softcap": None}
    counts = dead.sum(dim=1)  # (B,)
    bs = counts.nonzero().squeeze(1)  # batch elements with such rows
    m = int(counts.max())
    # per batch element, its dead rows first (stable sort), cut to the largest count: one call
    order = torch.sort(dead[bs].to(torch.int8), dim=1, descending=True, stable=True).indices[:, :m]
    H, D = query.shape[1], query.shape[3]
    q = query[bs].gather(2, order[:, None, :, None].expand(-1, H, -1, D))  # (nb, Hq, m, D)
    mask = torch.zeros(bs.numel(), 1, m, key.shape[2], dtype=torch.bool, device=query.device)
    part, _ = _run(kind, module, q, key[bs], value[bs], mask, causal=causal, window=window, **kwargs)
    real = torch.arange(m, device=dead.device)[None] < counts[bs][:, None]  # (nb, m)
    rows_b = bs[:, None].expand(-1, m)[real]
    return out.index_put((rows_b, order[real]), part[real].to(out.dtype))


def _documents(query, key, attention_mask, kwargs, causal=True, window=None):
    """(cu_seqlens_q, cu_seqlens_k, max_q, max_k) when this call holds packed documents, else
    None. Two spellings: flash-attn's keyword arguments cu_seq_lens_q/k and max_length_q/k
    (one row, e.g. DataCollatorWithFlattening with return_flash_attn_kwargs=True), trusted as
    transformers' flash path trusts them; or position_ids that restart inside a row together
    with the 4-D mask transformers builds for packed rows (no cache, no padding mask: Sq ==
    Sk), checked to separate the documents. Where transformers' sdpa path does not treat the
    rows as packed (a padding mask, a cache: its mask lets a document see the one before),
    neither does this, so the patched model keeps the replaced function's results."""
    B, Sq, Sk = query.shape[0], query.shape[2], key.shape[2]
    cu_q = kwargs.get("cu_seq_lens_q")
    if cu_q is not None and B == 1:
        cu_k = kwargs.get("cu_seq_lens_k")
        cu_k = cu_q if cu_k is None else cu_k
        if int(cu_q[-1]) != Sq or int(cu_k[-1]) != Sk:
            return None
        max_q = kwargs.get("max_length_q") or int((cu_q[1:] - cu_q[:-1]).max())
        max_k = kwargs.get("max_length_k") or int((cu_k[1:] - cu_k[:-1]).max())
        return cu_q.to(torch.int32), cu_k.to(torch.int32), int(max_q), int(max_k)
    pos = kwargs.get("position_ids")
    if pos is None or attention_mask is None or attention_mask.dim() != 4 or Sq != Sk \
            or pos.shape[-1] != Sq:
        return None
    pos = pos.expand(B, Sq)
    if not bool((pos[:, 1:] != pos[:, :-1] + 1).any()):
        return None
    vis = _visible(attention_mask[..., -Sk:])
    if vis.shape[1] != 1 or vis.shape[0] not in (1, B):
        return None
    packed = Packed.from_position_ids(pos)
    # the mask must be exactly the documents' block-diagonal pattern (with the layer's causal
    # and window): a mask where a later document also sees a shared prefix (transformers'
    # test_custom_4d_attention_mask: position ids [0 1 2 3 3 3]) is not packed documents
    doc = torch.zeros(B * Sq, dtype=torch.int32, device=pos.device)
    doc[packed.cu_seqlens[1:-1].long()] = 1
    doc = doc.cumsum(0).view(B, Sq)
    from ..ops.reference import attention_visibility
    expected = (doc[:, :, None] == doc[:, None, :]) & attention_visibility(
        1, 1, Sq, Sk, causal=causal, window=window, device=pos.device)[0]
    if not torch.equal(vis[:, 0].expand(B, Sq, Sk), expected):
        return None
    return packed.cu_seqlens, packed.cu_seqlens, packed.max_seqlen, packed.max_seqlen


def _varlen(query, key, value, docs, causal, scaling, window, softcap, dropout=0.0):
    """Packed documents through tk.attention_varlen: (B, Sq, Hq, D) as transformers expects."""
    B, Hq, Sq, D = query.shape
    Hkv, Sk = key.shape[1], key.shape[2]

    def rows(t, H, S):
        return t.transpose(1, 2).reshape(B * S, H, D)  # (B * S, H, D)
    out = ops.attention_varlen(rows(query, Hq, Sq), rows(key, Hkv, Sk), rows(value, Hkv, Sk), *docs,
                               causal=causal, scale=scaling, window=window, softcap=softcap or 0.0,
                               dropout_p=dropout)
    return out.view(B, Sq, Hq, D)


# --- the "truthgpt" mask function: a 2-D padding mask where tk.attention serves the pattern -----

# attribute of the 2-D mask padding_mask returns: (causal, sliding_window) of the pattern it stands for
_PATTERN = "_truthgpt_mask_pattern"


def _cells(fn):
    """{free variable: value} of a closure ({} for anything else)."""
    code, closure = getattr(fn, "__code__", None), getattr(fn, "__closure__", None)
    if code is None or not closure or len(closure) != len(code.co_freevars):
        return {}
    try:
        return dict(zip(code.co_freevars, (c.cell_contents for c in closure)))
    except ValueError:  # an empty cell
        return {}


def _mask_pattern(mask_function, local_size):
    """(causal, sliding_window) of a transformers mask function whose pattern tk.attention serves
    exactly, identified by object: causal_mask_function (create_causal_mask), the
    and_masks(sliding_window_overlay(w), causal_mask_function) of
    sliding_window_causal_mask_function(w) with local_size == w (create_sliding_window_causal_mask),
    bidirectional_mask_function (create_bidirectional_mask). Anything else (packed sequences'
    remapped and block-diagonal masks, or_masks / and_masks overlays, chunked attention, a
    function of another version's making): None."""
    from transformers import masking_utils as mu
    if mask_function is mu.causal_mask_function:
        return (True, None) if local_size is None else None
    if mask_function is mu.bidirectional_mask_function:
        return (False, None) if local_size is None else None
    if getattr(mask_function, "__code__", None) is not mu.and_masks(mu.causal_mask_function).__code__:
        return None
    parts = _cells(mask_function).get("mask_functions")
    if not (isinstance(parts, tuple) and len(parts) == 2 and parts[1] is mu.causal_mask_function):
        return None
    overlay = parts[0]
    if getattr(overlay, "__code__", None) is not mu.sliding_window_overlay(1).__code__:
        return None
    w = _cells(overlay).get("sliding_window")
    if type(w) is int and w > 0 and w == local_size:
        return True, w
    return None


def padding_mask(*args, **kwargs):
    """transformers' AttentionMaskInterface entry for "truthgpt". For a pattern _mask_pattern
    identifies: None where no key is masked (the attention function then uses the module's own
    causal / sliding window, as transformers' flash-attention path does), else the (batch, L)
    boolean padding mask of the keys the attention will see, L <= kv_length, tagged with the
    pattern. L < kv_length only for a static cache, whose slots past L are not filled yet: the
    attention function keeps the first L keys. The queries are the last q_length of those L
    positions (bottom-right alignment), checked here. Other patterns, a mask that does not
    cover exactly the tokens up to the last query, calls of transformers 4.x (cache_position
    instead of q_length) and compilation: transformers' 4-D sdpa_mask, unchanged."""
    from transformers.masking_utils import causal_mask_function, sdpa_mask
    if args or "q_length" not in kwargs or kwargs.get("use_vmap") or torch.compiler.is_compiling():
        return sdpa_mask(*args, **kwargs)
    pattern = _mask_pattern(kwargs.get("mask_function", causal_mask_function), kwargs.get("local_size"))
    mask = kwargs.get("attention_mask")
    if pattern is None or (mask is not None and (mask.dim() != 2 or mask.dtype != torch.bool)):
        return sdpa_mask(**kwargs)
    q_length, kv_length = kwargs["q_length"], kwargs["kv_length"]
    q_offset, kv_offset = int(kwargs.get("q_offset", 0)), int(kwargs.get("kv_offset", 0))
    causal = pattern[0]
    # tokens the mask covers: [0, end); the keys are positions [kv_offset, end)
    end = mask.shape[-1] if mask is not None else q_offset + q_length if causal else kv_offset + kv_length
    start = 0  # the position of the mask's first column
    if causal and mask is not None and kv_offset > 0 and end == q_offset + q_length - kv_offset:
        # our own output passed in again, already cut to the keys [kv_offset, end): generate
        # makes a static sliding cache's masks ahead, then the model's forward once more
        start, end = kv_offset, q_offset + q_length
    length = end - kv_offset
    if (causal and end != q_offset + q_length) or not 0 < length <= kv_length:
        return sdpa_mask(**kwargs)
    if mask is None:
        if length == kv_length:
            return None
        mask = torch.ones(kwargs["batch_size"], length, dtype=torch.bool, device=kwargs.get("device", "cpu"))
    else:
        mask = mask[:, kv_offset - start:end - start]  # a new tensor: the tag stays off the caller's mask
        if length == kv_length and bool(mask.all()):
            return None
    setattr(mask, _PATTERN, pattern)
    return mask


def _window(sliding_window):
    return (sliding_window - 1, -1) if sliding_window else None


def _dead_queries(key_mask, Sq, causal, window):
    """(B, Sq) bool: the query rows that see no key, for queries bottom-right aligned on the
    key_mask (B, L) keys, from its prefix counts (no Sq x L mask)."""
    B, L = key_mask.shape
    counts = torch.nn.functional.pad(key_mask.to(torch.int32).cumsum(1), (1, 0))  # (B, L + 1)
    i = torch.arange(Sq, device=key_mask.device) + (L - Sq)  # query positions among the keys
    hi = i + 1 if causal else torch.full_like(i, L)
    lo = torch.zeros_like(i)
    if window is not None:
        left, right = window
        if left >= 0:
            lo = i - left
        if right >= 0:
            hi = torch.minimum(hi, i + right + 1)
    hi = hi.clamp(0, L)
    lo = torch.minimum(lo.clamp(0, L), hi)
    seen = counts[:, hi] - counts[:, lo]  # (B, Sq): visible keys per query
    return seen == 0


def _fallback_mask(key_mask, B, Sq, Sk, causal, window, device):
    """The 4-D boolean mask (B or 1, 1, Sq, Sk) a 2-D key_mask (B, L <= Sk) or None stands for,
    for the replaced function (dropout, attention weights): keys past L hidden."""
    from ..ops.reference import attention_visibility
    L = Sk if key_mask is None else key_mask.shape[1]
    vis = attention_visibility(B if key_mask is not None else 1, 1, Sq, L, causal=causal,
                               window=window, key_mask=key_mask, device=device)
    return torch.nn.functional.pad(vis, (0, Sk - L), value=False)


def _wants_weights(module, kwargs) -> bool:
    """output_attentions of the call, else of the module's config: transformers 5 passes the
    argument of a call, and None when the flag comes from the config (the weights are then
    collected from the attention modules' outputs)."""
    flag = kwargs.get("output_attentions")
    if flag is None:
        flag = getattr(getattr(module, "config", None), "output_attentions", False)
    return bool(flag)


def attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                      sliding_window=None, softcap=None, is_causal=None, **kwargs):
    """transformers attention-function signature: q (B, Hq, Sq, D), k/v (B, Hkv, Sk, D);
    returns (out (B, Sq, Hq, D), attention weights or None). attention_mask: None or a 2-D
    padding mask from padding_mask (the module's pattern, or the one the mask is tagged with),
    or a 4-D boolean / additive mask (checked, see the module docstring)."""
    Sq, Sk = query.shape[2], key.shape[2]
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    window = _window(sliding_window)
    fn_kwargs = dict(dropout=dropout, scaling=scaling, sliding_window=sliding_window,
                     softcap=softcap, is_causal=is_causal, **kwargs)
    if kwargs.get("position_bias") is not None:
        # a materialised additive bias (T5's forward, unpatched, with attn_implementation
        # "truthgpt"; a patched T5 passes its bias to tk.attention itself): the replaced function
        if attention_mask is not None and attention_mask.dim() == 2:
            pattern = getattr(attention_mask, _PATTERN, None)
            if pattern is not None:
                causal, window = pattern[0], _window(pattern[1])
            attention_mask = _fallback_mask(attention_mask[:, -Sk:], query.shape[0], Sq, Sk, causal,
                                            window, query.device)
        _logs.warn_once("hf-sdpa-fallback", _logs.HF_SDPA_FALLBACK, logger="integrations.hf")
        kind = "eager" if _wants_weights(module, kwargs) else _replaced(module)
        return _run(kind, module, query, key, value, attention_mask, causal=causal, window=window,
                    **fn_kwargs)
    if attention_mask is None or attention_mask.dim() == 2:
        pattern = None if attention_mask is None else getattr(attention_mask, _PATTERN, None)
        if pattern is not None:
            causal, window = pattern[0], _window(pattern[1])
        return _padding_attention(module, query, key, value, attention_mask, causal, window,
                                  scaling, softcap, fn_kwargs)
    if _wants_weights(module, kwargs):  # only the eager function returns weights
        _logs.warn_once("hf-sdpa-fallback", _logs.HF_SDPA_FALLBACK, logger="integrations.hf")
        return _run("eager", module, query, key, value, attention_mask, causal=causal,
                    window=window, **fn_kwargs)
    if torch.compiler.is_compiling():
        return _traced_4d(module, query, key, value, attention_mask, causal, window, scaling,
                          softcap, fn_kwargs)
    docs = _documents(query, key, attention_mask, kwargs, causal, window)
    if docs is not None:
        return _varlen(query, key, value, docs, causal, scaling, window, softcap, dropout), None
    key_mask = None
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
        return _run(_replaced(module), module, query, key, value, attention_mask, causal=causal,
                    window=window, **fn_kwargs)
    out = ops.attention(query, key, value, causal=causal, scale=scaling, window=window,
                        key_mask=key_mask, softcap=softcap or 0.0, dropout_p=dropout)
    out = out.transpose(1, 2).contiguous()
    dead = ~vis[:, 0].any(dim=-1)  # (B, Sq)
    if dead.any():
        out = _dead_rows(out, dead, module, query, key, value, fn_kwargs, causal, window)
    return out, None


def _traced_4d(module, query, key, value, attention_mask, causal, window, scaling, softcap,
               fn_kwargs):
    """attention_forward for a 4-D mask under torch.compile, where nothing may branch on the
    mask's values (padding_mask hands compiled calls transformers' 4-D sdpa mask). A boolean
    mask of one query row, a decoding step (with a static cache: (B, 1, 1, max_len), the unfilled
    slots hidden), says alone which keys that query sees: tk.attention with that row as the key
    mask (no causal / window: the mask has applied them). A query that sees no key gets zeros,
    as sdpa (a decoding step always sees its own key). Anything else, and dropout, runs the
    replaced function."""
    B, Sk = query.shape[0], key.shape[2]
    if query.shape[2] == 1 and attention_mask.dtype == torch.bool and attention_mask.shape[1] == 1 \
            and attention_mask.shape[-1] >= Sk and fn_kwargs["dropout"] == 0.0:
        key_mask = attention_mask[:, 0, 0, -Sk:].expand(B, Sk)  # (B, Sk)
        out = ops.attention(query, key, value, causal=False, scale=scaling, key_mask=key_mask,
                            softcap=softcap or 0.0)
        return out.transpose(1, 2).contiguous(), None
    return _run(_replaced(module), module, query, key, value, attention_mask, causal=causal,
                window=window, **fn_kwargs)


def _padding_attention(module, query, key, value, key_mask, causal, window, scaling, softcap,
                       fn_kwargs):
    """attention_forward for no mask or a 2-D padding mask (B, L): tk.attention with key_mask,
    on the first L keys (a static cache's slots past L are unfilled; keeping them out puts the
    bottom-right causal alignment on the last filled one). Packed documents and dropout as in
    the 4-D path; for attention weights the eager function gets the equivalent 4-D mask (the
    only (S x S) mask built on this path)."""
    B, Sq, Sk = query.shape[0], query.shape[2], key.shape[2]
    kwargs = {k: v for k, v in fn_kwargs.items()
              if k not in ("dropout", "scaling", "sliding_window", "softcap", "is_causal")}
    dropout = fn_kwargs["dropout"]
    if key_mask is not None and key_mask.shape[1] > Sk:  # not from padding_mask: its last Sk keys
        key_mask = key_mask[:, -Sk:]
    if _wants_weights(module, kwargs):
        _logs.warn_once("hf-sdpa-fallback", _logs.HF_SDPA_FALLBACK, logger="integrations.hf")
        mask = None
        # as transformers' sdpa mask: None only where sdpa's is_causal gives the pattern
        if key_mask is not None or (window is not None and Sk - 1 > window[0]) or (Sq != Sk and Sq != 1):
            mask = _fallback_mask(key_mask, B, Sq, Sk, causal, window, query.device)
        return _run("eager", module, query, key, value, mask, causal=causal, window=window, **fn_kwargs)
    if key_mask is None:
        docs = _documents(query, key, None, kwargs)
        if docs is not None:
            return _varlen(query, key, value, docs, causal, scaling, window, softcap, dropout), None
    L = Sk if key_mask is None else key_mask.shape[1]
    out = ops.attention(query, key[:, :, :L], value[:, :, :L], causal=causal, scale=scaling,
                        window=window, key_mask=key_mask, softcap=softcap or 0.0, dropout_p=dropout)
    out = out.transpose(1, 2).contiguous()
    if key_mask is not None and not torch.compiler.is_compiling():  # compiled: zeros, as sdpa
        dead = _dead_queries(key_mask, Sq, causal, window)
        if dead.any():  # the replaced function on all Sk keys, as the unpatched model
            out = _dead_rows(out, dead, module, query, key, value, fn_kwargs, causal, window)
    return out, None


def _register():
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface
    AttentionInterface.register(NAME, attention_forward)
    AttentionMaskInterface.register(NAME, padding_mask)


def _unregister():
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface
    AttentionInterface._global_mapping.pop(NAME, None)
    AttentionMaskInterface._global_mapping.pop(NAME, None)


def _cache_arg(module):
    """The keyword under which this transformers version passes the KV cache to the attention
    module; raises if the forward takes arguments the patched forward would not honour."""
    params = inspect.signature(type(module).forward).parameters
    named = {n for n, p in params.items() if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}
    cache = [n for n in _CACHE_ARGS if n in named]
    unknown = sorted(named - _KNOWN_ARGS)
    if unknown or len(cache) != 1:
        raise RuntimeError(
            f"truthgpt_kernels.integrations.hf cannot patch {type(module).__name__}.forward"
            f"({', '.join(params)}): it serves (hidden_states, position_embeddings, attention_mask, "
            f"one of {'/'.join(_CACHE_ARGS)}, [cache_position], **kwargs); the model was left unchanged")
    return cache[0]


def _attention_forward(self, hidden_states, position_embeddings=None, attention_mask=None,
                       cache=None, past_key_values=None, past_key_value=None, cache_position=None,
                       **kwargs):
    """The Llama-family attention forward, with rotary through tk.apply_rotary_qk. Takes the
    cache under each spelling transformers has used."""
    from transformers.cache_utils import Cache
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    given = [c for c in (cache, past_key_values, past_key_value) if c is not None]
    if len(given) > 1:
        raise TypeError("attention forward got the cache under more than one of "
                        f"{', '.join(_CACHE_ARGS)}")
    stray = [k for k, v in kwargs.items() if isinstance(v, Cache)]
    if stray:
        raise TypeError(f"attention forward got a cache as {stray[0]}=, which the truthgpt patch "
                        "does not know: this transformers version is not supported")
    cache = given[0] if given else None
    B, S = hidden_states.shape[:2]
    if self._truthgpt_qkv == "packed":  # Phi-3: one [q | k | v] projection
        q, k, v = self.qkv_proj(hidden_states).split(self._truthgpt_qkv_sizes, dim=-1)
    else:
        q, k, v = self.q_proj(hidden_states), self.k_proj(hidden_states), self.v_proj(hidden_states)
    if self._truthgpt_qk_norm == "projection":  # OLMo 2: RMSNorm over the whole q and k projections
        q, k = self.q_norm(q), self.k_norm(k)
    q = q.view(B, S, -1, self.head_dim).transpose(1, 2)  # (B, Hq, S, D)
    k = k.view(B, S, -1, self.head_dim).transpose(1, 2)  # (B, Hkv, S, D)
    v = v.view(B, S, -1, self.head_dim).transpose(1, 2)
    if self._truthgpt_qk_norm == "head":  # Gemma 3, Qwen3: RMSNorm of q and k per head
        q, k = self.q_norm(q), self.k_norm(k)
    cos, sin = position_embeddings  # (B or 1, S, R), halves repeated; R < D: partial rotary
    Bc, half = cos.shape[0], cos.shape[-1] // 2
    table_cos = cos[..., :half].reshape(Bc * S, half)  # one row per (batch, token)
    table_sin = sin[..., :half].reshape(Bc * S, half)
    # one table for the batch: rows 0..S-1 are the default positions (no ids to range-check)
    pos = None if Bc == 1 else torch.arange(Bc * S, device=q.device).view(Bc, S)
    q, k = ops.apply_rotary_qk(q, k, table_cos, table_sin, position_ids=pos)
    if getattr(self, "_truthgpt_cache_arg", "cache") == "cache":  # transformers 5: kwargs go on
        if cache_position is not None:
            kwargs["cache_position"] = cache_position
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx, kwargs=kwargs)
    elif cache is not None:  # transformers 4: cache_kwargs, as the replaced forward passes them
        k, v = cache.update(k, v, self.layer_idx, {"sin": sin, "cos": cos, "cache_position": cache_position})
    extra = {}
    if self.config.model_type in CONFIG_WINDOW:
        extra["sliding_window"] = getattr(self.config, "sliding_window", None)
    elif hasattr(self, "sliding_window"):
        extra["sliding_window"] = self.sliding_window
    if getattr(self, "attn_logit_softcapping", None):
        extra["softcap"] = self.attn_logit_softcapping
    impl = self.config._attn_implementation
    eager = _eager_function(self)
    if impl == "eager":  # not in the registry: the models fall back to their own function
        fn = eager
    elif hasattr(ALL_ATTENTION_FUNCTIONS, "get_interface"):
        fn = ALL_ATTENTION_FUNCTIONS.get_interface(impl, eager)
    else:
        fn = ALL_ATTENTION_FUNCTIONS[impl]
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


def _geglu_mlp_forward(self, x):
    return self.down_proj(ops.geglu(self.gate_proj(x), self.up_proj(x),
                                    approximate=self._truthgpt_approximate))


def _packed_swiglu_mlp_forward(self, x):
    """Phi-3: gate_up_proj gives [gate | up]; tk.swiglu takes it packed (up=None)."""
    return self.down_proj(ops.swiglu(self.gate_up_proj(x)))


def _linear_forward(self, x):
    return ops.linear(x, self.weight, self.bias, backend="auto")  # as tk.modules.Linear


def _plain_embedding(module) -> bool:
    """A plain nn.Embedding with none of the options tk.embedding leaves to torch."""
    return (type(module) is torch.nn.Embedding and module.max_norm is None
            and not module.scale_grad_by_freq and not module.sparse)


def _embedding_forward(self, ids):
    return ops.embedding(ids, self.weight, self.padding_idx)  # as tk.modules.Embedding


def _expert_matmul(x, weight, counts, offsets):
    """Rows of x (sorted by expert, counts[e] rows for expert e) times weight[e].T:
    (N, K) x (E, M, K) -> (N, M). On the CPU where tk.linear's backward is its own (bfloat16 /
    float16, and float32 where its GEMMs run on oneDNN: 1.1-2.2x grouped_mm's MKL GEMMs, see
    csrc/cpu/gemm_engine.h), tk.ops.grouped_linear: a GEMM per expert into one output, dx and
    the (E, M, K) weight gradient written in place (ops/grouped_linear.py). Elsewhere torch's
    grouped_mm where it takes the dtype (float32 / bf16 / fp16), else one tk.linear per expert
    on a split of x and an unbind of the weight."""
    if own_cpu_backward(x) and x.dtype == weight.dtype and not backends.unavailable_reason("cpu"):
        return grouped_linear(x, weight, offsets)
    grouped = getattr(torch.nn.functional, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)
    if grouped is not None and x.dtype in (torch.float32, torch.bfloat16, torch.float16) \
            and x.dtype == weight.dtype and x.shape[0] > 0:
        return grouped(x, weight.transpose(-2, -1), offs=offsets)
    ws = weight.unbind(0)
    parts = [ops.linear(xe, ws[e], backend="auto") for e, xe in enumerate(x.split(counts))]
    return torch.cat(parts) if parts else x.new_zeros(0, weight.shape[1])


def _experts_forward(self, hidden_states, top_k_index, top_k_weights):
    """transformers 5 fused experts (gate_up_proj (E, 2I, H) as [gate | up], down_proj (E, H, I)):
    the (token, slot) pairs are sorted by expert, each expert's rows go through its gate_up GEMM
    (one grouped GEMM for all experts), one tk.swiglu over every routed row, the down GEMM, and
    are weighted and summed back per token in a fixed order (no atomics). The routing
    (top_k_index, top_k_weights from the router) is used as given. hidden_states (T, H),
    top_k_* (T, K). An index outside [0, E) (a dropped token under expert parallelism)
    contributes nothing, as in transformers."""
    T, K = top_k_index.shape
    E = self.gate_up_proj.shape[0]
    idx = top_k_index.reshape(-1)                                   # (T K,)
    idx = torch.where((idx >= 0) & (idx < E), idx, E)              # dropped pairs sort last
    order = torch.argsort(idx, stable=True)                         # (T K,) pairs by expert
    counts = torch.bincount(idx, minlength=E + 1)[:E]
    n = int(counts.sum())
    order = order[:n]
    offsets = torch.cumsum(counts, 0, dtype=torch.int32)
    counts = counts.tolist()
    # (index_select, not indexing: its backward is an index_add_, ~5x faster on the CPU than
    # indexing's accumulating index_put_: 0.5 vs 2.7 ms fwd+bwd for 2048 x 512 float32)
    x = hidden_states.index_select(0, order // K)                   # (n, H)
    h = _expert_matmul(x, self.gate_up_proj, counts, offsets)       # (n, 2I) [gate | up]
    h = _expert_matmul(ops.swiglu(h), self.down_proj, counts, offsets)  # (n, H)
    h = h * top_k_weights.reshape(-1)[order, None].to(h.dtype)
    out = h.new_zeros(T * K, h.shape[-1]).index_copy(0, order, h)  # each pair once: exact
    return out.view(T, K, -1).sum(1).to(hidden_states.dtype)


@functools.lru_cache(maxsize=None)
def _parameter_names(fn):
    """fn's parameters but self, in order (cached: inspect.signature costs tens of us a call,
    and the patched forward runs once per generated token)."""
    return [n for n in inspect.signature(fn).parameters if n != "self"]


def _causal_lm_forward(self, *args, skip_logits=None, **kwargs):
    """The *ForCausalLM forward with the loss through tk.linear_cross_entropy (see the module
    docstring for when); otherwise the class's own forward."""
    orig = type(self).forward
    names = _parameter_names(orig)
    kwargs.update(zip(names, args))  # positional arguments by name
    labels, shift_labels = kwargs.get("labels"), kwargs.get("shift_labels")
    if skip_logits is None:  # as Liger; like the model's own forward, no loss without labels
        skip_logits = self.training and labels is not None
    if skip_logits and labels is None:
        raise ValueError("skip_logits=True needs labels: the loss is the only output")
    logits_to_keep = kwargs.get("logits_to_keep", 0)
    return_dict = kwargs.get("return_dict")
    if return_dict is None:
        return_dict = getattr(self.config, "return_dict", True)
    router_logits = kwargs.get("output_router_logits")  # MoE: the loss adds the router's aux loss
    if router_logits is None:
        router_logits = getattr(self.config, "output_router_logits", False)
    if not skip_logits or not return_dict or router_logits or \
            not (isinstance(logits_to_keep, int) and logits_to_keep == 0):
        return orig(self, **kwargs)
    for name in ("labels", "shift_labels", "logits_to_keep", "return_dict"):
        kwargs.pop(name, None)
    num_items = kwargs.get("num_items_in_batch")  # also passed on, as the original forward does
    outputs = self.model(**kwargs)
    hidden = outputs[0]
    if shift_labels is None:  # tokens < n predict n, as ForCausalLMLoss
        shift_labels = torch.nn.functional.pad(labels, (0, 1), value=-100)[..., 1:]
    head = self.lm_head
    loss = ops.linear_cross_entropy(
        hidden.reshape(-1, hidden.shape[-1]), head.weight,
        shift_labels.reshape(-1).to(device=hidden.device, dtype=torch.int64), bias=head.bias,
        ignore_index=-100, reduction="mean" if num_items is None else "sum",
        logit_softcap=getattr(self.config, "final_logit_softcapping", None) or 0.0,
        loss_dtype=torch.float32)  # as ForCausalLMLoss's upcast logits (float64 keeps float64)
    if num_items is not None:
        loss = loss / (num_items.to(loss.device) if torch.is_tensor(num_items) else num_items)
    from transformers.modeling_outputs import CausalLMOutputWithPast
    extra = {name: getattr(outputs, name, None) for name in _CACHE_FIELDS or _cache_fields()}
    return CausalLMOutputWithPast(loss=loss, logits=None, hidden_states=outputs.hidden_states,
                                  attentions=outputs.attentions, **extra)


_CACHE_FIELDS = None  # (a tuple once set)


def _cache_fields() -> tuple:
    """The cache field of transformers' CausalLMOutputWithPast ("cache" in 5.x, before that
    "past_key_values"), kept in _CACHE_FIELDS; apply_to calls this first, so that
    torch.compile(fullgraph=True) of a patched forward reads a constant (dataclasses.fields
    does not trace)."""
    global _CACHE_FIELDS
    from transformers.modeling_outputs import CausalLMOutputWithPast
    fields = {f.name for f in dataclasses.fields(CausalLMOutputWithPast)}
    _CACHE_FIELDS = tuple(name for name in ("cache", "past_key_values") if name in fields)
    return _CACHE_FIELDS


def _fusable_loss(model):
    """Whether `model` is a *ForCausalLM whose loss _causal_lm_forward computes exactly: a
    decoder `model`, an `lm_head` Linear and transformers' ForCausalLMLoss."""
    try:
        from transformers.loss.loss_utils import ForCausalLMLoss
    except ImportError:  # pragma: no cover - every supported version has it
        return False
    return (type(model).__name__.endswith("ForCausalLM") and isinstance(getattr(model, "lm_head", None), torch.nn.Linear)
            and isinstance(getattr(model, "model", None), torch.nn.Module)
            and getattr(model, "loss_function", None) is ForCausalLMLoss)


# --- T5 / mT5: encoder-decoder attention with the relative position bias in the kernel ---------

# mT5's modeling file is T5's, copied (its classes are MT5*); UMT5's attention has its own
# forward signature and a table in every layer (no bias passed between layers)
T5_TYPES = ("t5", "mt5", "umt5")
# T5Attention.forward's named parameters in transformers 5.x, which _t5_attention_forward serves
_T5_ATTENTION_ARGS = {"self", "hidden_states", "mask", "key_value_states", "position_bias", "cache"}
_UMT5_ATTENTION_ARGS = {"self", "hidden_states", "encoder_hidden_states", "cache", "attention_mask"}
_T5_CLASSES = {f"{p}{c}": kind for p in ("T5", "MT5", "UMT5")
               for c, kind in (("Attention", "attention"), ("LayerNorm", "rms_norm"), ("DenseGatedActDense", "mlp"))}
_HALF = (torch.float16, torch.bfloat16)


class _T5Bias:
    """What a patched T5 stack passes from its first layer to the later ones as `position_bias`
    in place of transformers' materialised (1, H, Sq, Sk) tensor: the attention module that
    owns the stack's relative_attention_bias table. Only _t5_attention_forward reads it."""
    __slots__ = ("owner",)

    def __init__(self, owner):
        self.owner = owner

    def table(self):
        """tk.attention's rel_bias: (H, num_buckets), float32 (float64 kept)."""
        w = self.owner.relative_attention_bias.weight.t()
        return w if w.dtype in (torch.float32, torch.float64) else w.float()

    def buckets(self):
        o = self.owner
        return (not o.is_decoder, o.relative_attention_num_buckets, o.relative_attention_max_distance)

    def materialise(self, Sq, Sk, device, past):
        """transformers' tensor, for the replaced attention function."""
        return self.owner.compute_bias(Sq, Sk, device=device, past_seen_tokens=past)


def _t5_served_mask(mask, B, Sk, causal):
    """Whether tk.attention serves this call's mask exactly: None, or the (B, L <= Sk) boolean
    key padding mask padding_mask builds for the layer's own pattern (causal for the decoder's
    self-attention, bidirectional otherwise)."""
    if mask is None:
        return True
    if mask.dim() != 2 or mask.dtype != torch.bool or mask.shape[0] != B or mask.shape[1] > Sk:
        return False
    return getattr(mask, _PATTERN, (causal, None)) == (causal, None)


def _t5_attention_forward(self, hidden_states, mask=None, key_value_states=None, position_bias=None,
                          cache=None, past_key_values=None, **kwargs):
    """T5Attention.forward of transformers 5.x (projections q / k / v / o, the cache: DynamicCache,
    EncoderDecoderCache with its cross-attention reuse, StaticCache) with the attention through
    tk.attention: self-attention adds the stack's relative position bias in the kernel
    (rel_bias = the first layer's table, T5's bucketing, scale 1, causal in the decoder),
    cross-attention has none; the padding mask is key_mask. No (Sq, Sk) bias is built: the
    position_bias passed on to the later layers is a _T5Bias. The replaced attention function
    (the model's eager / sdpa, with transformers' materialised bias) runs instead for attention
    weights, a mask that is not a key padding mask, query rows that see no key (eager and sdpa
    give them a uniform softmax over every key, with gradients to q and k), an attention
    implementation chosen after the patch, or a materialised position_bias passed in."""
    from transformers.cache_utils import EncoderDecoderCache
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    if past_key_values is not None:  # the deprecated spelling the replaced forward maps to cache
        if cache is not None:
            raise TypeError("T5 attention forward got both cache= and past_key_values=")
        cache = past_key_values
    B, Sq = hidden_states.shape[:2]
    D = self.key_value_proj_dim
    past = cache.get_seq_length(self.layer_idx) if cache is not None else 0
    past = past.clone() if isinstance(past, torch.Tensor) else past  # StaticCache: before the update
    cross = key_value_states is not None
    q = self.q(hidden_states).view(B, Sq, -1, D).transpose(1, 2)  # (B, H, Sq, D)
    is_updated, curr = False, cache
    if isinstance(cache, EncoderDecoderCache):
        is_updated = cache.is_updated.get(self.layer_idx)
        curr = cache.cross_attention_cache if cross else cache.self_attention_cache
    states = key_value_states if cross else hidden_states
    if cross and cache is not None and is_updated:  # the encoder's keys / values, cached
        k, v = curr.layers[self.layer_idx].keys, curr.layers[self.layer_idx].values
    else:
        kv_shape = (*states.shape[:-1], -1, D)
        k = self.k(states).view(kv_shape).transpose(1, 2)
        v = self.v(states).view(kv_shape).transpose(1, 2)
        if cache is not None:
            k, v = curr.update(k, v, self.layer_idx, kwargs=kwargs)
            if cross and isinstance(cache, EncoderDecoderCache):
                cache.is_updated[self.layer_idx] = True
    Sk = k.shape[2]
    causal = bool(getattr(self, "is_causal", False)) and not cross
    dropout = self.dropout if self.training else 0.0
    if isinstance(position_bias, _T5Bias) or position_bias is None:
        bias = position_bias
        if bias is None and self.has_relative_attention_bias and not cross:
            bias = _T5Bias(self)  # this is the stack's first layer
        tensor_bias = None
    else:
        bias, tensor_bias = None, position_bias
    impl = self.config._attn_implementation
    served = (impl == NAME and tensor_bias is None and not _wants_weights(self, kwargs)
              and _t5_served_mask(mask, B, Sk, causal)
              and (not cross or Sk == key_value_states.shape[1]))
    if served and mask is not None and not torch.compiler.is_compiling():
        served = not bool(_dead_queries(mask, Sq, causal, None).any())
    if served:
        L = Sk if mask is None else mask.shape[1]  # a static cache's unfilled slots stay out
        out = ops.attention(q, k[:, :, :L], v[:, :, :L], causal=causal, scale=self.scaling,
                            key_mask=mask, rel_bias=None if bias is None else bias.table(),
                            rel_buckets=None if bias is None else bias.buckets(), dropout_p=dropout)
        out = out.transpose(1, 2).reshape(B, Sq, -1).contiguous()
        return self.o(out), (None if cross else bias), None
    # the replaced function with transformers' tensors
    if tensor_bias is None:
        if bias is not None:
            tensor_bias = bias.materialise(Sq, Sk, q.device, past)
        else:
            tensor_bias = torch.zeros((1, self.n_heads, Sq, Sk), device=q.device, dtype=q.dtype)
            if self.gradient_checkpointing and self.training:
                tensor_bias.requires_grad = True
    fn_kwargs = dict(dropout=dropout, scaling=self.scaling, position_bias=tensor_bias, **kwargs)
    if impl != NAME:  # chosen after the patch: that function, as the replaced forward runs it
        eager = _eager_function(self)
        fn = eager if impl == "eager" else ALL_ATTENTION_FUNCTIONS.get_interface(impl, eager)
        out, weights = fn(self, q, k, v, mask, **fn_kwargs)
    else:
        _logs.warn_once("hf-sdpa-fallback", _logs.HF_SDPA_FALLBACK, logger="integrations.hf")
        if mask is not None and mask.dim() == 2:
            mask = _fallback_mask(mask[:, -Sk:], B, Sq, Sk, causal, None, q.device)
        kind = "eager" if _wants_weights(self, kwargs) else _replaced(self)
        out, weights = _run(kind, self, q, k, v, mask, causal=causal, window=None, **fn_kwargs)
    out = out.reshape(B, Sq, -1).contiguous()
    return self.o(out), tensor_bias, weights


def _umt5_attention_forward(self, hidden_states, encoder_hidden_states=None, cache=None, attention_mask=None,
                            past_key_values=None, **kwargs):
    """UMT5Attention.forward of transformers 5.x: _t5_attention_forward with this layer's own
    table (UMT5 has one per layer and passes no bias between layers); returns (out, weights)."""
    out, _, weights = _t5_attention_forward(self, hidden_states, mask=attention_mask,
                                            key_value_states=encoder_hidden_states, position_bias=None,
                                            cache=cache, past_key_values=past_key_values, **kwargs)
    return out, weights


def _t5_layer_norm_forward(self, x):
    """T5LayerNorm: x * rsqrt(mean(x^2) + eps) * weight, the mean of squares in float32; with a
    float16 / bfloat16 weight the normalised x is rounded to the weight's dtype before the
    product (in that dtype), as T5 does; otherwise the product is in torch's promoted dtype."""
    w, eps = self.weight, self.variance_epsilon
    if w.dtype in _HALF:
        return w * ops.rms_norm(x, None, eps).to(w.dtype)
    dtype = torch.promote_types(torch.promote_types(x.dtype, torch.float32), w.dtype)
    x = x.to(dtype)
    return ops.rms_norm(x, w if w.dtype in (dtype, torch.float32) else w.to(dtype), eps)


def _t5_gated_ffn_forward(self, x):
    """T5DenseGatedActDense: act(wi_0 x) * wi_1 x in one tk.geglu / tk.swiglu, dropout, and wo
    (in its own dtype: flan-T5 keeps wo in float32)."""
    gate, up = self.wi_0(x), self.wi_1(x)
    if self._truthgpt_approximate is None:
        h = ops.swiglu(gate, up)
    else:
        h = ops.geglu(gate, up, approximate=self._truthgpt_approximate)
    h = self.dropout(h)
    w = self.wo.weight
    if isinstance(w, torch.Tensor) and h.dtype != w.dtype and w.dtype != torch.int8:
        h = h.to(w.dtype)
    return self.wo(h)


def _plan_t5_attention(module, config):
    params = inspect.signature(type(module).forward).parameters
    named = {n for n, p in params.items() if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}
    forward = {frozenset(_T5_ATTENTION_ARGS): _t5_attention_forward,
               frozenset(_UMT5_ATTENTION_ARGS): _umt5_attention_forward}.get(frozenset(named))
    if forward is None:
        return (f"forward({', '.join(params)}) is not transformers 5's T5 "
                "(hidden_states, mask, key_value_states, position_bias, cache, **kwargs) nor UMT5 "
                "(hidden_states, encoder_hidden_states, cache, attention_mask, **kwargs)")
    need = ("q", "k", "v", "o", "key_value_proj_dim", "n_heads", "has_relative_attention_bias",
            "layer_idx", "is_decoder", "scaling", "dropout", "compute_bias")
    missing = [n for n in need if not hasattr(module, n)]
    if missing:
        return f"no {' / '.join(missing)}"
    if module.has_relative_attention_bias:
        table = getattr(getattr(module, "relative_attention_bias", None), "weight", None)
        if not isinstance(table, torch.Tensor) or tuple(table.shape) != (
                module.relative_attention_num_buckets, module.n_heads):
            return "relative_attention_bias is not a (num_buckets, heads) table"
    _eager_function(module)
    return forward, {"_truthgpt_replaced": config._attn_implementation}


def _plan_t5_layer_norm(module):
    if not isinstance(getattr(module, "weight", None), torch.Tensor) or not hasattr(module, "variance_epsilon"):
        return "no weight / variance_epsilon"
    return _t5_layer_norm_forward, {}


def _plan_t5_gated_ffn(module, act):
    if not all(isinstance(getattr(module, n, None), torch.nn.Module) for n in ("wi_0", "wi_1", "wo", "dropout")):
        return "no wi_0 / wi_1 / wo / dropout"
    if act in _SILU:
        return _t5_gated_ffn_forward, {"_truthgpt_approximate": None}
    if act in GELU_ACTS:
        return _t5_gated_ffn_forward, {"_truthgpt_approximate": GELU_ACTS[act]}
    return f"activation {act!r} (served: {', '.join(_SILU + tuple(GELU_ACTS))})"


def _t5_planner(module, config):
    """(kind, planner) for a module of a T5 / mT5 model that the patch serves, else None (T5's
    plain ReLU feed-forward, T5DenseActDense, is left as it is: no kernel to gain)."""
    kind = _T5_CLASSES.get(type(module).__name__)
    if kind == "attention":
        return kind, lambda m: _plan_t5_attention(m, config)
    if kind == "rms_norm":
        return kind, _plan_t5_layer_norm
    if kind == "mlp":
        return kind, lambda m: _plan_t5_gated_ffn(m, getattr(config, "dense_act_fn", None))
    return None


def _set_attn_implementation(model, name):
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(name)
    else:
        model.config._attn_implementation = name


_SILU = ("silu", "swish")
_EXPERT_FLAGS = {"has_gate": True, "has_bias": False, "is_transposed": False, "is_concatenated": True,
                 "has_post_expert_norm": False}


def _plan_attention(module, config):
    """(forward, attrs) or a reason string. An attention forward this patch does not know (its
    signature) raises RuntimeError, as before."""
    has = functools.partial(hasattr, module)
    if not all(map(has, ("o_proj", "layer_idx", "head_dim", "scaling"))):
        return "no o_proj / layer_idx / head_dim / scaling"
    D = module.head_dim
    nq = config.num_attention_heads * D
    nkv = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    nkv *= D
    if all(map(has, ("q_proj", "k_proj", "v_proj"))):
        qkv, sizes = "separate", None
    elif isinstance(getattr(module, "qkv_proj", None), torch.nn.Linear):
        qkv, sizes = "packed", [nq, nkv, nkv]
        if module.qkv_proj.out_features != nq + 2 * nkv:
            return f"qkv_proj gives {module.qkv_proj.out_features} features, not q + k + v = {nq + 2 * nkv}"
    else:
        return "no q_proj / k_proj / v_proj nor a packed qkv_proj"
    norm = None
    if getattr(module, "q_norm", None) is not None or getattr(module, "k_norm", None) is not None:
        q_size = getattr(getattr(module, "q_norm", None), "weight", torch.empty(0)).shape[-1:]
        k_size = getattr(getattr(module, "k_norm", None), "weight", torch.empty(0)).shape[-1:]
        if q_size == (D,) and k_size == (D,):
            norm = "head"  # Gemma 3, Qwen3
        elif q_size == (nq,) and k_size == (nkv,):
            norm = "projection"  # OLMo 2
        else:
            return f"q_norm / k_norm over {tuple(q_size)} / {tuple(k_size)}: neither a head ({D}) nor the projections"
    _eager_function(module)
    return _attention_forward, {"_truthgpt_cache_arg": _cache_arg(module),
                                "_truthgpt_replaced": config._attn_implementation,
                                "_truthgpt_qkv": qkv, "_truthgpt_qkv_sizes": sizes,
                                "_truthgpt_qk_norm": norm}


def _plan_rms_norm(module, model_type):
    if not isinstance(getattr(module, "weight", None), torch.Tensor):
        return "no weight"
    if model_type in GEMMA:
        return (_gemma_rms_norm_forward, {}) if hasattr(module, "eps") else "no eps"
    return (_rms_norm_forward, {}) if hasattr(module, "variance_epsilon") else "no variance_epsilon"


def _plan_mlp(module, act):
    has = functools.partial(hasattr, module)
    if all(map(has, ("gate_proj", "up_proj", "down_proj"))):
        if act in _SILU:
            return _swiglu_mlp_forward, {}
        if act in GELU_ACTS:
            return _geglu_mlp_forward, {"_truthgpt_approximate": GELU_ACTS[act]}
        return f"activation {act!r} (served: {', '.join(_SILU + tuple(GELU_ACTS))})"
    if isinstance(getattr(module, "gate_up_proj", None), torch.nn.Linear) and has("down_proj"):
        if act in _SILU:
            return _packed_swiglu_mlp_forward, {}
        return f"packed gate_up_proj with activation {act!r} (served: {', '.join(_SILU)})"
    return "no gate_proj / up_proj / down_proj nor a packed gate_up_proj"


def _plan_experts(module, act):
    gu, down = getattr(module, "gate_up_proj", None), getattr(module, "down_proj", None)
    if not (isinstance(gu, torch.Tensor) and isinstance(down, torch.Tensor) and gu.dim() == 3 and down.dim() == 3):
        return "no 3-D gate_up_proj / down_proj parameters (a per-expert module list is not served)"
    E, I2, H = gu.shape
    if I2 % 2 or tuple(down.shape) != (E, H, I2 // 2):
        return f"gate_up_proj {tuple(gu.shape)} and down_proj {tuple(down.shape)} are not (E, 2I, H) and (E, H, I)"
    for flag, want in _EXPERT_FLAGS.items():
        if getattr(module, flag, want) != want:
            return f"{flag}={not want} (served: {want})"
    if act not in _SILU:
        return f"activation {act!r} (served: {', '.join(_SILU)})"
    names = [n for n in inspect.signature(type(module).forward).parameters][:4]
    if names != ["self", "hidden_states", "top_k_index", "top_k_weights"]:
        return f"forward({', '.join(names)}) is not (hidden_states, top_k_index, top_k_weights)"
    return _experts_forward, {}


def _plan(model, config, model_type, fused_loss):
    """{kind: [(module, forward, attrs)]} and {kind: reason} for the kinds left: a kind with one
    module that cannot be served is left whole (nothing half-patched)."""
    act = getattr(config, "hidden_act", None) or getattr(config, "hidden_activation", None)
    planners = (("Attention", "attention", lambda m: _plan_attention(m, config)),
                ("RMSNorm", "rms_norm", lambda m: _plan_rms_norm(m, model_type)),
                ("MLP", "mlp", lambda m: _plan_mlp(m, act)),
                ("Experts", "experts", lambda m: _plan_experts(m, act)))
    plan, left = {k: [] for k in KINDS}, {}
    for module in model.modules():
        if type(module) is torch.nn.Linear:
            plan["linear"].append((module, _linear_forward, {}))
            continue
        if _plain_embedding(module):
            plan["embedding"].append((module, _embedding_forward, {}))
            continue
        cls = type(module).__name__
        if model_type in T5_TYPES:
            found = _t5_planner(module, config)
        else:  # the first planner whose class-name suffix matches
            found = next(((kind, planner) for suffix, kind, planner in planners if cls.endswith(suffix)), None)
        if found is not None:
            kind, planner = found
            got = planner(module)
            if isinstance(got, str):
                left.setdefault(kind, f"{cls}: {got}")
            else:
                plan[kind].append((module, *got))
    if fused_loss and _fusable_loss(model):
        _cache_fields()  # (now, outside any compiled region)
        plan["loss"].append((model, _causal_lm_forward, {"_truthgpt_signature_of": type(model).forward}))
    for kind in left:
        plan[kind] = []
    return plan, left


def _text_tower(model):
    """The module apply_to patches: the model itself for a SUPPORTED model_type; for a
    vision-language model whose text_config is of a SUPPORTED family, its language model (the
    vision tower and the projector stay as they are); else None."""
    config = getattr(model, "config", None)
    if getattr(config, "model_type", None) in SUPPORTED:
        return model
    text = getattr(config, "text_config", None)
    if getattr(text, "model_type", None) not in SUPPORTED:
        return None
    for owner in (getattr(model, "model", None), model):  # transformers 5: model.model.language_model
        lm = getattr(owner, "language_model", None)
        if isinstance(lm, torch.nn.Module) and getattr(lm, "config", None) is text:
            return lm
    return None


def apply_to(model, *, fused_loss: bool = True):
    """Patches a model instance of a SUPPORTED family in place; returns it. fused_loss: a
    *ForCausalLM's training loss through tk.linear_cross_entropy without logits (module
    docstring). Other model types are left untouched with a warning; a transformers version
    outside SUPPORTED_TRANSFORMERS, or an attention forward this patch does not know, raises
    RuntimeError before anything is changed. A module kind (attention, rms_norm, mlp, experts)
    with a module this patch cannot serve (attributes it does not know, an activation it has
    no kernel for) is left whole, with a warning and its reason in
    model.truthgpt_patched["left"]. A model already patched is returned as it is."""
    tower = _text_tower(model)
    config = getattr(tower, "config", None)
    model_type = getattr(config, "model_type", None)
    if tower is None:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        warnings.warn(f"truthgpt_kernels.integrations.hf.apply_to supports {', '.join(SUPPORTED)}; "
                      f"{model_type or type(model).__name__} was left unchanged", stacklevel=2)
        return model
    if getattr(model, _STATE, None) is not None:
        return model
    check_transformers_version()
    plan, left = _plan(tower, config, model_type, fused_loss and tower is model)
    if left:
        warnings.warn("truthgpt_kernels.integrations.hf.apply_to left these module kinds unpatched: " +
                      "; ".join(f"{kind} ({why})" for kind, why in left.items()), stacklevel=2)
    _register()
    state = {"attn_implementation": config._attn_implementation, "modules": [], "tower": tower}
    patched = {kind: len(entries) for kind, entries in plan.items()}
    for module, forward, attrs in (entry for entries in plan.values() for entry in entries):
        signature_of = attrs.pop("_truthgpt_signature_of", None)
        state["modules"].append((module, module.__dict__.get("forward"), list(attrs)))
        module.forward = _BoundForward(forward, module, signature_of=signature_of)
        for name, value in attrs.items():
            setattr(module, name, value)
    if plan["attention"]:
        _set_attn_implementation(tower, NAME)
    setattr(model, _STATE, state)
    model.truthgpt_patched = {**patched, "left": left}
    _patched_models.add(model)
    return model


def revert(model):
    """Undoes apply_to on this model: the original forwards, and the attention implementation the
    patch replaced (unless another one was chosen since). The "truthgpt" registry entries stay
    (attn_implementation="truthgpt" keeps working; _unregister() removes them). Returns the
    model; a model not patched is returned as it is."""
    state = getattr(model, _STATE, None)
    if state is None:
        return model
    for module, forward, attrs in state["modules"]:
        if forward is None:
            del module.forward
        else:
            module.forward = forward
        for name in attrs:
            delattr(module, name)
    tower = state["tower"]
    if tower.config._attn_implementation == NAME:
        _set_attn_implementation(tower, state["attn_implementation"])
    delattr(model, _STATE)
    del model.truthgpt_patched
    _patched_models.discard(model)
    return model


# --- class-level entry points -----------------------------------------------------------------

_class_patches = {}  # family -> [(class, __init__ in its __dict__ or None)]
_building = threading.local()  # depth of patched __init__ calls: only the outermost model patches


def _family_module(family):
    import importlib
    if family not in SUPPORTED:
        raise ValueError(f"family must be one of {', '.join(SUPPORTED)}, got {family!r}")
    name = _FAMILY_MODULES.get(family, family)
    return importlib.import_module(f"transformers.models.{name}.modeling_{name}")


def _patching_init(init, options):
    @functools.wraps(init)
    def __init__(self, *args, **kwargs):
        depth = getattr(_building, "depth", 0)
        _building.depth = depth + 1
        try:
            init(self, *args, **kwargs)
        finally:
            _building.depth = depth
        if depth == 0:  # the model being built, not one of its sub-models
            apply_to(self, **options)
    return __init__


def apply_to_class(family, *, fused_loss: bool = True):
    """Patches the model classes of one SUPPORTED family (its model_type, e.g. "qwen3"), as
    Liger's apply_liger_kernel_to_<family>: every model of the family built afterwards (a class's
    constructor, from_config, from_pretrained) is passed to apply_to(model, fused_loss=...).
    Models built before are untouched. revert_class(family) undoes it. Calling it again replaces
    the options."""
    check_transformers_version()
    module = _family_module(family)
    from transformers import PreTrainedModel
    revert_class(family)
    patched = []
    for obj in vars(module).values():
        if (isinstance(obj, type) and issubclass(obj, PreTrainedModel) and obj.__module__ == module.__name__
                and getattr(getattr(obj, "config_class", None), "model_type", None) == family):
            patched.append((obj, obj.__dict__.get("__init__")))
            obj.__init__ = _patching_init(obj.__init__, {"fused_loss": fused_loss})
    _class_patches[family] = patched
    return [cls.__name__ for cls, _ in patched]


def revert_class(family):
    """Undoes apply_to_class(family): models built afterwards are not patched (those built
    before stay patched; revert(model) undoes one)."""
    for cls, init in _class_patches.pop(family, []):
        if init is None:
            del cls.__init__
        else:
            cls.__init__ = init


class AutoTruthgptForCausalLM:
    """transformers.AutoModelForCausalLM, then apply_to: from_config(config, fused_loss=True,
    **kwargs) and from_pretrained(path, fused_loss=True, **kwargs) return a patched model (a
    family outside SUPPORTED is returned unpatched with apply_to's warning)."""

    def __init__(self):
        raise TypeError("AutoTruthgptForCausalLM is built with from_config or from_pretrained")

    @staticmethod
    def from_config(config, *args, fused_loss: bool = True, **kwargs):
        from transformers import AutoModelForCausalLM
        return apply_to(AutoModelForCausalLM.from_config(config, *args, **kwargs), fused_loss=fused_loss)

    @staticmethod
    def from_pretrained(path, *args, fused_loss: bool = True, **kwargs):
        from transformers import AutoModelForCausalLM
        return apply_to(AutoModelForCausalLM.from_pretrained(path, *args, **kwargs), fused_loss=fused_loss)


def _register_on_import():
    """attn_implementation="truthgpt" in from_config / from_pretrained once this module is
    imported (the attention function only; apply_to swaps the rest)."""
    try:
        check_transformers_version()
        _register()
    except (ImportError, RuntimeError):  # transformers missing or unsupported: apply_to says so
        pass


_register_on_import()
