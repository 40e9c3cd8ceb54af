"""torch.library.opcheck of every public op, on every backend that implements it here."""
import pytest
import torch

import truthgpt_kernels as tk
from truthgpt_kernels import backends

from ..helpers import backend_params, device_for


def _attention_args(dev, extras=False):
    q = torch.randn(2, 4, 5, 8, device=dev, requires_grad=True)
    k = torch.randn(2, 2, 7, 8, device=dev, requires_grad=True)
    v = torch.randn(2, 2, 7, 8, device=dev, requires_grad=True)
    slopes = tk.alibi_slopes(4, device=dev).expand(2, 4)
    key_mask = torch.rand(2, 7, device=dev) > 0.2
    block_mask = (torch.rand(2, 4, 2, 2, device=dev) > 0.3)
    if not extras:
        return (q, k, v, 0.3, 4, 0, slopes, block_mask, 4, key_mask, 5.0, None, 0.0, None)
    # T5 bias by distance (Hq, Sq + Sk - 1), with a gradient, and dropout from a fixed seed
    rel = torch.randn(4, 11, device=dev, requires_grad=True)
    return (q, k, v, 0.3, 4, 0, slopes, block_mask, 4, key_mask, 5.0, rel, 0.2, torch.tensor(7))


def _attention_bshd_args(dev):
    """q, k, v as (B, H, S, D) views of (B, S, H, D) memory (the split of a fused QKV
    projection): the CPU kernels return out and the gradients in that memory order, and the
    fake kernels must say so."""
    q, k, v = (torch.randn(2, 5, h, 8, device=dev).transpose(1, 2).requires_grad_() for h in (4, 2, 2))
    return (q, k, v, 0.3, -1, 0, None, None, 4, None, 0.0, None, 0.0, None)


def _rotary_bshd_args(dev):
    q, k = (torch.randn(2, 5, h, 8, device=dev).transpose(1, 2).requires_grad_() for h in (3, 2))
    cos, sin = tk.rotary_cos_sin(16, 8, device=dev)
    return (q, k, cos, sin, torch.arange(5, device=dev).expand(2, 5), False)


def _attention_varlen_args(dev, rel=False):
    q = torch.randn(9, 4, 8, device=dev, requires_grad=True)
    k = torch.randn(11, 2, 8, device=dev, requires_grad=True)
    v = torch.randn(11, 2, 8, device=dev, requires_grad=True)
    cu_q = torch.tensor([0, 3, 3, 9], dtype=torch.int32, device=dev)
    cu_k = torch.tensor([0, 5, 6, 11], dtype=torch.int32, device=dev)
    slopes = tk.alibi_slopes(4, device=dev).expand(3, 4)
    rel_vec = torch.randn(4, 6 + 5 - 1, device=dev, requires_grad=True) if rel else None  # (Hq, max_q + max_k - 1)
    return (q, k, v, cu_q, cu_k, 6, 5, 0.3, 4, 0, slopes, 5.0, rel_vec, 0.2, torch.tensor(7))  # dropout, fixed seed


def _rotary_args(dev, qk):
    x = torch.randn(2, 3, 5, 8, device=dev, requires_grad=True)
    cos, sin = tk.rotary_cos_sin(16, 6, device=dev)
    pos = torch.randint(0, 16, (2, 5), device=dev)
    if qk:
        return (x, torch.randn(2, 1, 5, 8, device=dev, requires_grad=True), cos, sin, pos, False)
    return (x, cos, sin, pos, True)


