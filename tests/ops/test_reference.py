"""The reference (the executable spec) against independent formulas."""
import math

import pytest
import torch
import torch.nn.functional as F

from truthgpt_kernels.ops import reference as R

f64 = torch.float64


def rand(*shape):
    return torch.randn(*shape, dtype=f64)


# ----------------------------------------------------------------------------- attention
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("hkv", [4, 2, 1])
def test_attention_matches_sdpa(causal, hkv):
    q, k, v = rand(2, 4, 33, 16), rand(2, hkv, 33, 16), rand(2, hkv, 33, 16)
    out, lse = R.attention(q, k, v, causal=causal, return_lse=True)
    expected = F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=hkv != 4)
    torch.testing.assert_close(out, expected)
    kr = k.repeat_interleave(4 // hkv, 1)
    s = (q @ kr.transpose(-1, -2)) / 4.0
    if causal:
        s = s.masked_fill(torch.ones(33, 33, dtype=torch.bool).triu(1), -math.inf)
    torch.testing.assert_close(lse, torch.logsumexp(s, -1).to(lse.dtype))
    assert lse.dtype == R.lse_dtype(q.dtype)


def test_attention_masks_match_sdpa_masks():
    B, H, Sq, Sk, D = 2, 8, 20, 50, 8
    q, k, v = rand(B, H, Sq, D), rand(B, H, Sk, D), rand(B, H, Sk, D)
    slopes = R.alibi_slopes(H)
    key_mask = torch.rand(B, Sk) > 0.3
    key_mask[:, -1] = True
    i = torch.arange(Sq)[:, None] + Sk - Sq
    j = torch.arange(Sk)[None]
    allowed = (j <= i) & (j >= i - 7) & key_mask[:, None, None, :]
    bias = (-slopes.double()[:, None, None] * (i - j).abs()).masked_fill(~allowed, -math.inf)
    out = R.attention(q, k, v, causal=True, window=(7, -1), alibi_slopes=slopes, key_mask=key_mask,
                      scale=0.3)
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=0.3)
    torch.testing.assert_close(out, expected)


def test_attention_hand_computed_and_bottom_right():
    # one query, two keys: weights softmax([q.k0, q.k1] * scale)
    q = torch.tensor([[[[1.0, 0.0]]]], dtype=f64)
    k = torch.tensor([[[[1.0, 0.0], [0.0, 1.0]]]], dtype=f64)
    v = torch.tensor([[[[2.0, 0.0], [0.0, 4.0]]]], dtype=f64)
    w0 = math.exp(1.0) / (math.exp(1.0) + 1.0)
    out = R.attention(q, k, v, scale=1.0)
    torch.testing.assert_close(out, torch.tensor([[[[2 * w0, 4 * (1 - w0)]]]], dtype=f64))
    # decoding: Sq=1 at the last position sees every key under causal
    torch.testing.assert_close(R.attention(q, k, v, scale=1.0, causal=True), out)
    # Sq=2, Sk=4 causal: query 0 sits at position 2 and sees keys 0..2
    vis = R.attention_visibility(1, 1, 2, 4, causal=True)[0, 0]
    assert vis.tolist() == [[True, True, True, False], [True, True, True, True]]
    vis = R.attention_visibility(1, 1, 4, 4, window=(1, 1))[0, 0]
    assert vis.tolist() == [[1, 1, 0, 0], [1, 1, 1, 0], [0, 1, 1, 1], [0, 0, 1, 1]]


def test_attention_softcap_and_block_mask():
    q, k, v = rand(1, 2, 10, 4) * 5, rand(1, 2, 10, 4) * 5, rand(1, 2, 10, 4)
    s = 30.0 * torch.tanh((q @ k.transpose(-1, -2)) * 0.5 / 30.0)
    block_mask = torch.tensor([[True, False, True], [False, True, True], [True, True, False]])
    dense = block_mask.repeat_interleave(4, 0).repeat_interleave(4, 1)[:10, :10]
    s = s.masked_fill(~dense, -math.inf)
    expected = torch.softmax(s, -1) @ v
    out = R.attention(q, k, v, scale=0.5, softcap=30.0, block_mask=block_mask[None, None], block_size=4)
    torch.testing.assert_close(out, expected)


