"""Malformed calls across the public ops: each raises a specific exception whose message names
the argument, the same on every backend, before any kernel runs. Plus NaN/Inf propagation,
empty inputs and 64-bit offsets."""
import math

import pytest
import torch

import truthgpt_kernels as tk
from truthgpt_kernels import backends

from .helpers import backend_params, device_for


def _q(*shape, dtype=torch.float32):
    return torch.randn(*shape, dtype=dtype)


cos8, sin8 = tk.rotary_cos_sin(16, 8)
A = dict(q=(2, 4, 6, 16), kv=(2, 2, 9, 16))


def att(**over):
    args = dict(q=_q(*A["q"]), k=_q(*A["kv"]), v=_q(*A["kv"]))
    args.update(over)
    q, k, v = args.pop("q"), args.pop("k"), args.pop("v")
    return lambda backend: tk.attention(q, k, v, backend=backend, **args)


BAD = {
    # attention (17)
    "att_q_rank": (att(q=_q(4, 6, 16)), ValueError, "q must have 4 dimensions"),
    "att_k_rank": (att(k=_q(2, 9, 16)), ValueError, "k must have 4 dimensions"),
    "att_q_not_tensor": (att(q=[[1.0]]), TypeError, "q must be a torch.Tensor"),
    "att_int_dtype": (att(q=torch.ones(*A["q"], dtype=torch.int32)), TypeError, "q must have dtype"),
    "att_dtype_mismatch": (att(v=_q(*A["kv"], dtype=torch.float64)), TypeError, "v must have the dtype of q"),
    "att_kv_shape": (att(v=_q(2, 2, 8, 16)), ValueError, "v must have shape"),
    "att_batch": (att(k=_q(1, 2, 9, 16), v=_q(1, 2, 9, 16)), ValueError, "batch size of q"),
    "att_head_dim": (att(k=_q(2, 2, 9, 8), v=_q(2, 2, 9, 8)), ValueError, "head dim of q"),
    "att_heads": (att(k=_q(2, 3, 9, 16), v=_q(2, 3, 9, 16)), ValueError, r"q heads \(4\) must be a multiple"),
    "att_head_dim_257": (att(q=_q(1, 1, 2, 257), k=_q(1, 1, 2, 257), v=_q(1, 1, 2, 257)), ValueError, "head dim must be between 1 and 256"),
    "att_window_len": (att(window=(1, 2, 3)), ValueError, "window must be a pair"),
    "att_window_neg": (att(window=(0, -5)), ValueError, r"window\[1\] must be >= -1"),
    "att_window_float": (att(window=(2.0, 0)), TypeError, r"window\[0\] must be an int"),
    "att_slopes_len": (att(alibi_slopes=torch.rand(5)), ValueError, "alibi_slopes must have shape"),
    "att_slopes_batch": (att(alibi_slopes=torch.rand(3, 4)), ValueError, "alibi_slopes must have shape"),
    "att_slopes_dtype": (att(alibi_slopes=torch.rand(4, dtype=torch.float64)), TypeError, "alibi_slopes must have dtype float32"),
    "att_block_mask_shape": (att(block_mask=torch.ones(1, 1, 1, 2, dtype=torch.bool)), ValueError, "block_mask must have shape"),
    "att_block_mask_heads": (att(block_mask=torch.ones(1, 3, 1, 1, dtype=torch.bool)), ValueError, "block_mask must have shape"),
    "att_block_mask_dtype": (att(block_mask=torch.ones(1, 1, 1, 1, dtype=torch.uint8)), TypeError, "block_mask must have dtype bool"),
    "att_block_size": (att(block_size=0), ValueError, "block_size must be >= 1"),
    "att_key_mask_shape": (att(key_mask=torch.ones(2, 6, dtype=torch.bool)), ValueError, "key_mask must have shape"),
    "att_key_mask_dtype": (att(key_mask=torch.ones(2, 9)), TypeError, "key_mask must have dtype bool"),
    "att_softcap": (att(softcap=-0.5), ValueError, "softcap must be >= 0"),
    "att_scale_nan": (att(scale=float("nan")), ValueError, "scale must be finite"),
    # rotary (9)
    "rot_x_rank": (lambda b: tk.apply_rotary(_q(4, 6, 16), cos8, sin8, backend=b), ValueError, "x must have 4 dimensions"),
    "rot_cos_short": (lambda b: tk.apply_rotary(_q(1, 2, 20, 16), cos8, sin8, backend=b), ValueError, "cos/sin cover 16 positions"),
    "rot_offset": (lambda b: tk.apply_rotary(_q(1, 2, 4, 16), cos8, sin8, offset=14, backend=b), ValueError, "offset 14"),
    "rot_pos_range": (lambda b: tk.apply_rotary(_q(1, 2, 4, 16), cos8, sin8, position_ids=torch.tensor([0, 1, 2, 16]), backend=b), ValueError, "position_ids must lie in"),
    "rot_pos_negative": (lambda b: tk.apply_rotary(_q(1, 2, 4, 16), cos8, sin8, position_ids=torch.tensor([0, -1, 2, 3]), backend=b), ValueError, "position_ids must lie in"),
    "rot_pos_dtype": (lambda b: tk.apply_rotary(_q(1, 2, 4, 16), cos8, sin8, position_ids=torch.arange(4.0), backend=b), TypeError, "position_ids must have dtype"),
    "rot_pos_shape": (lambda b: tk.apply_rotary(_q(2, 2, 4, 16), cos8, sin8, position_ids=torch.zeros(3, 4, dtype=torch.long), backend=b), ValueError, "position_ids must have shape"),
    "rot_dim_too_big": (lambda b: tk.apply_rotary(_q(1, 2, 4, 6), cos8, sin8, backend=b), ValueError, "rotary dim .* exceeds the head dim"),
    "rot_sin_shape": (lambda b: tk.apply_rotary(_q(1, 2, 4, 16), cos8, sin8[:, :3], backend=b), ValueError, "sin must have shape"),
    "rot_odd_rotary_dim": (lambda b: tk.rotary_cos_sin(8, 7), ValueError, "rotary_dim must be even"),
    "rot_scaling_kind": (lambda b: tk.rotary_cos_sin(8, 8, scaling={"type": "yarn"}), ValueError, "scaling must be None or a dict"),
    "rot_qk_mismatch": (lambda b: tk.apply_rotary_qk(_q(1, 2, 4, 16), _q(1, 2, 5, 16), cos8, sin8, backend=b), ValueError, "k must match q"),
    # swiglu (4)
    "swiglu_odd_packed": (lambda b: tk.swiglu(_q(3, 7), backend=b), ValueError, "even last dim"),
    "swiglu_shapes": (lambda b: tk.swiglu(_q(3, 4), _q(3, 5), backend=b), ValueError, "up must have the shape of gate"),
    "swiglu_dtypes": (lambda b: tk.swiglu(_q(3, 4), _q(3, 4, dtype=torch.float64), backend=b), TypeError, "up must have the dtype of gate"),
    "swiglu_int": (lambda b: tk.swiglu(torch.ones(3, 4, dtype=torch.long), backend=b), TypeError, "gate must have dtype"),
    # rms_norm (4)
    "rms_weight_len": (lambda b: tk.rms_norm(_q(3, 8), torch.ones(7), backend=b), ValueError, "weight must have shape"),
    "rms_weight_dtype": (lambda b: tk.rms_norm(_q(3, 8, dtype=torch.bfloat16), torch.ones(8, dtype=torch.float64), backend=b), TypeError, "weight must have dtype"),
    "rms_eps": (lambda b: tk.rms_norm(_q(3, 8), eps=-1.0, backend=b), ValueError, "eps must be >= 0"),
    "rms_not_tensor": (lambda b: tk.rms_norm(3.0, backend=b), TypeError, "x must be a torch.Tensor"),
    # backend names (1)
    "unknown_backend": (lambda b: tk.swiglu(_q(2, 4), backend="turbo"), ValueError, "backend must be one of"),
}


