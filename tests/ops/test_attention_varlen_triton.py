"""The Triton varlen (packed) attention kernels against the float64 reference evaluated per
sequence (DESIGN.md's rule: error <= 2x the same-dtype eager PyTorch error + atol): out, lse
(flash-attn's (Hq, Tq) layout) and dq, dk, dv, over length mixes with empty and one-token
sequences, Sq != Sk, GQA/MQA, causal, sliding windows, ALiBi and softcap, strided inputs."""
import pytest
import torch

from truthgpt_kernels.ops import reference

from ..helpers import assert_close, backend_params, device_for
from .test_attention import ATOL, eager_attention, leaves

[TRITON] = [p for p in backend_params("attention") if p.values[0] == "triton"]
pytestmark = [pytest.mark.triton] + [m for m in TRITON.marks if m.name == "skip"]

if not any(m.name == "skip" for m in TRITON.marks):
    from truthgpt_kernels.triton import attention_varlen as tvl
DEV = device_for("triton")

# name: (q lengths, k lengths, Hq, Hkv, D, options); window (left, right), causal = right 0.
# The interpreter's tiles are 32 x 32: lengths past 32 cross tile edges.
CASES = {
    "self": ([5, 0, 1, 37, 3, 20], None, 2, 2, 16, {}),
    "causal_gqa": ([17, 1, 0, 40], [30, 1, 5, 40], 4, 2, 16, {"window": (-1, 0)}),
    "causal_sq_gt_sk": ([9, 33, 2, 4], [3, 40, 0, 1], 2, 1, 16, {"window": (-1, 0)}),
    "window": ([50, 7, 1, 0], [45, 12, 1, 6], 2, 2, 32, {"window": (8, 3)}),
    "left_window_only": ([12, 35], [40, 9], 2, 1, 16, {"window": (5, -1)}),
    "alibi_softcap": ([20, 0, 33, 1], [25, 4, 33, 2], 4, 2, 16,
                      {"alibi": True, "softcap": 5.0, "window": (10, 0)}),
    "mqa_strided": ([33, 1, 30], [31, 2, 64], 3, 1, 32, {"strided": True, "alibi": True}),
    "no_queries": ([0, 0], [3, 0], 2, 1, 16, {}),
    "no_keys": ([4, 2], [0, 0], 2, 2, 16, {}),
}


def _cu(lengths):
    return torch.tensor([0] + list(lengths), device=DEV).cumsum(0).to(torch.int32)


def _seqs(cu):
    return [slice(int(a), int(b)) for a, b in zip(cu[:-1], cu[1:])]


def _sdpa(t, s):  # rows s of a packed (T, H, D) tensor as (1, H, S, D)
    return t[s].transpose(0, 1).unsqueeze(0)


def _packed(t):  # (1, H, S, D) -> (S, H, D)
    return t[0].transpose(0, 1)


def _inputs(lq, lk, Hq, Hkv, D, opts):
    """float64 packed q, k, v, grad_out, cu_seqlens, and the kernel options (scale,
    window_left, window_right, alibi_slopes, softcap)."""
    Tq, Tk = sum(lq), sum(lk)
    q, do = (torch.randn(Tq, Hq, D, dtype=torch.float64, device=DEV) for _ in range(2))
    k, v = (torch.randn(Tk, Hkv, D, dtype=torch.float64, device=DEV) for _ in range(2))
    if opts.get("softcap"):
        q = q * 4
    slopes = torch.rand(len(lq), Hq, device=DEV) if opts.get("alibi") else None
    wl, wr = opts.get("window", (-1, -1))
    return (q, k, v, do, _cu(lq), _cu(lk)), (D ** -0.5, wl, wr, slopes, opts.get("softcap", 0.0))


def _convert(t, dtype, strided):
    """t in dtype; with `strided` a view whose rows and heads are not packed (as a slice of a
    fused buffer is), the last dim unit-stride."""
    if not strided:
        return t.to(dtype)
    buf = torch.zeros(t.shape[0], t.shape[1], 2, t.shape[2], dtype=dtype, device=t.device)
    buf[:, :, 1] = t
    return buf[:, :, 1]


