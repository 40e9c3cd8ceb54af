"""The shared attention grid: every backend against the float64 reference (DESIGN.md's rule:
our error <= 2x the same-dtype eager PyTorch error + atol), values and gradients."""
import math

import pytest
import torch

import truthgpt_kernels as tk
from truthgpt_kernels import backends, sparse
from truthgpt_kernels.ops import reference

from ..helpers import assert_close, backend_params, device_for

BACKENDS = backend_params("attention")
f32, bf16, f16 = torch.float32, torch.bfloat16, torch.float16
DTYPES = {
    "reference": [f32],
    "cpu": [f32, bf16, f16],
    "triton": [f32] if backends.triton_interpreted() else [f16, bf16, f32],
    "cuda": [f16, bf16, f32],
}
# Low-precision attention errors scale with sqrt(Sk) and the value range; the eager
# baseline's own error sets the scale (2x + atol), atol covers near-zero baselines.
ATOL = {f32: 1e-4, bf16: 2e-2, f16: 4e-3, torch.float64: 1e-8}

# name: (B, Hq, Hkv, Sq, Sk, D, options)
CASES = {
    "dense": (2, 4, 4, 17, 17, 32, {}),
    "causal": (2, 4, 4, 17, 17, 32, {"causal": True}),
    "causal_sq_lt_sk": (1, 4, 4, 17, 129, 64, {"causal": True}),
    "noncausal_sq_gt_sk": (1, 2, 2, 40, 17, 32, {}),
    "causal_sq_gt_sk_empty_rows": (1, 2, 2, 40, 17, 32, {"causal": True}),
    "decode": (2, 8, 2, 1, 129, 128, {"causal": True}),
    "decode_noncausal_mqa": (1, 8, 1, 1, 33, 64, {}),
    "gqa4_causal": (1, 8, 2, 33, 33, 16, {"causal": True}),
    "mqa8": (1, 8, 1, 33, 45, 80, {}),
    "d96": (1, 2, 2, 17, 17, 96, {"causal": True}),
    "d256": (1, 2, 1, 17, 33, 256, {"causal": True}),
    "len1": (1, 2, 2, 1, 1, 32, {}),
    "len1000_causal": (1, 1, 1, 1000, 1000, 64, {"causal": True}),
    "alibi_heads": (1, 4, 2, 33, 33, 32, {"causal": True, "alibi": "heads"}),
    "alibi_batch_heads": (2, 4, 4, 17, 40, 32, {"alibi": "batch_heads"}),
    "window_0_0": (1, 2, 2, 33, 33, 32, {"window": (0, 0)}),
    "window_16_0": (1, 2, 2, 40, 40, 32, {"window": (16, 0)}),
    "window_16_16": (1, 2, 2, 40, 50, 32, {"window": (16, 16)}),
    "window_-1_8": (1, 2, 2, 40, 40, 32, {"window": (-1, 8)}),
    "window_causal_alibi": (1, 4, 4, 129, 129, 32, {"window": (20, -1), "causal": True, "alibi": "heads"}),
    "local_layout": (1, 2, 2, 129, 129, 32, {"layout": "local"}),
    "local_global_layout": (1, 2, 2, 129, 129, 32, {"layout": "local_global"}),
    "bigbird_layout": (2, 2, 1, 129, 129, 32, {"layout": "bigbird"}),
    "strided_layout": (1, 2, 2, 129, 129, 32, {"layout": "strided", "causal": True}),
    "block_mask_default_block": (1, 2, 2, 129, 200, 32, {"layout": "random64"}),
    "key_mask": (2, 4, 2, 17, 33, 32, {"key_mask": "random"}),
    "key_mask_empty_rows": (2, 2, 2, 17, 17, 32, {"key_mask": "tail", "causal": True}),
    "softcap": (1, 2, 2, 33, 33, 32, {"softcap": 5.0, "causal": True}),
    "non_contiguous": (2, 4, 2, 17, 33, 32, {"layout_bshd": True}),
    "everything": (2, 4, 2, 40, 57, 32, {"causal": True, "alibi": "batch_heads", "window": (24, -1),
                                         "layout": "bigbird", "key_mask": "random",
                                         "softcap": 8.0, "layout_bshd": True}),
}


