"""Every public op under torch.compile(fullgraph=True), forward and backward, with no graph
breaks and the same results as eager."""
import pytest
import torch

import truthgpt_kernels as tk
from truthgpt_kernels import backends

BACKENDS = [b for b in ("cpu", "reference") if not backends.unavailable_reason(b)]


def _attention(b):
    q, k, v = torch.randn(2, 4, 9, 16), torch.randn(2, 2, 11, 16), torch.randn(2, 2, 11, 16)
    slopes = tk.alibi_slopes(4)
    return (lambda q, k, v: tk.attention(q, k, v, causal=True, alibi_slopes=slopes, window=(6, -1),
                                         softcap=5.0, backend=b)), (q, k, v)


def _rotary(b):
    cos, sin = tk.rotary_cos_sin(32, 12)
    q, k = torch.randn(2, 4, 9, 16), torch.randn(2, 2, 9, 16)
    return (lambda q, k: sum(t.sum() for t in tk.apply_rotary_qk(q, k, cos, sin, offset=3, backend=b))
            + tk.apply_rotary(q, cos, sin, interleaved=True, backend=b).square().sum()), (q, k)


def _swiglu(b):
    return (lambda x: tk.swiglu(x, backend=b)), (torch.randn(5, 24),)


def _rms_norm(b):
    return (lambda x, w: tk.rms_norm(x, w, backend=b)), (torch.randn(5, 24), torch.randn(24))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("make", [_attention, _rotary, _swiglu, _rms_norm], ids=lambda f: f.__name__[1:])
def test_compile_fullgraph_matches_eager(make, backend):
    family = make.__name__[1:].replace("_qk", "")
    if not backends.implements(family, backend):
        pytest.skip(f"backend {backend!r} has no {family} kernel yet")
    torch._dynamo.reset()
    fn, inputs = make(backend)
    eager_in = [t.clone().requires_grad_() for t in inputs]
    comp_in = [t.clone().requires_grad_() for t in inputs]
    expected = fn(*eager_in)
    expected.sum().backward()
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    out = compiled(*comp_in)
    out.sum().backward()
    torch.testing.assert_close(out, expected)
    for a, b in zip(comp_in, eager_in):
        torch.testing.assert_close(a.grad, b.grad)


def _graph_ops(fn, inputs):
    """(output, the set of truthgpt ops the dynamo graph of fn calls)."""
    seen = set()

    def backend(gm, example_inputs):
        seen.update(str(n.target).removesuffix(".default") for n in gm.graph.nodes
                    if n.op == "call_function" and "truthgpt" in str(n.target))
        return gm.forward

    torch._dynamo.reset()
    return torch.compile(fn, fullgraph=True, backend=backend)(*inputs), seen


@pytest.mark.skipif(not BACKENDS or BACKENDS[0] != "cpu", reason="needs the C++ extension")
@pytest.mark.parametrize("make", [_attention, _rotary, _swiglu, _rms_norm], ids=lambda f: f.__name__[1:])
def test_compiled_inference_graph_calls_the_cpp_kernels(make):
    """With no gradient to track, a compiled graph holds the C++ kernels themselves
    (truthgpt.<family>_fwd, through their fake kernels), not the Python custom ops that run
    Python per call; when a gradient may flow it holds the custom op (its autograd). Inductor's
    code gives eager's results."""
    fn, inputs = make("cpu")
    with torch.no_grad():
        expected = fn(*inputs)
        _, seen = _graph_ops(fn, inputs)
        assert seen and all(op.endswith("_fwd") for op in seen), seen
        torch._dynamo.reset()
        torch.testing.assert_close(torch.compile(fn, fullgraph=True)(*inputs), expected)
    _, seen = _graph_ops(fn, [t.clone().requires_grad_() for t in inputs])
    assert seen and not any(op.endswith("_fwd") for op in seen), seen


@pytest.mark.skipif(not BACKENDS or BACKENDS[0] != "cpu", reason="needs the C++ extension")
@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
def test_compiled_kvcache_checks_lengths_in_the_graph(paged):
    """Under torch.compile the C++ KV-cache kernel is called from the graph with no Python
    check around it: the lengths are checked by asserts in the graph, before anything is
    written."""
    from .ops.test_attention_with_kvcache import _inputs
    a = _inputs(paged)
    q, k_cache, v_cache = a.pop("q"), a.pop("k_cache"), a.pop("v_cache")
    k_eager, v_eager = k_cache.clone(), v_cache.clone()
    want = tk.attention_with_kvcache(q, k_eager, v_eager, backend="cpu", **a)
    torch._dynamo.reset()
    fn = torch.compile(lambda *t, **kw: tk.attention_with_kvcache(*t, backend="cpu", **kw), fullgraph=True)
    torch.testing.assert_close(fn(q, k_cache, v_cache, **a), want)
    assert torch.equal(k_cache, k_eager) and torch.equal(v_cache, v_eager)
    capacity = 12
    bad = [("cache_seqlens", torch.tensor([3, capacity - 1], dtype=torch.int32), "cache_seqlens must be >= 0"),
           ("cache_seqlens", torch.tensor([-1, 0], dtype=torch.int32), "cache_seqlens must be >= 0")]
    if paged:
        bad.append(("block_table", torch.tensor([[0, 1, 2], [3, 9, 5]], dtype=torch.int32), "block_table"))
    for key, value, match in bad:
        before = k_cache.clone()
        with pytest.raises(RuntimeError, match=match):
            fn(q, k_cache, v_cache, **dict(a, **{key: value}))
        assert torch.equal(k_cache, before)


