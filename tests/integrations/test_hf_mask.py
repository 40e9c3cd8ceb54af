"""The "truthgpt" mask function (issues #14, #15): on the patterns tk.attention serves (causal,
sliding-window causal, bidirectional, with optional padding) transformers' mask creators get
None or the 2-D padding mask, never an (S x S) mask, and the patched model still equals the
unpatched one (logits, gradients, generate with dynamic and static caches); any other pattern
gets transformers' 4-D sdpa mask unchanged. Tiny random models (float64; Gemma 2, eager only,
in float32: float64 eager gives NaN on rows that see no key)."""
import copy

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

transformers = pytest.importorskip("transformers")
mu = pytest.importorskip("transformers.masking_utils")
if not hasattr(mu, "find_packed_sequence_indices") or "q_length" not in \
        __import__("inspect").signature(mu.sdpa_mask).parameters:  # pragma: no cover
    pytest.skip("transformers 4.x: the mask function falls back to sdpa_mask", allow_module_level=True)

from truthgpt_kernels.integrations import hf  # noqa: E402
from truthgpt_kernels.ops import reference  # noqa: E402
from .test_hf import COMMON  # noqa: E402

GEMMA3_LAYERS = ["sliding_attention", "full_attention"]
MODELS = {  # name: (config, model, extra config, implementation replaced, dtype)
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}, "sdpa", torch.float64),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": 6}, "sdpa", torch.float64),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}, "sdpa", torch.float64),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", {"head_dim": 16, "sliding_window": 6,
                                                     "attn_logit_softcapping": 20.0}, "eager", torch.float32),
    "gemma3_text": ("Gemma3TextConfig", "Gemma3ForCausalLM", {"head_dim": 16, "sliding_window": 6,
                                                              "layer_types": GEMMA3_LAYERS}, "sdpa", torch.float64),
}
SEQ = 16  # longer than the sliding windows (6)


def make(name):
    cfg_cls, model_cls, extra, impl, dtype = MODELS[name]
    cfg = getattr(transformers, cfg_cls)(**COMMON, **extra, attn_implementation=impl, pad_token_id=0)
    torch.manual_seed(0)
    return getattr(transformers, model_cls)(cfg).to(dtype).eval()


def tol(name):
    return 1e-6 if MODELS[name][4] == torch.float64 else 1e-5


class _Sizes(TorchDispatchMode):
    """Records the number of elements of every tensor an op makes."""

    def __init__(self):
        super().__init__()
        self.numels = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.numels.append(t.numel())
        return out


@pytest.fixture
def spy(monkeypatch):
    """Wraps the registered "truthgpt" mask function: records (q_length, kv_length, result,
    largest tensor it made); counts transformers' 4-D sdpa_mask and the 4-D path's
    attention_visibility calls."""
    seen = {"masks": [], "sdpa_mask": 0, "visibility": 0}
    real = hf.padding_mask
    assert mu.AttentionMaskInterface._global_mapping[hf.NAME] is real

    def mask_spy(*args, **kwargs):
        with _Sizes() as sizes:
            out = real(*args, **kwargs)
        seen["masks"].append((kwargs["q_length"], kwargs["kv_length"], out, max(sizes.numels, default=0)))
        return out
    monkeypatch.setitem(mu.AttentionMaskInterface._global_mapping, hf.NAME, mask_spy)
    monkeypatch.setattr(hf, "padding_mask", mask_spy)  # what apply_to registers again
    real_sdpa, real_vis = mu.sdpa_mask, reference.attention_visibility

    def sdpa_spy(*a, **k):
        seen["sdpa_mask"] += 1
        return real_sdpa(*a, **k)

    def vis_spy(*a, **k):
        seen["visibility"] += 1
        return real_vis(*a, **k)
    monkeypatch.setattr(mu, "sdpa_mask", sdpa_spy)
    monkeypatch.setattr(reference, "attention_visibility", vis_spy)
    return seen


def assert_served(seen, padded):
    """Every mask call gave None or a (B, <= kv_length) mask, made nothing of q x kv elements,
    never fell back to sdpa_mask, and no layer built a 4-D visibility."""
    assert seen["masks"], "the truthgpt mask function was not called"
    assert seen["sdpa_mask"] == 0 and seen["visibility"] == 0, seen
    for q, kv, out, biggest in seen["masks"]:
        assert out is None or (out.dim() == 2 and out.dtype == torch.bool and out.shape[1] <= kv), out
        if q > 1:
            assert biggest < q * kv, f"a tensor of {biggest} elements for a {q} x {kv} mask"
    assert any(out is not None for *_, out, _ in seen["masks"]) == padded


