"""Attention against projections + F.scaled_dot_product_attention with the same weights
(forward and backward), and KV-cache decoding against full recomputation."""
import math

import pytest
import torch
import torch.nn.functional as F

from truthgpt_kernels import sparse
from truthgpt_kernels.modules import Attention, CacheFullError, KVCache

from ..helpers import assert_close

f64 = torch.float64
# float64 gradients: the attention op saves its log-sum-exp in float32 (DESIGN.md: lse is
# float32) and rms_norm its rstd, so float64 backward passes are float32-accurate
GRAD_TOL = dict(rtol=1e-5, atol=1e-6)


def rope_tables(S, R, base=10000.0, factor=None, dtype=f64):
    inv = base ** (-torch.arange(0, R, 2, dtype=f64) / R)
    pos = torch.arange(S, dtype=f64) / (factor or 1.0)
    ang = pos[:, None] * inv
    return ang.cos().to(dtype), ang.sin().to(dtype)


def rotate(x, cos, sin):
    R = 2 * cos.shape[-1]
    x1, x2, rest = x[..., : R // 2], x[..., R // 2: R], x[..., R:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest], dim=-1)


def alibi(n):  # Press et al. for a power of two
    return torch.tensor([2.0 ** (-8.0 * (i + 1) / n) for i in range(n)], dtype=f64)


def plain_attention(mod: Attention, x, context=None, key_mask=None, rope=None, layout=None):
    """What `mod` computes, in eager PyTorch: fused projection, rotary, a dense mask, SDPA."""
    B, S, _ = x.shape
    Hq, Hkv, D = mod.n_heads, mod.n_kv_heads, mod.head_dim
    W, b = mod.qkv.weight, mod.qkv.bias
    if context is None:
        q, k, v = F.linear(x, W, b).split([Hq * D, Hkv * D, Hkv * D], dim=-1)
        Sk = S
    else:
        q = F.linear(x, W[: Hq * D], None if b is None else b[: Hq * D])
        k, v = F.linear(context, W[Hq * D:], None if b is None else b[Hq * D:]).chunk(2, dim=-1)
        Sk = context.shape[1]
    q = q.view(B, S, Hq, D).transpose(1, 2)
    k = k.reshape(B, Sk, Hkv, D).transpose(1, 2)
    v = v.reshape(B, Sk, Hkv, D).transpose(1, 2)
    if mod.position == "rope" and context is None:
        R, base, factor = rope
        cos, sin = rope_tables(S, R, base, factor, x.dtype)
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
    i = torch.arange(S)[:, None] + (Sk - S)
    j = torch.arange(Sk)[None, :]
    vis = torch.ones(S, Sk, dtype=torch.bool)
    if context is None:
        if mod.causal:
            vis &= j <= i
        if mod.window is not None:
            left, right = mod.window
            if left >= 0:
                vis &= j >= i - left
            if right >= 0:
                vis &= j <= i + right
    mask = vis[None, None]
    if layout is not None:
        bs = mod.sparsity["block_size"]
        mask = mask & layout[:, :, torch.arange(S) // bs][:, :, :, torch.arange(Sk) // bs]
    if key_mask is not None:
        mask = mask & key_mask[:, None, None, :]
    bias = torch.zeros(mask.shape, dtype=x.dtype).masked_fill(~mask, float("-inf"))
    if mod.position == "alibi" and context is None:
        bias = bias - alibi(Hq).to(x.dtype)[None, :, None, None] * (i - j).abs().to(x.dtype)
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, enable_gqa=Hq != Hkv)
    return F.linear(y.transpose(1, 2).reshape(B, S, Hq * D), mod.out.weight, mod.out.bias)


CASES = {
    # name: (Attention kwargs, seq)
    "rope_causal": (dict(n_heads=4), 13),
    "rope_gqa": (dict(n_heads=4, n_kv_heads=2), 13),
    "rope_mqa_bias": (dict(n_heads=4, n_kv_heads=1, bias=True), 13),
    "rope_partial_scaled": (dict(n_heads=2, rotary_dim=8, rope_base=500.0,
                                 rope_scaling={"type": "linear", "factor": 2.0}), 11),
    "alibi_causal": (dict(n_heads=4, position="alibi"), 13),
    "none_bidirectional": (dict(n_heads=4, position="none", causal=False), 13),
    "window_causal": (dict(n_heads=4, n_kv_heads=2, window=5), 17),
    "window_pair_bidirectional": (dict(n_heads=4, causal=False, window=(4, 2), position="alibi"), 17),
    "sparse_local_causal": (dict(n_heads=4, sparsity={"layout": "local", "block_size": 4,
                                                      "num_local_blocks": 2}), 20),
    "sparse_bigbird": (dict(n_heads=4, causal=False, position="none",
                            sparsity={"layout": "bigbird", "block_size": 4, "seed": 3}), 20),
}


def _layout(mod, S):
    if mod.sparsity is None:
        return None
    p = dict(mod.sparsity)
    name, bs = p.pop("layout"), p.pop("block_size")
    fn = {"local": sparse.local_layout, "bigbird": sparse.bigbird_layout}[name]
    if name == "bigbird":
        p["heads"] = mod.n_heads
    # the module cuts its layout from one built for max_seq_len; build it the same way here
    full = fn(mod.max_seq_len, mod.max_seq_len, block_size=bs, causal=mod.causal, **p)
    n = math.ceil(S / bs)
    return full[:, :, :n, :n]


def _rope(kw, mod):
    return (kw.get("rotary_dim", mod.head_dim), kw.get("rope_base", 10000.0),
            (kw.get("rope_scaling") or {}).get("factor"))


@pytest.mark.parametrize("name", list(CASES))
def test_matches_sdpa_float64(name):
    kw, S = CASES[name]
    torch.manual_seed(1)
    mod = Attention(32, max_seq_len=64, dtype=f64, **kw)
    x = torch.randn(2, S, 32, dtype=f64, requires_grad=True)
    x2 = x.detach().clone().requires_grad_(True)
    y = mod(x)
    y2 = plain_attention(mod, x2, rope=_rope(kw, mod), layout=_layout(mod, S))
    torch.testing.assert_close(y, y2, rtol=1e-9, atol=1e-10)
    dy = torch.randn_like(y)
    params = [p for p in mod.parameters()]
    g1 = torch.autograd.grad(y, [x] + params, dy)
    g2 = torch.autograd.grad(y2, [x2] + params, dy)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, **GRAD_TOL)