def make_inputs(B, Hq, Hkv, Sq, Sk, D, opts, dtype, device):
    """(q, k, v) in float64 and the keyword arguments of tk.attention."""
    def t(H, S):
        if opts.get("layout_bshd"):  # a transposed view of a (B, S, H, D) tensor
            return torch.randn(B, S, H, D, dtype=torch.float64, device=device).transpose(1, 2)
        return torch.randn(B, H, S, D, dtype=torch.float64, device=device)

    q, k, v = t(Hq, Sq), t(Hkv, Sk), t(Hkv, Sk)
    if opts.get("softcap"):
        q = q * 4
    kw = {"causal": opts.get("causal", False), "window": opts.get("window"),
          "softcap": opts.get("softcap", 0.0)}
    if opts.get("alibi") == "heads":
        kw["alibi_slopes"] = tk.alibi_slopes(Hq, device=device)
    elif opts.get("alibi") == "batch_heads":
        kw["alibi_slopes"] = torch.rand(B, Hq, device=device)
    layout = opts.get("layout")
    if layout:
        bs = 64 if layout == "random64" else 16
        if layout == "local":
            m = sparse.local_layout(Sq, Sk, block_size=bs, num_local_blocks=2)
        elif layout == "local_global":
            m = sparse.local_global_layout(Sq, Sk, block_size=bs, num_local_blocks=2, global_blocks=(1,))
        elif layout == "bigbird":
            m = sparse.bigbird_layout(Sq, Sk, block_size=bs, heads=Hq, num_random_blocks=1)
        elif layout == "strided":
            m = sparse.strided_layout(Sq, Sk, block_size=bs, stride=3)
        else:
            m = torch.rand(B, 1, math.ceil(Sq / bs), math.ceil(Sk / bs)) > 0.4
        kw["block_mask"], kw["block_size"] = m.to(device), bs
    if opts.get("key_mask") == "random":
        kw["key_mask"] = torch.rand(B, Sk, device=device) > 0.3
    elif opts.get("key_mask") == "tail":  # causal + only the last keys: early queries see nothing
        kw["key_mask"] = torch.arange(Sk, device=device).expand(B, Sk) >= Sk // 2
    return (q, k, v), kw


def eager_attention(q, k, v, *, causal=False, window=None, alibi_slopes=None, block_mask=None,
                    block_size=64, key_mask=None, softcap=0.0):
    """Plain PyTorch attention computed in the inputs' dtype (the baseline of the rule)."""
    B, Hq, Sq, D = q.shape
    Sk = k.shape[2]
    g = Hq // k.shape[1]
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    s = (q @ k.transpose(-1, -2)) * D ** -0.5
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    if alibi_slopes is not None:
        dist = (torch.arange(Sq, device=q.device)[:, None] + Sk - Sq - torch.arange(Sk, device=q.device)).abs()
        s = s - (alibi_slopes.reshape(-1, Hq, 1, 1) * dist).to(s.dtype)
    vis = reference.attention_visibility(B, Hq, Sq, Sk, causal=causal, window=window,
                                         block_mask=block_mask, block_size=block_size,
                                         key_mask=key_mask, device=q.device)
    s = s.masked_fill(~vis, float("-inf"))
    p = torch.softmax(s, -1).nan_to_num(0.0)
    return p @ v


def leaves(tensors, dtype):
    return [t.detach().to(dtype).requires_grad_(True) for t in tensors]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(CASES))
def test_attention_matches_reference(backend, case):
    B, Hq, Hkv, Sq, Sk, D, opts = CASES[case]
    if backend == "triton" and Sq * Sk > 300_000:
        pytest.skip("interpreter time: the Triton grid stops at S 300 x 300 (the tile edges are there)")
    device = device_for(backend)
    (q64, k64, v64), kw = make_inputs(B, Hq, Hkv, Sq, Sk, D, opts, torch.float64, device)
    do64 = torch.randn(B, Hq, Sq, D, dtype=torch.float64, device=device)
    ref_in = leaves((q64, k64, v64), torch.float64)
    ref_out, ref_lse = reference.attention(*ref_in, return_lse=True, **kw)
    ref_out.backward(do64)
    for dtype in DTYPES[backend]:
        ours_in = leaves((q64, k64, v64), dtype)
        out, lse = tk.attention(*ours_in, return_lse=True, backend=backend, **kw)
        out.backward(do64.to(dtype))
        base_in = leaves((q64, k64, v64), dtype)
        base = eager_attention(*base_in, **kw)
        base.backward(do64.to(dtype))
        assert out.dtype == dtype and lse.dtype == reference.lse_dtype(dtype)
        assert lse.shape == (B, Hq, Sq)
        assert_close(f"out[{dtype}]", out, ref_out, base, atol=ATOL[dtype])
        empty = torch.isinf(ref_lse)
        assert torch.equal(torch.isinf(lse), empty), "rows with no visible key must have lse = -inf"
        assert torch.all(out[empty] == 0), "rows with no visible key must output zeros"
        lse_tol = 1e-5 if dtype == f32 else 2e-2
        torch.testing.assert_close(lse[~empty], ref_lse[~empty].to(lse.dtype), rtol=lse_tol, atol=lse_tol)
        for name, a, r, b in zip("qkv", ours_in, ref_in, base_in):
            assert_close(f"d{name}[{dtype}]", a.grad, r.grad, b.grad, atol=ATOL[dtype])