def padded_batch(kind, seq=SEQ):
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(1, 96, (3, seq), generator=g)
    mask = torch.ones_like(ids)
    if kind == "left":
        mask[0, :5], mask[2, :2] = 0, 0
    elif kind == "deep_left":  # padding still inside a 6-key window after the prompt
        mask[0, :seq - 3], mask[2, :2] = 0, 0
    elif kind == "right":
        mask[0, -5:], mask[2, -2:] = 0, 0
    return ids, mask


@pytest.mark.parametrize("padding", ["none", "left", "right"])
@pytest.mark.parametrize("name", list(MODELS))
def test_logits_and_gradients_equal_unpatched(name, padding, spy):
    model = make(name)
    ref = copy.deepcopy(model)
    hf.apply_to(model, fused_loss=False)
    ids, mask = padded_batch(padding)
    kw = {} if padding == "none" else {"attention_mask": mask}
    out = model(ids, labels=ids, **kw)
    assert_served(spy, padding != "none")
    exp = ref(ids, labels=ids, **kw)
    t = tol(name)
    torch.testing.assert_close(out.logits, exp.logits, rtol=t, atol=t)  # padded rows included
    out.loss.backward()
    exp.loss.backward()
    for (n, a), b in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=10 * t, atol=t, msg=lambda m: f"{n}: {m}")


@pytest.mark.parametrize("padding", ["left", "deep_left", "none"])
@pytest.mark.parametrize("cache", ["dynamic", "static"])
@pytest.mark.parametrize("name", list(MODELS))
def test_generate_equals_unpatched(name, cache, padding, spy):
    """Greedy generate past the sliding window from a (left-padded) batch: the same tokens and
    the same logits at every step. static: the keys past the mask (unfilled slots) are kept
    out, so the causal alignment sits on the last filled one (before this mask function, a
    static-cache prefill without padding got no mask and attended to the unfilled slots).
    deep_left: padding inside the window of the decoding steps; generate makes a static
    sliding cache's masks ahead and the forward passes ours in again, already cut to the
    window (Mistral's tokens diverged from the second step before that case was recognised)."""
    model = make(name)
    ref = copy.deepcopy(model)
    hf.apply_to(model)
    ids, mask = padded_batch(padding, seq=10)
    kw = dict(attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0,
              return_dict_in_generate=True, output_logits=True, cache_implementation=cache)
    if cache == "static":
        kw["max_length"] = None
    got = model.generate(ids, **kw)
    full_layers = name != "mistral"  # Mistral: every layer slides (a static cache of the window)
    assert_served(spy, padding != "none" or (cache == "static" and full_layers))
    if cache == "static" and full_layers:  # full-attention layers: cut to the filled slots
        assert any(out is not None and out.shape[1] < kv for _, kv, out, _ in spy["masks"])
    exp = ref.generate(ids, **kw)
    assert torch.equal(got.sequences, exp.sequences)
    t = tol(name)
    for a, b in zip(got.logits, exp.logits):
        torch.testing.assert_close(a, b, rtol=t, atol=t)


# --- the mask function itself: served patterns, and the 4-D fallback for the others -----------

def _config(impl, **extra):
    cfg = transformers.LlamaConfig(**COMMON, **extra)
    cfg._attn_implementation = impl
    return cfg


def _both(creator, extra=None, **kwargs):
    """creator's result with the truthgpt mask function, and with sdpa's."""
    return [creator(config=_config(impl, **(extra or {})), **kwargs) for impl in (hf.NAME, "sdpa")]


def _expand(mask2d, q_length, pattern):
    """The 4-D mask a tagged 2-D mask stands for (queries bottom-right on its keys)."""
    causal, window = pattern
    return reference.attention_visibility(mask2d.shape[0], 1, q_length, mask2d.shape[1], causal=causal,
                                          window=hf._window(window), key_mask=mask2d)


@pytest.mark.parametrize("creator, extra, pattern", [
    (mu.create_causal_mask, None, (True, None)),
    (mu.create_sliding_window_causal_mask, {"sliding_window": 4}, (True, 4)),
    (mu.create_bidirectional_mask, None, (False, None)),
])
def test_served_patterns_stand_for_the_sdpa_mask(creator, extra, pattern):
    """A padded batch: the 2-D mask, tagged with its pattern, expands to the 4-D mask sdpa gets."""
    embeds = torch.zeros(2, 12, 8)
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[0, :3] = 0
    kw = {} if creator is mu.create_bidirectional_mask else {"cache": None}
    ours, sdpa = _both(creator, extra, inputs_embeds=embeds, attention_mask=mask, **kw)
    assert ours.shape == (2, 12) and getattr(ours, hf._PATTERN) == pattern
    assert torch.equal(_expand(ours, 12, pattern), sdpa)
    assert not hasattr(mask, hf._PATTERN)  # the caller's mask is not tagged
    none, _ = _both(creator, extra, inputs_embeds=embeds, attention_mask=torch.ones_like(mask), **kw)
    assert none is None