def test_cross_attention_with_key_mask_float64():
    torch.manual_seed(2)
    mod = Attention(32, 4, 2, causal=False, position="rope", dtype=f64, bias=True)
    x = torch.randn(2, 7, 32, dtype=f64, requires_grad=True)
    ctx = torch.randn(2, 11, 32, dtype=f64, requires_grad=True)
    km = torch.ones(2, 11, dtype=torch.bool)
    km[1, 8:] = False
    y = mod(x, context=ctx, key_mask=km)
    y2 = plain_attention(mod, x, context=ctx, key_mask=km)
    torch.testing.assert_close(y, y2, rtol=1e-9, atol=1e-10)
    g1 = torch.autograd.grad(y.sum(), [x, ctx, mod.qkv.weight])
    g2 = torch.autograd.grad(y2.sum(), [x, ctx, mod.qkv.weight])
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, **GRAD_TOL)


@pytest.mark.parametrize("kw", [dict(n_heads=4, n_kv_heads=2), dict(n_heads=4, position="alibi")],
                         ids=["rope_gqa", "alibi"])
def test_float32_within_sdpa_error(kw):
    """float32: our error against float64 <= 2x the float32 SDPA model's error + atol."""
    torch.manual_seed(3)
    mod = Attention(64, max_seq_len=64, **kw)
    ref = Attention(64, max_seq_len=64, dtype=f64, **kw)
    ref.load_state_dict({k: v.double() for k, v in mod.state_dict().items()})
    x = torch.randn(2, 33, 64)
    rope = (mod.head_dim, 10000.0, None)
    ours = mod(x)
    base = plain_attention(mod, x, rope=rope)
    expected = plain_attention(ref, x.double(), rope=rope)
    assert_close("out", ours.detach(), expected.detach(), base.detach())