@pytest.mark.parametrize("backend", BACKENDS)
def test_attention_backward_is_deterministic(backend):
    device = device_for(backend)
    (q, k, v), kw = make_inputs(2, 8, 2, 40, 70, 32, {"causal": True, "alibi": "heads"}, torch.float64, device)
    do = torch.randn(2, 8, 40, 32, device=device)
    grads = []
    for _ in range(2):
        ins = leaves((q, k, v), torch.float32)
        tk.attention(*ins, backend=backend, **kw).backward(do)
        grads.append([t.grad for t in ins])
    for a, b in zip(*grads):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shapes", [((2, 4, 0, 32), (2, 2, 5, 32)), ((1, 2, 0, 32), (1, 1, 5, 32)),
                                    ((2, 4, 0, 32), (2, 4, 5, 32)), ((2, 4, 3, 32), (2, 2, 0, 32)),
                                    ((0, 4, 3, 32), (0, 2, 5, 32))], ids=["gqa_sq0", "mqa_sq0", "sq0", "sk0", "b0"])
def test_attention_zero_sized(backend, shapes):
    """Zero query rows, zero keys or zero batch (flash-attn: empty outputs; seqlen_k 0 -> zero
    rows with lse -inf and zero gradients): no crash (GQA with Sq = 0 divided by zero in the
    CPU tile planner), right shapes."""
    device = device_for(backend)
    (qs, ks), dt = shapes, DTYPES[backend][-1]
    q, k, v = (torch.randn(s, device=device, dtype=dt, requires_grad=True) for s in (qs, ks, ks))
    out, lse = tk.attention(q, k, v, return_lse=True, causal=True, backend=backend)
    assert out.shape == qs and lse.shape == qs[:3]
    assert torch.all(out == 0) and torch.all(lse == -math.inf)
    out.sum().backward()
    for t in (q, k, v):
        assert t.grad.shape == t.shape and torch.all(t.grad == 0)