def _cpu_backends():
    return [b for b in backends.BACKENDS if device_for(b) == "cpu" and not backends.unavailable_reason(b)]


def test_count():
    assert len(BAD) >= 40


@pytest.mark.parametrize("backend", _cpu_backends())
@pytest.mark.parametrize("name", list(BAD))
def test_malformed_call(name, backend, monkeypatch):
    call, exc, match = BAD[name]
    ran = []
    # any kernel reached would be a failure: validation must come first
    monkeypatch.setattr(backends, "kernel", lambda *a: ran.append(a) or (lambda *x: None))
    with pytest.raises(exc, match=match):
        call(backend)
    assert not ran


@pytest.mark.parametrize("backend", backend_params("attention"))
def test_attention_nan_propagates_like_reference(backend):
    dev = device_for(backend)
    q, k, v = (torch.randn(1, 2, 5, 8, device=dev) for _ in range(3))
    v[0, 0, 2, 3] = float("nan")
    out = tk.attention(q, k, v, causal=True, backend=backend)
    ref = tk.attention(q, k, v, causal=True, backend="reference")
    assert torch.equal(out.isnan(), ref.isnan())


@pytest.mark.parametrize("backend", backend_params("attention"))
@pytest.mark.parametrize("shape", [(0, 2, 5, 8, 5), (1, 2, 0, 8, 5), (1, 2, 5, 8, 0)], ids=["B0", "Sq0", "Sk0"])
def test_attention_empty(backend, shape):
    B, H, Sq, D, Sk = shape
    dev = device_for(backend)
    q = torch.randn(B, H, Sq, D, device=dev, requires_grad=True)
    k = torch.randn(B, H, Sk, D, device=dev, requires_grad=True)
    v = torch.randn(B, H, Sk, D, device=dev, requires_grad=True)
    out, lse = tk.attention(q, k, v, return_lse=True, backend=backend)
    assert out.shape == q.shape and torch.all(out == 0) and torch.all(lse == -math.inf)
    out.sum().backward()
    assert torch.all(q.grad == 0) and k.grad.shape == k.shape