def test_other_patterns_get_the_sdpa_mask():
    """Packed sequences (block-diagonal), an or_mask overlay (Gemma 3's image tokens), an
    and_mask overlay and chunked attention: exactly transformers' 4-D sdpa mask."""
    embeds = torch.zeros(1, 12, 8)
    pos = torch.cat([torch.arange(5), torch.arange(7)])[None]
    ours, sdpa = _both(mu.create_causal_mask, inputs_embeds=embeds, attention_mask=None, cache=None,
                       position_ids=pos)
    assert ours.dim() == 4 and torch.equal(ours, sdpa)
    overlay = lambda b, h, q, kv: (q < 4) & (kv < 4)  # noqa: E731
    for key in ("or_mask_function", "and_mask_function"):
        for creator, extra in ((mu.create_causal_mask, None),
                               (mu.create_sliding_window_causal_mask, {"sliding_window": 4})):
            ours, sdpa = _both(creator, extra, inputs_embeds=embeds, attention_mask=None, cache=None,
                               **{key: overlay})
            assert ours.dim() == 4 and torch.equal(ours, sdpa), (key, creator.__name__)
    ours, sdpa = _both(mu.create_chunked_causal_mask, {"attention_chunk_size": 4}, inputs_embeds=embeds,
                       attention_mask=None, cache=None)
    assert ours.dim() == 4 and torch.equal(ours, sdpa)


def test_mask_pattern_identification():
    assert hf._mask_pattern(mu.causal_mask_function, None) == (True, None)
    assert hf._mask_pattern(mu.sliding_window_causal_mask_function(5), 5) == (True, 5)
    assert hf._mask_pattern(mu.sliding_window_causal_mask_function(5), 6) is None  # local_size disagrees
    assert hf._mask_pattern(mu.sliding_window_causal_mask_function(5), None) is None
    assert hf._mask_pattern(mu.causal_mask_function, 5) is None
    assert hf._mask_pattern(mu.bidirectional_mask_function, None) == (False, None)
    assert hf._mask_pattern(mu.sliding_window_bidirectional_mask_function(5), 5) is None
    assert hf._mask_pattern(mu.and_masks(mu.causal_mask_function, mu.causal_mask_function), None) is None
    assert hf._mask_pattern(mu.or_masks(mu.causal_mask_function), None) is None
    assert hf._mask_pattern(lambda b, h, q, kv: kv <= q, None) is None


def test_dead_queries_from_the_padding_mask():
    """Rows that see no key, from the 2-D mask's prefix counts, equal those of the 4-D mask."""
    g = torch.Generator().manual_seed(0)
    for causal, window, Sq, L in ((True, None, 7, 7), (True, (2, -1), 7, 7), (True, (1, -1), 3, 9),
                                  (False, None, 5, 8), (True, None, 1, 6)):
        key_mask = torch.rand(6, L, generator=g) < 0.3
        key_mask[0] = False
        vis = reference.attention_visibility(6, 1, Sq, L, causal=causal, window=window, key_mask=key_mask)
        assert torch.equal(hf._dead_queries(key_mask, Sq, causal, window), ~vis[:, 0].any(-1))


@pytest.mark.parametrize("name", ["llama", "gemma3_text"])
def test_compiled_static_cache_decoding(name, monkeypatch):
    """Issue #14: the patched model's forward under torch.compile(fullgraph=True) generates
    with transformers' static cache from a left-padded batch; the decoding steps (one query row,
    transformers' 4-D sdpa mask, as compiled calls get it) run tk.attention with that row as
    the key mask; tokens and logits equal the unpatched model's."""
    model = make(name)
    ref = copy.deepcopy(model)
    hf.apply_to(model)
    calls = []
    real = hf.ops.attention

    def counting(q, *args, **kwargs):
        calls.append(q.shape[2])
        return real(q, *args, **kwargs)
    monkeypatch.setattr(hf.ops, "attention", counting)
    torch._dynamo.reset()
    model.forward = torch.compile(model.forward, fullgraph=True)
    ids, mask = padded_batch("left", seq=10)
    kw = dict(attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0, max_length=None,
              return_dict_in_generate=True, output_logits=True, cache_implementation="static")
    got = model.generate(ids, **kw)
    exp = ref.generate(ids, **kw)
    assert 1 in calls, calls  # traced into the decoding graph
    assert torch.equal(got.sequences, exp.sequences)
    t = tol(name)
    for a, b in zip(got.logits, exp.logits):
        torch.testing.assert_close(a, b, rtol=t, atol=t)
