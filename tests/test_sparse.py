"""truthgpt_kernels.sparse: block layouts for tk.attention(block_mask=...), checked against
direct definitions, and used end to end with the reference attention."""
import math

import pytest
import torch

import truthgpt_kernels as tk
from truthgpt_kernels import sparse
from truthgpt_kernels.ops import reference


def grid(seq_q, seq_k, bs):
    """(query block's key-block position, key block) index pairs, bottom-right aligned."""
    nq, nk = math.ceil(seq_q / bs), math.ceil(seq_k / bs)
    return [(a, a + nk - nq, b) for a in range(nq) for b in range(nk)], nq, nk


def naive(seq_q, seq_k, bs, visible):
    pairs, nq, nk = grid(seq_q, seq_k, bs)
    m = torch.zeros(nq, nk, dtype=torch.bool)
    for a, qi, kj in pairs:
        m[a, kj] = visible(qi, kj)
    return m


SHAPES = [(256, None, 64), (129, 129, 16), (100, 300, 32), (300, 100, 32), (1, 200, 64), (64, 64, 64)]


@pytest.mark.parametrize("seq_q,seq_k,bs", SHAPES)
@pytest.mark.parametrize("causal", [False, True])
def test_local_layout(seq_q, seq_k, bs, causal):
    m = sparse.local_layout(seq_q, seq_k, block_size=bs, num_local_blocks=3, causal=causal)
    sk = seq_q if seq_k is None else seq_k
    want = naive(seq_q, sk, bs, lambda qi, kj: abs(qi - kj) < 3 and (not causal or kj <= qi))
    assert m.dtype == torch.bool and m.shape == (1, 1) + want.shape
    assert torch.equal(m[0, 0], want)


@pytest.mark.parametrize("seq_q,seq_k,bs", SHAPES)
@pytest.mark.parametrize("causal", [False, True])
def test_local_global_layout(seq_q, seq_k, bs, causal):
    sk = seq_q if seq_k is None else seq_k
    nk = math.ceil(sk / bs)
    glob = {0, nk - 1}
    m = sparse.local_global_layout(seq_q, seq_k, block_size=bs, num_local_blocks=2,
                                   global_blocks=sorted(glob), causal=causal)

    def vis(qi, kj):
        v = abs(qi - kj) < 2 or kj in glob or qi in glob  # qi < 0 sits at no key block
        return v and (not causal or kj <= qi)

    assert torch.equal(m[0, 0], naive(seq_q, sk, bs, vis))


def test_local_global_extra_query_blocks_are_not_global():
    # seq_q > seq_k: the first query blocks precede every key block; block 0 being global
    # must not make them see all keys
    m = sparse.local_global_layout(256, 128, block_size=64, num_local_blocks=1, global_blocks=(0,))
    assert m.shape == (1, 1, 4, 2)
    assert m[0, 0, 0].tolist() == [True, False]  # sees the global key block only
    assert m[0, 0, 2].tolist() == [True, True]   # query block at key block 0 is global


@pytest.mark.parametrize("seq_q,seq_k,bs", SHAPES)
@pytest.mark.parametrize("causal", [False, True])
def test_strided_layout(seq_q, seq_k, bs, causal):
    sk = seq_q if seq_k is None else seq_k
    m = sparse.strided_layout(seq_q, seq_k, block_size=bs, stride=3, causal=causal)
    want = naive(seq_q, sk, bs, lambda qi, kj: (abs(qi - kj) < 3 or kj % 3 == 2) and (not causal or kj <= qi))
    assert torch.equal(m[0, 0], want)


def test_bigbird_layout_structure_and_seed():
    S, bs, H = 1024, 64, 4
    m = sparse.bigbird_layout(S, block_size=bs, num_local_blocks=3, num_global_blocks=1,
                              num_random_blocks=2, heads=H, seed=7)
    nb = S // bs
    assert m.shape == (1, H, nb, nb) and m.dtype == torch.bool
    base = sparse.local_global_layout(S, block_size=bs, num_local_blocks=3, global_blocks=(0,))[0, 0]
    assert torch.all(m[0] >= base), "local and global blocks are always present"
    extra = (m[0] & ~base).sum(-1)
    assert torch.all(extra <= 2), "at most num_random_blocks random blocks per query block"
    assert extra.sum() > 0
    # seeded: same seed, same mask; another seed or head differs
    assert torch.equal(m, sparse.bigbird_layout(S, block_size=bs, num_local_blocks=3, num_global_blocks=1,
                                                num_random_blocks=2, heads=H, seed=7))
    other = sparse.bigbird_layout(S, block_size=bs, num_local_blocks=3, num_global_blocks=1,
                                  num_random_blocks=2, heads=H, seed=8)
    assert not torch.equal(m, other)
    assert not torch.equal(m[0, 0], m[0, 1])
    # ~10% density at S 4096 with a 3-block band (the benchmark's case)
    d = sparse.density(sparse.bigbird_layout(4096, block_size=64, num_local_blocks=2, heads=8))
    assert 0.07 < d < 0.13