@pytest.mark.parametrize("family,call", [
    ("swiglu", lambda b: tk.swiglu(torch.randn(0, 6), backend=b)),
    ("rms_norm", lambda b: tk.rms_norm(torch.randn(0, 6), torch.ones(6), backend=b)),
    ("rotary", lambda b: tk.apply_rotary(torch.randn(2, 3, 0, 16), cos8, sin8, backend=b)),
])
def test_small_ops_empty(family, call):
    for backend in _cpu_backends():
        if backends.implements(family, backend):
            assert call(backend).numel() == 0


def test_attention_64bit_offsets_cpu():
    """q/k/v views whose element offsets exceed 2^31 (a batch stride of 2^31 over a lazily
    allocated buffer: only the touched pages are materialised)."""
    if not backends.implements("attention", "cpu") or backends.unavailable_reason("cpu"):
        pytest.skip("no cpu attention kernel")
    stride = 2 ** 31
    base = torch.empty(stride + 64, dtype=torch.bfloat16)
    base[:64].normal_()
    base[stride:].normal_()

    def view():
        return base.as_strided((2, 1, 4, 16), (stride, 64, 16, 1))

    q, k, v = view(), view(), view()
    out = tk.attention(q, k, v, backend="cpu")
    dense = [t.clone() for t in (q, k, v)]
    expected = tk.attention(*dense, backend="cpu")
    assert torch.equal(out, expected)


def test_ops_on_meta_tensors():
    """Shape inference on meta tensors (no values): the ops give meta outputs of the right shape
    (attention's autocast check asked torch.autocast about the meta device and raised)."""
    import truthgpt_kernels as tk
    m = "meta"
    x, q = torch.randn(4, 8, device=m), torch.randn(1, 2, 4, 8, device=m)
    for name, out, shape in [
            ("rms_norm", tk.rms_norm(x), (4, 8)), ("add_rms_norm", tk.add_rms_norm(x, x)[0], (4, 8)),
            ("layer_norm", tk.layer_norm(x), (4, 8)), ("swiglu", tk.swiglu(x, x), (4, 8)),
            ("geglu", tk.geglu(x, x), (4, 8)), ("linear", tk.linear(x, torch.randn(3, 8, device=m)), (4, 3)),
            ("attention", tk.attention(q, q, q, causal=True), (1, 2, 4, 8)),
            ("linear_cross_entropy", tk.linear_cross_entropy(
                x, torch.randn(10, 8, device=m), torch.zeros(4, dtype=torch.long, device=m)), ())]:
        assert out.device.type == "meta" and tuple(out.shape) == shape, name
    with torch.autocast("cpu", dtype=torch.bfloat16):  # (autocast on for the CPU, not for meta)
        assert tk.attention(q, q, q).dtype == torch.float32