def test_attention_fully_masked_rows_are_zero_with_zero_grads():
    q, k, v = (rand(1, 2, 6, 4).requires_grad_() for _ in range(3))
    key_mask = torch.tensor([[False] * 6])
    key_mask[0, 3] = True
    out, lse = R.attention(q, k, v, causal=True, key_mask=key_mask, return_lse=True)
    assert torch.all(out[:, :, :3] == 0) and torch.all(lse[:, :, :3] == -math.inf)
    assert torch.isfinite(lse[:, :, 3:]).all()
    out.sum().backward()
    for t in (q, k, v):
        assert torch.isfinite(t.grad).all()
    assert torch.all(q.grad[:, :, :3] == 0)


def test_alibi_slopes():
    assert R.alibi_slopes(8).tolist() == [2.0 ** -i for i in range(1, 9)]
    # 6 heads: the 4-head slopes, then every other 8-head slope
    assert R.alibi_slopes(6).tolist() == [2.0 ** -2, 2.0 ** -4, 2.0 ** -6, 2.0 ** -8, 2.0 ** -1, 2.0 ** -3]
    assert R.alibi_slopes(6).dtype == torch.float32


# ----------------------------------------------------------------------------- rotary
def test_rotary_cos_sin_formula_and_scaling():
    cos, sin = R.rotary_cos_sin(12, 8, base=100.0, dtype=f64)
    p, i = torch.arange(12, dtype=f64)[:, None], torch.arange(4, dtype=f64)[None]
    torch.testing.assert_close(cos, torch.cos(p * 100.0 ** (-2 * i / 8)))
    torch.testing.assert_close(sin, torch.sin(p * 100.0 ** (-2 * i / 8)))
    cos_l, _ = R.rotary_cos_sin(12, 8, base=100.0, dtype=f64, scaling={"type": "linear", "factor": 4.0})
    torch.testing.assert_close(cos_l, torch.cos(p / 4 * 100.0 ** (-2 * i / 8)))
    cos_n, _ = R.rotary_cos_sin(12, 8, base=100.0, dtype=f64, scaling={"type": "ntk", "factor": 2.0})
    torch.testing.assert_close(cos_n, torch.cos(p * (100.0 * 2.0 ** (8 / 6)) ** (-2 * i / 8)))


