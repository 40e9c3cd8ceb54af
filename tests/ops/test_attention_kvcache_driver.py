"""The CUDA backend's attention_with_kvcache driver (csrc/common/attention_kvcache_driver.h:
append in place, gather the sequence's keys, the dense kernel per sequence), built for the CPU
in the test-only extension, against the reference: outputs and the mutated caches; the T5 bias
(rel_bias) also against tk.attention on each sequence's gathered keys."""
import pytest
import torch

import truthgpt_kernels as tk
from truthgpt_kernels.ops import reference

from .host_ext import T, skip_unless_built

pytestmark = skip_unless_built


def _case(paged, s_new, seed):
    g = torch.Generator().manual_seed(seed)
    B, Hq, Hkv, D, Sq = 3, 4, 2, 16, max(1, s_new)
    lens = torch.tensor([5, 0, 13], dtype=torch.int32)
    q = torch.randn(B, Hq, Sq, D, generator=g, dtype=torch.float64)
    k_new = torch.randn(B, Hkv, s_new, D, generator=g, dtype=torch.float64) if s_new else None
    v_new = torch.randn(B, Hkv, s_new, D, generator=g, dtype=torch.float64) if s_new else None
    if paged:
        ps, pages_per_seq = 4, 5
        n_pages = B * pages_per_seq + 2
        table = torch.randperm(n_pages, generator=g)[:B * pages_per_seq].view(B, pages_per_seq).to(torch.int32)
        k = torch.randn(n_pages, ps, Hkv, D, generator=g, dtype=torch.float64)
    else:
        table = None
        k = torch.randn(B, Hkv, 20, D, generator=g, dtype=torch.float64)
    v = torch.randn(k.shape, generator=g, dtype=torch.float64)
    return q, k, v, lens, table, k_new, v_new


@pytest.mark.parametrize("paged", [False, True])
@pytest.mark.parametrize("s_new", [0, 1, 3])
@pytest.mark.parametrize("opts", [dict(wl=-1, wr=0, alibi=False, softcap=0.0),
                                  dict(wl=4, wr=0, alibi=True, softcap=0.0),
                                  dict(wl=-1, wr=-1, alibi=False, softcap=5.0)])
@pytest.mark.parametrize("remap", [False, True], ids=["", "leftpad_rows"])
def test_kvcache_driver_matches_reference(paged, s_new, opts, remap):
    q, k, v, lens, table, k_new, v_new = _case(paged, s_new, seed=s_new + 10 * paged)
    alibi = torch.rand(q.shape[0], q.shape[1]) if opts["alibi"] else None
    rows = pad = None
    if remap:  # cache_batch_idx (contiguous caches only; the case's cache has B rows) and cache_leftpad
        rows = None if paged else torch.tensor([2, 0, 1], dtype=torch.int32)
        pad = torch.tensor([3, 0, 9], dtype=torch.int32)
    args = (lens, table, k_new, v_new, rows, pad, 0.25, opts["wl"], opts["wr"], alibi, opts["softcap"], None)
    k1, v1, k2, v2 = k.clone(), v.clone(), k.clone(), v.clone()
    out, lse = T.attention_kvcache_driver(q, k1, v1, *args)
    exp, exp_lse = reference.attention_with_kvcache_fwd(q, k2, v2, *args)
    torch.testing.assert_close(out, exp, rtol=1e-6, atol=1e-6)  # lse of the dense kernel is float32
    torch.testing.assert_close(lse, exp_lse, rtol=1e-6, atol=1e-6)
    assert torch.equal(k1, k2) and torch.equal(v1, v2), "the appended cache differs"
    if s_new:
        assert not torch.equal(k1, k), "k_new was not written"