def _mha_masks(kind, B=2, H=4, L=6, S=6):
    """The forward kwargs of one masking mode of nn.MultiheadAttention (batch_first, L == S)."""
    g = torch.Generator().manual_seed(1)
    kpm = torch.rand(B, S, generator=g) > 0.6
    kpm[:, 0] = False
    causal = torch.nn.Transformer.generate_square_subsequent_mask(L)

    def bool_mask(*shape):  # never a fully masked row (torch gives NaN there)
        m = torch.rand(*shape, generator=g) > 0.7
        m[..., 0] = False
        return m

    return {
        "none": {},
        "kpm_bool": dict(key_padding_mask=kpm),
        "kpm_float": dict(key_padding_mask=torch.zeros(B, S).masked_fill(kpm, float("-inf"))),
        "kpm_float_values": dict(key_padding_mask=torch.randn(B, S, generator=g)),
        "mask_bool_2d": dict(attn_mask=bool_mask(L, S)),
        "mask_float_2d": dict(attn_mask=torch.randn(L, S, generator=g)),
        "mask_bool_3d": dict(attn_mask=bool_mask(B * H, L, S)),
        "mask_float_3d": dict(attn_mask=torch.randn(B * H, L, S, generator=g)),
        "causal_mask": dict(attn_mask=causal),  # the causal pattern, no hint
        "is_causal": dict(attn_mask=causal, is_causal=True),
        "is_causal_bool_kpm": dict(attn_mask=causal.isinf(), is_causal=True, key_padding_mask=kpm),
    }[kind]


MHA_MASKS = ["none", "kpm_bool", "kpm_float", "kpm_float_values", "mask_bool_2d", "mask_float_2d",
             "mask_bool_3d", "mask_float_3d", "causal_mask", "is_causal", "is_causal_bool_kpm"]


@pytest.mark.parametrize("need_weights", [False, True], ids=["no_weights", "weights"])
@pytest.mark.parametrize("kind", MHA_MASKS)
def test_compile_fullgraph_multihead_attention_masks(kind, need_weights, monkeypatch):
    """tk.MultiheadAttention compiles without graph breaks with every mask torch's accepts (the
    module must not branch on mask values while tracing) and gives eager torch's results; what
    needs no mask values (no mask, a bool key_padding_mask, the is_causal hint) still runs on
    tk.attention."""
    import truthgpt_kernels.modules.multihead as mh
    traced = []
    real = mh.attention
    monkeypatch.setattr(mh, "attention", lambda *a, **k: traced.append(k) or real(*a, **k))
    torch._dynamo.reset()
    torch.manual_seed(0)
    ref = torch.nn.MultiheadAttention(16, 4, batch_first=True)
    ours = tk.MultiheadAttention(16, 4, batch_first=True)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(2, 6, 16)
    call = dict(_mha_masks(kind), need_weights=need_weights)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    expected, expected_w = ref(xa, xa, xa, **call)
    compiled = torch.compile(ours, fullgraph=True, backend="aot_eager")
    out, weights = compiled(xb, xb, xb, **call)
    torch.testing.assert_close(out, expected)
    assert bool(traced) == (not need_weights and kind in ("none", "kpm_bool", "is_causal"))
    assert (weights is None) == (expected_w is None)
    if weights is not None:
        torch.testing.assert_close(weights, expected_w)
    out.sum().backward()
    expected.sum().backward()
    torch.testing.assert_close(xb.grad, xa.grad, rtol=1e-4, atol=1e-5)


def test_first_compiled_call_does_not_recompile():
    """A fresh process whose first call of an op is a compiled one compiles once, not twice
    (Dynamo guarded on the C++-kernel cache that its own trace filled)."""
    import subprocess
    import sys
    code = ("import torch, truthgpt_kernels as tk\n"
            "from torch._dynamo.testing import CompileCounterWithBackend\n"
            "cnt = CompileCounterWithBackend('aot_eager')\n"
            "w = torch.randn(16)\n"
            "f = torch.compile(lambda x: tk.rms_norm(x, w) * 2, backend=cnt)\n"
            "with torch.no_grad():\n"
            "    for _ in range(3):\n"
            "        f(torch.randn(4, 16))\n"
            "print(cnt.frame_count)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "1", out.stdout
