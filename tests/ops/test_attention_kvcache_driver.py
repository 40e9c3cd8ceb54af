"""The CUDA backend's attention_with_kvcache driver (csrc/common/attention_kvcache_driver.h:
append in place, gather the sequence's keys, the dense kernel per sequence), built for the CPU
in the test-only extension, against the reference: outputs and the mutated caches."""
import pytest
import torch

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