def _gather(cache, table, row, b, start, n):
    """(1, Hkv, n - start, D): tokens start .. n - 1 of sequence b, slot by slot (row `row` of a
    contiguous cache, or its pages through the block table)."""
    if table is None:
        toks = [cache[row, :, t] for t in range(start, n)]
    else:
        ps = cache.shape[1]
        toks = [cache[int(table[b, t // ps]), t % ps] for t in range(start, n)]
    return torch.stack(toks, 1)[None] if toks else cache.new_zeros(1, cache.shape[2 if table is not None else 1],
                                                                    0, cache.shape[-1])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("paged", [False, True])
@pytest.mark.parametrize("s_new", [0, 1, 3])
@pytest.mark.parametrize("opts", [dict(wl=-1, wr=0, alibi=False, softcap=0.0, rel=(False, 8, 6)),
                                  dict(wl=-1, wr=-1, alibi=False, softcap=0.0, rel=(True, 8, 6)),
                                  dict(wl=4, wr=0, alibi=True, softcap=5.0, rel=(False, 6, 5))],
                         ids=["causal", "noncausal", "window_alibi_softcap"])
@pytest.mark.parametrize("remap", [False, True], ids=["", "leftpad_rows"])
def test_kvcache_driver_rel_bias(paged, s_new, opts, remap, dtype):
    """T5 bias: the vector by distance over the cache capacity (20 tokens), narrowed per sequence
    for the dense kernel, against tk.attention(backend="reference") with the table on each
    sequence's keys [cache_leftpad[b], L_b) gathered slot by slot, and against the reference
    backend (same cache after the append)."""
    q, k, v, lens, table, k_new, v_new = (None if t is None else t.to(dtype) if t.is_floating_point() else t
                                          for t in _case(paged, s_new, seed=s_new + 10 * paged + 3))
    g = torch.Generator().manual_seed(1)
    B, Hq, Sq = q.shape[:3]
    alibi = torch.rand(B, Hq, generator=g) if opts["alibi"] else None
    rows = pad = None
    if remap:
        rows = None if paged else torch.tensor([2, 0, 1], dtype=torch.int32)
        pad = torch.tensor([3, 0, 9], dtype=torch.int32)
    buckets = opts["rel"]
    t5 = torch.randn(Hq, buckets[1], generator=g, dtype=torch.float64) * 2
    capacity = 20  # contiguous S_max; paged 5 pages of 4
    rel = reference.rel_bias_by_distance(t5, Sq, capacity, *buckets).to(dtype)
    args = (lens, table, k_new, v_new, rows, pad, 0.25, opts["wl"], opts["wr"], alibi, opts["softcap"], rel)
    k1, v1, k2, v2 = k.clone(), v.clone(), k.clone(), v.clone()
    out, lse = T.attention_kvcache_driver(q, k1, v1, *args)
    exp, exp_lse = reference.attention_with_kvcache_fwd(q, k2, v2, *args)
    tol = 1e-6 if dtype == torch.float64 else 2e-5
    torch.testing.assert_close(out, exp, rtol=tol, atol=tol)
    torch.testing.assert_close(lse, exp_lse, rtol=tol, atol=tol)
    assert torch.equal(k1, k2) and torch.equal(v1, v2), "the appended cache differs"
    for b in range(B):
        n, start = int(lens[b]) + s_new, 0 if pad is None else int(pad[b])
        row = b if rows is None else int(rows[b])
        kb, vb = (_gather(c, table, row, b, start, n).double() for c in (k1, v1))
        want, want_lse = tk.attention(q[b:b + 1].double(), kb, vb, scale=0.25, window=(opts["wl"], opts["wr"]),
                                      alibi_slopes=None if alibi is None else alibi[b:b + 1], softcap=opts["softcap"],
                                      rel_bias=t5, rel_buckets=buckets, return_lse=True, backend="reference")
        torch.testing.assert_close(out[b:b + 1].double(), want, rtol=tol, atol=tol, msg=f"sequence {b}")
        torch.testing.assert_close(lse[b:b + 1].double(), want_lse, rtol=tol, atol=tol, msg=f"lse of sequence {b}")


def test_kvcache_driver_checks_rel_bias_shape():
    q, k, v, lens, table, k_new, v_new = _case(True, 1, seed=0)
    with pytest.raises(RuntimeError, match=r"rel_bias must be \(Hq, Sq \+ cache capacity - 1\) = \(4, 20\)"):
        T.attention_kvcache_driver(q, k, v, lens, table, k_new, v_new, None, None, 0.25, -1, 0, None, 0.0,
                                   torch.zeros(4, 19, dtype=torch.float64))