@pytest.mark.parametrize("backend", [p for p in BACKENDS if p.values[0] in ("cpu", "reference")])
def test_attention_autocast_dtype_like_sdpa(backend):
    """Under torch.autocast float32 q/k/v run in the autocast dtype, as SDPA (on autocast's
    lower-precision list) does; float64 stays; gradients reach the float32 leaves in float32."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 4, 9, 16, requires_grad=True) for _ in range(3))
    for dt in (torch.bfloat16, torch.float16):
        with torch.autocast("cpu", dtype=dt):
            out = tk.attention(q, k, v, causal=True, backend=backend)
            want = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
            packed = tk.attention_varlen(q[0].transpose(0, 1), k[0].transpose(0, 1), v[0].transpose(0, 1),
                                         torch.tensor([0, 9], dtype=torch.int32), torch.tensor([0, 9], dtype=torch.int32),
                                         9, 9, causal=True, backend=backend)
            assert tk.attention(q.double(), k.double(), v.double(), backend=backend).dtype == torch.float64
        assert out.dtype == want.dtype == packed.dtype == dt
        torch.testing.assert_close(out, want, rtol=2e-2, atol=2e-2)
        torch.testing.assert_close(packed, out[0].transpose(0, 1), rtol=2e-2, atol=2e-2)
        out.float().sum().backward()
        assert q.grad.dtype == torch.float32


@pytest.mark.parametrize("backend", [p for p in BACKENDS if p.values[0] in ("cpu", "reference")])
def test_attention_gradcheck_fp64(backend):
    (q, k, v), kw = make_inputs(1, 4, 2, 5, 7, 8, {"causal": True, "alibi": "batch_heads",
                                                  "key_mask": "random", "softcap": 3.0}, torch.float64, "cpu")
    ins = leaves((q, k, v), torch.float64)
    assert torch.autograd.gradcheck(lambda a, b, c: tk.attention(a, b, c, backend=backend, **kw), ins,
                                    atol=1e-5, rtol=1e-4)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", [p for p in BACKENDS if p.values[0] in ("triton", "cuda")])
@pytest.mark.parametrize("case", ["causal_large", "gqa_alibi_window_large"])
def test_attention_large_on_gpu(backend, case):
    opts = {"causal": True} if case == "causal_large" else {"causal": True, "alibi": "heads", "window": (256, 0)}
    Hkv = 8 if case == "causal_large" else 2
    (q64, k64, v64), kw = make_inputs(2, 8, Hkv, 1024, 1024, 128, opts, torch.float64, "cuda")
    ref_in = leaves((q64, k64, v64), torch.float64)
    ref = reference.attention(*ref_in, **kw)
    do = torch.randn_like(ref)
    ref.backward(do)
    for dtype in (f16, bf16):
        ours_in, base_in = leaves((q64, k64, v64), dtype), leaves((q64, k64, v64), dtype)
        out = tk.attention(*ours_in, backend=backend, **kw)
        out.backward(do.to(dtype))
        base = eager_attention(*base_in, **kw)
        base.backward(do.to(dtype))
        assert_close(f"out[{dtype}]", out, ref, base, atol=ATOL[dtype])
        for name, a, r, b in zip("qkv", ours_in, ref_in, base_in):
            assert_close(f"d{name}[{dtype}]", a.grad, r.grad, b.grad, atol=ATOL[dtype])


BAD = [
    ("q rank", lambda q, k, v: tk.attention(q[0], k, v), ValueError, "q must have 4 dimensions"),
    ("dtype mismatch", lambda q, k, v: tk.attention(q, k.double(), v.double()), TypeError, "k must have the dtype of q"),
    ("batch", lambda q, k, v: tk.attention(q, k[:1], v[:1]), ValueError, "batch size of q"),
    ("v shape", lambda q, k, v: tk.attention(q, k, v[:, :, :3]), ValueError, "v must have shape"),
    ("head dim", lambda q, k, v: tk.attention(q, k[..., :4], v[..., :4]), ValueError, "head dim of q"),
    ("heads", lambda q, k, v: tk.attention(q[:, :3], k, v), ValueError, "multiple of k/v heads"),
    ("D > 256", lambda q, k, v: tk.attention(*(torch.randn(1, 1, 2, 257),) * 3), ValueError, "head dim must be between"),
    ("window form", lambda q, k, v: tk.attention(q, k, v, window=(3,)), ValueError, "window must be a pair"),
    ("window value", lambda q, k, v: tk.attention(q, k, v, window=(-2, 0)), ValueError, r"window\[0\] must be >= -1"),
    ("window type", lambda q, k, v: tk.attention(q, k, v, window=(1.5, 0)), TypeError, r"window\[0\] must be an int"),
    ("slopes length", lambda q, k, v: tk.attention(q, k, v, alibi_slopes=torch.rand(3)), ValueError, "alibi_slopes must have shape"),
    ("slopes dtype", lambda q, k, v: tk.attention(q, k, v, alibi_slopes=torch.rand(4).double()), TypeError, "alibi_slopes must have dtype float32"),
    ("block mask shape", lambda q, k, v: tk.attention(q, k, v, block_mask=torch.ones(1, 1, 2, 2, dtype=torch.bool), block_size=4), ValueError, "block_mask must have shape"),
    ("block mask dtype", lambda q, k, v: tk.attention(q, k, v, block_mask=torch.ones(1, 1, 1, 1)), TypeError, "block_mask must have dtype bool"),
    ("key mask shape", lambda q, k, v: tk.attention(q, k, v, key_mask=torch.ones(2, 5, dtype=torch.bool)), ValueError, "key_mask must have shape"),
    ("softcap", lambda q, k, v: tk.attention(q, k, v, softcap=-1.0), ValueError, "softcap must be >= 0"),
    ("device", lambda q, k, v: tk.attention(q, k.to("meta"), v.to("meta")), ValueError, "k must be on cpu"),
]


@pytest.mark.parametrize("name,call,exc,match", BAD, ids=[b[0] for b in BAD])
def test_attention_bad_input(name, call, exc, match):
    q, k, v = torch.randn(2, 4, 6, 8), torch.randn(2, 2, 9, 8), torch.randn(2, 2, 9, 8)
    with pytest.raises(exc, match=match):
        call(q, k, v)