def test_rotary_llama3_scaling_bands():
    sc = {"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 8192}
    _, sin = R.rotary_cos_sin(2, 128, base=500000.0, dtype=f64)
    _, sin_s = R.rotary_cos_sin(2, 128, base=500000.0, dtype=f64, scaling=sc)
    inv = 500000.0 ** (-torch.arange(0, 128, 2, dtype=f64) / 128)
    wavelen = 2 * math.pi / inv
    high = wavelen < 8192 / 4
    low = wavelen > 8192 / 1
    torch.testing.assert_close(sin_s[1][high], sin[1][high])           # kept
    torch.testing.assert_close(sin_s[1][low], torch.sin(inv[low] / 8))  # divided by factor
    mid = ~high & ~low
    assert mid.any() and torch.all(sin_s[1][mid] < sin[1][mid]) and torch.all(sin_s[1][mid] > torch.sin(inv[mid] / 8))


def test_apply_rotary_matches_hf_and_complex_forms():
    x = rand(2, 3, 5, 16)
    cos, sin = R.rotary_cos_sin(10, 12, dtype=f64)  # partial rotary: R = 12 < 16
    pos = torch.tensor([[0, 3, 3, 9, 1], [5, 6, 7, 8, 9]])
    out = R.apply_rotary(x, cos, sin, position_ids=pos)
    c = torch.cat([cos[pos], cos[pos]], -1)[:, None]
    s = torch.cat([sin[pos], sin[pos]], -1)[:, None]
    xr = x[..., :12]
    rotate_half = torch.cat([-xr[..., 6:], xr[..., :6]], -1)
    torch.testing.assert_close(out[..., :12], xr * c + rotate_half * s)
    torch.testing.assert_close(out[..., 12:], x[..., 12:])
    outi = R.apply_rotary(x, cos, sin, position_ids=pos, interleaved=True)
    z = torch.view_as_complex(x[..., :12].reshape(2, 3, 5, 6, 2).contiguous())
    angle = torch.atan2(sin[pos], cos[pos])[:, None]
    zr = torch.view_as_real(z * torch.polar(torch.ones_like(angle), angle)).flatten(-2)
    torch.testing.assert_close(outi[..., :12], zr)
    # offset is position_ids = offset + arange(S)
    torch.testing.assert_close(R.apply_rotary(x, cos, sin, offset=4),
                               R.apply_rotary(x, cos, sin, position_ids=torch.arange(4, 9)))


# ----------------------------------------------------------------------------- swiglu, rms_norm
def test_swiglu_and_rms_norm_match_torch():
    g, u = rand(3, 10), rand(3, 10)
    torch.testing.assert_close(R.swiglu(g, u), F.silu(g) * u)
    torch.testing.assert_close(R.swiglu(torch.cat([g, u], -1)), F.silu(g) * u)
    x, w = rand(4, 33), rand(33)
    torch.testing.assert_close(R.rms_norm(x, w, 1e-5), F.rms_norm(x, (33,), w, 1e-5))
    xb = x.bfloat16()
    assert R.rms_norm(xb, w.float()).dtype == torch.bfloat16


# ----------------------------------------------------------------------------- backward kernels
def _grads(fn, inputs, grad):
    inputs = [t.detach().requires_grad_() for t in inputs]
    torch.autograd.backward(fn(*inputs), grad)
    return [t.grad for t in inputs]


@pytest.mark.parametrize("case", ["plain", "gqa_alibi_window", "softcap_blocks_keymask"])
def test_attention_bwd_matches_autograd(case):
    B, Hq, Hkv, Sq, Sk, D = 2, 4, (2 if case == "gqa_alibi_window" else 4), 9, 13, 8
    q, k, v = rand(B, Hq, Sq, D), rand(B, Hkv, Sk, D), rand(B, Hkv, Sk, D)
    kw = dict(scale=0.4, window_left=-1, window_right=-1, alibi_slopes=None, block_mask=None,
              block_size=4, key_mask=None, softcap=0.0)
    if case == "gqa_alibi_window":
        kw.update(window_left=3, window_right=0, alibi_slopes=torch.rand(B, Hq))
    if case == "softcap_blocks_keymask":
        kw.update(softcap=2.0, block_mask=torch.rand(B, Hq, 3, 4) > 0.3,
                  key_mask=torch.rand(B, Sk) > 0.2)
    do = rand(B, Hq, Sq, D)
    out, lse = R.attention_fwd(q, k, v, **kw)

    def f(q, k, v):
        return R.attention(q, k, v, scale=kw["scale"], window=(kw["window_left"], kw["window_right"]),
                           alibi_slopes=kw["alibi_slopes"], block_mask=kw["block_mask"],
                           block_size=4, key_mask=kw["key_mask"], softcap=kw["softcap"])

    expected = _grads(f, [q, k, v], do)
    got = R.attention_bwd(do, q, k, v, out, lse, *kw.values())
    for name, a, b in zip("qkv", got, expected):
        # the saved lse is float32 (DESIGN.md), so P carries ~1e-7 relative error
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=lambda m: f"d{name}: {m}")


def test_swiglu_and_rms_norm_bwd_match_autograd():
    g, u, dy = rand(5, 7), rand(5, 7), rand(5, 7)
    for a, b in zip(R.swiglu_bwd(dy, g, u), _grads(R.swiglu, [g, u], dy)):
        torch.testing.assert_close(a, b)
    x, w = rand(5, 7), rand(7)
    _, rstd = R.rms_norm_fwd(x, w, 1e-6)
    dx, dw = R.rms_norm_bwd(dy, x, w, rstd.double())
    ex, ew = _grads(lambda x, w: R.rms_norm(x, w, 1e-6), [x, w], dy)
    torch.testing.assert_close(dx, ex, rtol=1e-6, atol=1e-6)  # rstd passes through float32
    torch.testing.assert_close(dw, ew, rtol=1e-6, atol=1e-6)
    dx, dw = R.rms_norm_bwd(dy, x, None, rstd)
    assert dw.numel() == 0
    torch.testing.assert_close(dx, _grads(lambda x: R.rms_norm(x, None, 1e-6), [x], dy)[0], rtol=1e-6, atol=1e-6)