# case: (op, family of its kernels, args without the backend)
CASES = {
    "attention": ("attention", "attention", _attention_args),
    "attention_rel_bias_dropout": ("attention", "attention", lambda dev: _attention_args(dev, extras=True)),
    "attention_bshd": ("attention", "attention", _attention_bshd_args),
    "attention_varlen": ("attention_varlen", "attention_varlen", _attention_varlen_args),
    "attention_varlen_rel_bias": ("attention_varlen", "attention_varlen",
                                  lambda dev: _attention_varlen_args(dev, rel=True)),
    "apply_rotary": ("apply_rotary", "rotary", lambda dev: _rotary_args(dev, False)),
    "apply_rotary_qk": ("apply_rotary_qk", "rotary", lambda dev: _rotary_args(dev, True)),
    "apply_rotary_qk_bshd": ("apply_rotary_qk", "rotary", _rotary_bshd_args),
    "swiglu": ("swiglu", "swiglu", lambda dev: (torch.randn(3, 6, device=dev, requires_grad=True),
                                                torch.randn(3, 6, device=dev, requires_grad=True))),
    "rms_norm": ("rms_norm", "rms_norm", lambda dev: (torch.randn(3, 6, device=dev, requires_grad=True),
                                                      torch.randn(6, device=dev, requires_grad=True), 1e-6)),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("backend", backends.BACKENDS)
def test_opcheck(case, backend):
    op, family, make = CASES[case]
    [param] = [p for p in backend_params(family) if p.values[0] == backend]
    for mark in param.marks:
        if mark.name == "skip":
            pytest.skip(mark.kwargs["reason"])
    args = make(device_for(backend)) + (backend,)
    torch.library.opcheck(getattr(torch.ops.truthgpt, op).default, args)


# C++ kernels a compiled graph calls directly (backends.call): their fake kernels
# (backends.register_fake) must agree with them. case -> kernel name
KERNELS = {"attention": "attention_fwd", "attention_rel_bias_dropout": "attention_fwd",
           "attention_bshd": "attention_fwd", "apply_rotary_qk_bshd": "rotary_qk_fwd",
           "apply_rotary": "rotary_fwd", "apply_rotary_qk": "rotary_qk_fwd", "swiglu": "swiglu_fwd",
           "rms_norm": "rms_norm_fwd"}


@pytest.mark.skipif(bool(backends.unavailable_reason("cpu")), reason="needs the C++ extension")
@pytest.mark.parametrize("case", list(KERNELS))
def test_opcheck_cpp_kernel(case):
    args = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in CASES[case][2]("cpu"))
    torch.library.opcheck(getattr(torch.ops.truthgpt, KERNELS[case]).default, args)


@pytest.mark.skipif(bool(backends.unavailable_reason("cpu")), reason="needs the C++ extension")
def test_opcheck_cpp_kvcache_kernel():
    from .test_attention_with_kvcache import _inputs
    a = _inputs(True)
    torch.library.opcheck(torch.ops.truthgpt.attention_with_kvcache_fwd.default,
                          (a["q"], a["k_cache"], a["v_cache"], a["cache_seqlens"], a["block_table"],
                           a["k_new"], a["v_new"], None, torch.tensor([1, 0], dtype=torch.int32), 0.3, 4, 0,
                           None, 5.0, torch.randn(4, 12)))  # rel_bias by distance: (Hq, Sq + capacity - 1)


@pytest.mark.skipif(bool(backends.unavailable_reason("cpu")), reason="needs the C++ extension")
def test_cpu_outputs_follow_a_fused_projections_layout():
    """Split from a (B, S, 3 H D) QKV projection, rotated and attended on the CPU: the rotary
    outputs, the attention output and every gradient come back in (B, S, H, D) memory, so
    flattening them to (B, S, H D) (forward) and concatenating the QKV gradient (backward)
    copy nothing around the kernels; values against the float64 reference."""
    B, S, H, D = 2, 9, 4, 8
    qkv64 = torch.randn(B, S, 3 * H * D, dtype=torch.float64)
    cos, sin = tk.rotary_cos_sin(16, D, dtype=torch.float64)
    dy = torch.randn(B, S, H * D, dtype=torch.float64)
    grads, outs = [], []
    for dtype, backend in ((torch.float32, "cpu"), (torch.float64, "reference")):
        qkv = qkv64.to(dtype).requires_grad_()
        q, k, v = (t.view(B, S, H, D).transpose(1, 2) for t in qkv.split(H * D, dim=-1))
        q, k = tk.apply_rotary_qk(q, k, cos.to(dtype), sin.to(dtype), backend=backend)
        y = tk.attention(q, k, v, causal=True, backend=backend)
        if backend == "cpu":
            for t in (q, k, y):
                assert t.transpose(1, 2).is_contiguous(), t.stride()
            flat = y.transpose(1, 2).reshape(B, S, H * D)
            assert flat.data_ptr() == y.data_ptr()  # a view
        y.transpose(1, 2).reshape(B, S, H * D).backward(dy.to(dtype))
        outs.append(y.double())
        grads.append(qkv.grad.double())
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-5)