def _expected(q, k, v, do, cu_q, cu_k, scale, wl, wr, slopes, softcap):
    """float64 out, lse (Hq, Tq), dq, dk, dv: reference kernels per sequence, packed."""
    res = [[] for _ in range(5)]
    for b, (sq, sk) in enumerate(zip(_seqs(cu_q), _seqs(cu_k))):
        sl = None if slopes is None else slopes[b:b + 1].double()
        qkv = (_sdpa(q, sq), _sdpa(k, sk), _sdpa(v, sk))
        o, lse = reference.attention_fwd(*qkv, scale, wl, wr, sl, None, 64, None, softcap)
        grads = reference.attention_bwd(_sdpa(do, sq), *qkv, o, lse, scale, wl, wr, sl, None, 64,
                                        None, softcap)[:3]
        for acc, t in zip(res, (_packed(o), lse[0]) + tuple(_packed(g) for g in grads)):
            acc.append(t)
    return [torch.cat(r, dim=1 if i == 1 else 0) for i, r in enumerate(res)]


def _eager(q, k, v, do, cu_q, cu_k, wl, wr, slopes, softcap):
    """The baseline in q's dtype (eager PyTorch per sequence): out and the inputs' gradients."""
    q, k, v = leaves((q, k, v), q.dtype)
    outs = []
    for b, (sq, sk) in enumerate(zip(_seqs(cu_q), _seqs(cu_k))):
        sl = None if slopes is None else slopes[b:b + 1]
        outs.append(_packed(eager_attention(_sdpa(q, sq), _sdpa(k, sk), _sdpa(v, sk), window=(wl, wr),
                                            alibi_slopes=sl, softcap=softcap)))
    out = torch.cat(outs)
    out.backward(do)
    return out, q.grad, k.grad, v.grad


def _check(lq, lk, Hq, Hkv, D, opts, dtype):
    (q, k, v, do, cu_q, cu_k), (scale, wl, wr, slopes, softcap) = _inputs(lq, lk, Hq, Hkv, D, opts)
    ref_out, ref_lse, *ref_grads = _expected(q, k, v, do, cu_q, cu_k, scale, wl, wr, slopes, softcap)
    qd, kd, vd, dod = (_convert(t, dtype, opts.get("strided")) for t in (q, k, v, do))
    opt = (max(lq), max(lk), scale, wl, wr, slopes, softcap)
    out, lse = tvl.attention_varlen_fwd(qd, kd, vd, cu_q, cu_k, *opt)
    grads = tvl.attention_varlen_bwd(dod, qd, kd, vd, out, lse, cu_q, cu_k, *opt)
    base_out, *base_grads = _eager(qd, kd, vd, dod, cu_q, cu_k, wl, wr, slopes, softcap)

    assert out.dtype == dtype and lse.dtype == torch.float32
    assert lse.shape == (Hq, sum(lq))
    assert_close(f"out[{dtype}]", out, ref_out, base_out, atol=ATOL[dtype])
    empty = torch.isinf(ref_lse)
    assert torch.equal(torch.isinf(lse), empty), "rows with no visible key must have lse = -inf"
    assert torch.all(out.transpose(0, 1)[empty] == 0), "rows with no visible key must output zeros"
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(lse[~empty], ref_lse[~empty].to(lse.dtype), rtol=tol, atol=tol)
    for name, g, r, bg in zip("qkv", grads, ref_grads, base_grads):
        assert g.shape == r.shape and g.dtype == dtype, name
        assert_close(f"d{name}[{dtype}]", g, r, bg, atol=ATOL[dtype])


@pytest.mark.parametrize("case", list(CASES))
def test_varlen_matches_reference_per_sequence(case):
    lq, lk, Hq, Hkv, D, opts = CASES[case]
    _check(lq, lk if lk is not None else lq, Hq, Hkv, D, opts, torch.float32)


def test_varlen_bfloat16():
    _check([20, 1, 0, 40], [26, 1, 3, 40], 4, 2, 16, {"window": (12, 0), "alibi": True}, torch.bfloat16)


def test_varlen_one_key_rows_have_exactly_zero_score_gradient():
    """A query row that sees exactly one key (here: a one-key sequence, and the first query of
    a causal one) has a constant softmax: its dq must be exactly 0, not a rounding residue."""
    (q, k, v, do, cu_q, cu_k), _ = _inputs([3, 1], [3, 1], 2, 2, 16, {})
    opt = (3, 3, 0.25, -1, 0, None, 0.0)
    out, lse = tvl.attention_varlen_fwd(q.float(), k.float(), v.float(), cu_q, cu_k, *opt)
    dq, *_ = tvl.attention_varlen_bwd(do.float(), q.float(), k.float(), v.float(), out, lse,
                                         cu_q, cu_k, *opt)
    assert torch.all(dq[0] == 0) and torch.all(dq[3] == 0)
    assert torch.all(dq[1:3] != 0)