def test_bigbird_layout_causal_and_rectangular():
    m = sparse.bigbird_layout(100, 300, block_size=32, heads=2, causal=True, seed=1)
    assert m.shape == (1, 2, 4, 10)
    qi = torch.arange(4)[:, None] + 6
    assert not torch.any(m[0] & (torch.arange(10)[None, :] > qi)), "causal: no future blocks"


@pytest.mark.parametrize("shape", [(70, 130), (3, 70, 130), (2, 3, 64, 64)])
def test_block_mask_from_dense(shape):
    bs = 32
    dense = torch.rand(shape) > 0.97
    m = sparse.block_mask_from_dense(dense, bs)
    Sq, Sk = shape[-2:]
    nq, nk = math.ceil(Sq / bs), math.ceil(Sk / bs)
    assert m.dim() == 4 and m.shape[-2:] == (nq, nk)
    flat = m.reshape(-1, nq, nk)
    dflat = dense.reshape(-1, Sq, Sk)
    for x in range(flat.shape[0]):
        for a in range(nq):
            for b in range(nk):
                blk = dflat[x, a * bs:(a + 1) * bs, b * bs:(b + 1) * bs]
                assert bool(flat[x, a, b]) == bool(blk.any())


def test_block_mask_from_dense_round_trip():
    layout = sparse.bigbird_layout(256, block_size=32, heads=2, seed=3)
    dense = layout.repeat_interleave(32, -2).repeat_interleave(32, -1)
    assert torch.equal(sparse.block_mask_from_dense(dense, 32), layout)


def test_density():
    m = torch.zeros(1, 2, 4, 4, dtype=torch.bool)
    m[0, 0, :2] = True
    assert sparse.density(m) == pytest.approx(0.25)


@pytest.mark.parametrize("layout", ["local", "local_global", "bigbird", "strided"])
def test_layouts_in_attention_match_dense_masks(layout):
    """A layout given as block_mask gives the attention of its expanded token mask."""
    B, H, S, D, bs = 1, 2, 100, 16, 16
    make = {
        "local": lambda: sparse.local_layout(S, block_size=bs, num_local_blocks=2),
        "local_global": lambda: sparse.local_global_layout(S, block_size=bs, num_local_blocks=2, global_blocks=(2,)),
        "bigbird": lambda: sparse.bigbird_layout(S, block_size=bs, heads=H, seed=0),
        "strided": lambda: sparse.strided_layout(S, block_size=bs, stride=3),
    }
    m = make[layout]()
    q, k, v = (torch.randn(B, H, S, D, dtype=torch.float64) for _ in range(3))
    out = tk.attention(q, k, v, block_mask=m, block_size=bs, backend="reference")
    dense = m.repeat_interleave(bs, -2).repeat_interleave(bs, -1)[..., :S, :S]
    s = (q @ k.transpose(-1, -2)) * D ** -0.5
    p = torch.softmax(s.masked_fill(~dense, float("-inf")), -1).nan_to_num(0.0)
    torch.testing.assert_close(out, p @ v)
    vis = reference.attention_visibility(B, H, S, S, block_mask=m, block_size=bs)
    assert torch.equal(vis.expand(B, H, S, S), dense.expand(B, H, S, S))


@pytest.mark.parametrize("call,exc", [
    (lambda: sparse.local_layout(0), ValueError),
    (lambda: sparse.local_layout(64, block_size=0), ValueError),
    (lambda: sparse.local_layout(64, num_local_blocks=0), ValueError),
    (lambda: sparse.local_global_layout(64, num_local_blocks=0), ValueError),
    (lambda: sparse.local_global_layout(128, block_size=64, global_blocks=(2,)), ValueError),
    (lambda: sparse.bigbird_layout(64, heads=0), ValueError),
    (lambda: sparse.bigbird_layout(64, num_random_blocks=-1), ValueError),
    (lambda: sparse.bigbird_layout(64, num_global_blocks=-1), ValueError),
    (lambda: sparse.strided_layout(64, stride=0), ValueError),
    (lambda: sparse.local_layout(64.0), TypeError),
    (lambda: sparse.block_mask_from_dense(torch.ones(4, 4), 2), TypeError),
    (lambda: sparse.block_mask_from_dense(torch.ones(4, dtype=torch.bool), 2), ValueError),
    (lambda: sparse.block_mask_from_dense(torch.ones(4, 4, dtype=torch.bool), 0), ValueError),
])
def test_bad_arguments(call, exc):
    with pytest.raises(exc):
        call()