# ----------------------------------------------------------------------------- KV cache
@pytest.mark.parametrize("kw", [
    dict(n_heads=4), dict(n_heads=4, n_kv_heads=1), dict(n_heads=4, position="alibi", n_kv_heads=2),
    dict(n_heads=4, window=3), dict(n_heads=4, sparsity={"layout": "local", "block_size": 4,
                                                          "num_local_blocks": 2}),
], ids=["rope", "rope_mqa", "alibi_gqa", "window", "sparse"])
def test_cache_decoding_equals_full(kw):
    torch.manual_seed(4)
    mod = Attention(32, max_seq_len=32, dtype=f64, **kw)
    x = torch.randn(2, 14, 32, dtype=f64)
    full = mod(x)
    cache = mod.make_cache(2, 20)
    steps = [mod(x[:, :8], cache=cache)]  # prefill: 8 = two whole blocks
    for t in range(8, 14):
        steps.append(mod(x[:, t:t + 1], cache=cache))
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-9, atol=1e-10)
    assert cache.pos == 14


def test_cache_chunks_equal_full():
    torch.manual_seed(5)
    mod = Attention(32, 4, 2, dtype=f64, window=(6, 0))
    x = torch.randn(1, 12, 32, dtype=f64)
    cache = mod.make_cache(1, 12)
    out = torch.cat([mod(x[:, a:a + 3], cache=cache) for a in range(0, 12, 3)], 1)
    torch.testing.assert_close(out, mod(x), rtol=1e-9, atol=1e-10)


def test_cross_attention_cache_reuses_context():
    mod = Attention(32, 4, causal=False, position="none", dtype=f64)
    x, ctx = torch.randn(1, 3, 32, dtype=f64), torch.randn(1, 5, 32, dtype=f64)
    cache = mod.make_cache(1, 5)
    a = mod(x[:, :1], context=ctx, cache=cache)
    b = mod(x[:, 1:], context=ctx, cache=cache)   # keys come from the cache now
    assert cache.pos == 5
    torch.testing.assert_close(torch.cat([a, b], 1), mod(x, context=ctx))


def test_cache_full_and_mismatch_errors():
    cache = KVCache(1, 2, 4, 8)
    k = torch.zeros(1, 2, 3, 8)
    cache.update(k, k)
    with pytest.raises(CacheFullError, match="KV cache is full: it holds 4 positions, 3 are used"):
        cache.update(k, k)
    with pytest.raises(ValueError, match="KVCache holds"):
        cache.update(torch.zeros(2, 2, 1, 8), torch.zeros(2, 2, 1, 8))
    cache.reset()
    assert cache.pos == 0
    cache.update(k, k)


def test_sparse_cache_needs_block_aligned_chunks():
    mod = Attention(32, 4, sparsity={"layout": "local", "block_size": 4})
    cache = mod.make_cache(1, 16)
    mod(torch.randn(1, 3, 32), cache=cache)
    with pytest.raises(ValueError, match="block boundary"):
        mod(torch.randn(1, 2, 32), cache=cache)


def test_constructor_errors():
    with pytest.raises(ValueError, match="divisible"):
        Attention(30, 4)
    with pytest.raises(ValueError, match="multiple of n_kv_heads"):
        Attention(32, 4, 3)
    with pytest.raises(ValueError, match="position"):
        Attention(32, 4, position="learned")
    with pytest.raises(ValueError, match="window"):
        Attention(32, 4, window=(1, 2, 3))
    with pytest.raises(ValueError, match="layout"):
        Attention(32, 4, sparsity={"layout": "diagonal"})
    with pytest.raises(ValueError, match=r"\(batch, seq, 32\)"):
        Attention(32, 4)(torch.randn(2, 32))
