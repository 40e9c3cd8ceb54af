"""The CUDA attention kernels' GPU-independent logic (csrc/cuda/attention_math.cuh), built for
the host into the test-only _C_testing (csrc/testing/attention.cpp) and checked against ops/reference.py without a
GPU: a scalar host "kernel" that walks the same tiles, skip lists, masks, score transforms,
online-softmax and backward steps as the CUDA kernels, plus the tile lists, register layouts
and index arithmetic on their own. The kernels themselves run in tests/ops/test_attention.py
(cuda marker) on a GPU."""
import math
import zlib

import pytest
import torch

from truthgpt_kernels import sparse
from truthgpt_kernels.ops import reference

from ..helpers import assert_close
from .host_ext import T, skip_unless_built

pytestmark = skip_unless_built

# name: (B, Hq, Hkv, Sq, Sk, D, options)
CASES = {
    "dense": (2, 2, 2, 17, 17, 8, {}),
    "causal": (1, 2, 2, 37, 37, 8, {"causal": True}),
    "causal_sq_lt_sk": (1, 2, 1, 7, 45, 8, {"causal": True}),
    "causal_sq_gt_sk_empty_rows": (1, 2, 2, 40, 17, 8, {"causal": True}),
    "noncausal_sq_gt_sk": (1, 2, 2, 40, 17, 8, {}),
    "decode_causal_gqa": (2, 4, 2, 1, 37, 16, {"causal": True}),
    "decode_mqa": (1, 4, 1, 1, 19, 8, {}),
    "len1": (1, 1, 1, 1, 1, 4, {}),
    "gqa3_odd": (1, 6, 2, 21, 29, 5, {"causal": True}),
    "head_dim_33": (1, 2, 1, 19, 23, 33, {}),
    "alibi_heads": (1, 4, 2, 33, 33, 8, {"causal": True, "alibi": "heads"}),
    "alibi_batch_heads": (2, 3, 3, 17, 40, 8, {"alibi": "batch_heads"}),
    "window_0_0": (1, 2, 2, 33, 33, 8, {"window": (0, 0)}),
    "window_5_0": (1, 2, 2, 40, 40, 8, {"window": (5, 0)}),
    "window_5_7_sq_lt_sk": (1, 2, 2, 29, 50, 8, {"window": (5, 7)}),
    "window_-1_3": (1, 2, 2, 40, 40, 8, {"window": (-1, 3)}),
    "window_3_-1_sq_gt_sk": (1, 2, 2, 50, 31, 8, {"window": (3, -1)}),
    "window_causal_alibi_softcap": (1, 2, 1, 70, 70, 8, {"window": (20, -1), "causal": True, "alibi": "heads",
                                                         "softcap": 4.0}),
    "block_bs1": (1, 2, 2, 23, 27, 8, {"layout": ("random", 1)}),
    "block_bs3_causal": (2, 2, 1, 31, 31, 8, {"layout": ("random", 3), "causal": True}),
    "block_bs16_local_broadcast": (1, 3, 3, 70, 70, 8, {"layout": ("local", 16)}),
    "block_bs16_bigbird": (2, 2, 1, 65, 65, 8, {"layout": ("bigbird", 16)}),
    "block_bs5_strided_sq_ne_sk": (1, 2, 2, 33, 47, 8, {"layout": ("strided", 5), "causal": True}),
    "block_bs64": (1, 2, 2, 129, 140, 8, {"layout": ("random", 64)}),
    "block_bs100": (1, 2, 2, 130, 230, 8, {"layout": ("random", 100)}),
    "block_all_false_head": (1, 2, 2, 20, 20, 8, {"layout": ("none_h0", 4)}),
    "key_mask_random": (2, 4, 2, 17, 33, 8, {"key_mask": "random"}),
    "key_mask_tail_causal_empty_rows": (2, 2, 2, 17, 17, 8, {"key_mask": "tail", "causal": True}),
    "key_mask_empty_batch": (2, 2, 2, 9, 40, 8, {"key_mask": "empty_b0"}),
    "softcap": (1, 2, 2, 33, 33, 8, {"softcap": 5.0, "causal": True}),
    "non_contiguous": (2, 4, 2, 17, 33, 8, {"layout_bshd": True}),
    "everything": (2, 4, 2, 40, 57, 8, {"causal": True, "alibi": "batch_heads", "window": (24, -1),
                                        "layout": ("bigbird", 16), "key_mask": "random", "softcap": 8.0,
                                        "layout_bshd": True}),
}
# (block_q, block_k): the real kernel tiles and small ones that make many ragged tiles
TILES = [(64, 64), (64, 32), (32, 64), (16, 16)]


def make(B, Hq, Hkv, Sq, Sk, D, opts, gen):
    def t(H, S):
        if opts.get("layout_bshd"):  # a transposed view of (B, S, H, D)
            return torch.randn(B, S, H, D, generator=gen, dtype=torch.float64).transpose(1, 2)
        return torch.randn(B, H, S, D, generator=gen, dtype=torch.float64)

    q, k, v = t(Hq, Sq), t(Hkv, Sk), t(Hkv, Sk)
    if opts.get("softcap"):
        q = q * 4
    causal = opts.get("causal", False)
    left, right = opts.get("window") or (-1, -1)
    if causal:
        right = 0 if right == -1 else min(right, 0)
    kw = {"window": (left, right), "softcap": opts.get("softcap", 0.0), "alibi_slopes": None,
          "block_mask": None, "block_size": 64, "key_mask": None}
    if opts.get("alibi") == "heads":
        kw["alibi_slopes"] = reference.alibi_slopes(Hq).expand(B, Hq)  # stride-0 batch
    elif opts.get("alibi") == "batch_heads":
        kw["alibi_slopes"] = torch.rand(B, Hq, generator=gen)
    if opts.get("layout"):
        kind, bs = opts["layout"]
        nq, nk = math.ceil(Sq / bs), math.ceil(Sk / bs)
        if kind == "random":
            m = torch.rand(B, Hq, nq, nk, generator=gen) > 0.5
        elif kind == "local":
            m = sparse.local_layout(Sq, Sk, block_size=bs, num_local_blocks=2)
        elif kind == "bigbird":
            m = sparse.bigbird_layout(Sq, Sk, block_size=bs, heads=Hq, num_random_blocks=1)
        elif kind == "strided":
            m = sparse.strided_layout(Sq, Sk, block_size=bs, stride=3)
        else:  # head 0 sees nothing
            m = torch.ones(B, Hq, nq, nk, dtype=torch.bool)
            m[:, 0] = False
        kw["block_mask"], kw["block_size"] = m.expand(B, Hq, nq, nk), bs  # broadcast views
    km = opts.get("key_mask")
    if km == "random":
        kw["key_mask"] = torch.rand(B, Sk, generator=gen) > 0.3
    elif km == "tail":
        kw["key_mask"] = torch.arange(Sk).expand(B, Sk) >= Sk // 2
    elif km == "empty_b0":
        kw["key_mask"] = torch.ones(B, Sk, dtype=torch.bool)
        kw["key_mask"][0] = False
    return (q, k, v), kw


def ref_call(q, k, v, kw, scale):
    return reference.attention(q, k, v, scale=scale, window=kw["window"], alibi_slopes=kw["alibi_slopes"],
                               block_mask=kw["block_mask"], block_size=kw["block_size"],
                               key_mask=kw["key_mask"], softcap=kw["softcap"], return_lse=True)


def kernel_args(kw, scale):
    return (scale, kw["window"][0], kw["window"][1], kw["alibi_slopes"], kw["block_mask"], kw["block_size"],
            kw["key_mask"], kw["softcap"], kw.get("rel"), kw.get("dropout_p", 0.0), kw.get("seed"))


@pytest.mark.parametrize("tiles", TILES, ids=lambda t: f"{t[0]}x{t[1]}")
@pytest.mark.parametrize("case", list(CASES))
def test_host_kernel_matches_reference(case, tiles):
    B, Hq, Hkv, Sq, Sk, D, opts = CASES[case]
    gen = torch.Generator().manual_seed(zlib.crc32(case.encode()))
    (q64, k64, v64), kw = make(B, Hq, Hkv, Sq, Sk, D, opts, gen)
    scale = D ** -0.5
    do64 = torch.randn(B, Hq, Sq, D, generator=gen, dtype=torch.float64)

    ins64 = [t.clone().requires_grad_(True) for t in (q64, k64, v64)]
    ref_out, ref_lse = ref_call(*ins64, kw, scale)
    ref_out.backward(do64)
    q, k, v = (t.float() for t in (q64, k64, v64))  # keeps the transposed strides
    base_out, base_lse = ref_call(q, k, v, kw, scale)  # float32 eager PyTorch: the baseline

    out, lse = T.attention_host_fwd(q, k, v, *kernel_args(kw, scale), *tiles)
    assert out.shape == (B, Hq, Sq, D) and lse.shape == (B, Hq, Sq) and out.is_contiguous()
    empty = torch.isinf(ref_lse)
    assert torch.equal(torch.isinf(lse), empty) and torch.all(lse[empty] < 0), "lse must be -inf exactly on empty rows"
    assert torch.all(out[empty] == 0), "rows with no visible key must output zeros"
    assert_close("out", out, ref_out.detach(), base_out, atol=1e-5)
    torch.testing.assert_close(lse[~empty].double(), ref_lse[~empty].double(), rtol=1e-5, atol=1e-5)

    do = do64.float()
    dq, dk, dv, _ = T.attention_host_bwd(do, q, k, v, out, lse, *kernel_args(kw, scale), *tiles)
    base = reference.attention_bwd(do, q, k, v, base_out, base_lse, *kernel_args(kw, scale))
    for name, ours, ref, b in zip(("dq", "dk", "dv"), (dq, dk, dv), ins64, base):
        assert ours.is_contiguous()
        assert_close(name, ours, ref.grad, b, atol=1e-5)
    assert torch.all(dq[empty] == 0), "rows with no visible key must have zero dq"


def test_host_backward_ignores_grad_of_empty_rows_and_keeps_strided_lse():
    """lse may arrive as a strided view; masked keys get exactly zero dk/dv."""
    gen = torch.Generator().manual_seed(1)
    (q64, k64, v64), kw = make(1, 2, 1, 12, 20, 8, {"key_mask": "random", "causal": True}, gen)
    q, k, v = (t.float() for t in (q64, k64, v64))
    out, lse = T.attention_host_fwd(q, k, v, *kernel_args(kw, 0.3), 16, 16)
    lse_strided = lse.transpose(1, 2).contiguous().transpose(1, 2)
    do = torch.randn(1, 2, 12, 8, generator=gen)
    a = T.attention_host_bwd(do, q, k, v, out, lse, *kernel_args(kw, 0.3), 16, 16)
    b = T.attention_host_bwd(do, q, k, v, out, lse_strided, *kernel_args(kw, 0.3), 16, 16)
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    masked = ~kw["key_mask"][0]
    assert torch.all(a[1][0, :, masked] == 0) and torch.all(a[2][0, :, masked] == 0)


# ------------------------------------------------------------------------------ tile lists
def tile_truth(vis, br, bc):
    """(any, all) visible per (query tile, key tile) of a bool (..., Sq, Sk) visibility."""
    Sq, Sk = vis.shape[-2:]
    nq, nk = math.ceil(Sq / br), math.ceil(Sk / bc)
    pad = torch.zeros(*vis.shape[:-2], nq * br, nk * bc, dtype=torch.bool)
    pad[..., :Sq, :Sk] = vis
    valid = torch.zeros(nq * br, nk * bc, dtype=torch.bool)
    valid[:Sq, :Sk] = True
    t = pad.reshape(*vis.shape[:-2], nq, br, nk, bc)
    v = valid.reshape(nq, br, nk, bc)
    return t.any(-1).any(-2), (t | ~v).all(-1).all(-2)


TILE_CASES = [
    # (Sq, Sk, window, layout (kind, block_size) or None)
    (100, 100, (-1, 0), None),
    (37, 130, (-1, 0), None),
    (130, 37, (-1, 0), None),
    (90, 90, (10, 0), None),
    (90, 120, (0, 0), None),
    (90, 70, (7, 33), None),
    (90, 90, (-1, 5), None),
    (129, 129, (-1, -1), ("local", 16)),
    (129, 200, (-1, -1), ("random", 64)),
    (129, 129, (-1, 0), ("strided", 16)),
    (100, 150, (20, 0), ("random", 7)),
    (70, 90, (-1, -1), ("random", 1)),  # too many blocks per tile to scan: never skipped
    (300, 300, (-1, -1), ("random", 200)),
]


@pytest.mark.parametrize("tiles", TILES, ids=lambda t: f"{t[0]}x{t[1]}")
@pytest.mark.parametrize("Sq,Sk,window,layout", TILE_CASES)
def test_visible_tile_lists(Sq, Sk, window, layout, tiles):
    br, bc = tiles
    gen = torch.Generator().manual_seed(Sq * 1000 + Sk)
    bm, bs = None, 64
    if layout:
        kind, bs = layout
        nq, nk = math.ceil(Sq / bs), math.ceil(Sk / bs)
        if kind == "local":
            bm = sparse.local_layout(Sq, Sk, block_size=bs, num_local_blocks=2).expand(2, 2, nq, nk)
        elif kind == "strided":
            bm = sparse.strided_layout(Sq, Sk, block_size=bs, stride=3)
        else:
            bm = torch.rand(2, 2, nq, nk, generator=gen) > 0.6
    vis = reference.attention_visibility(1, 1, Sq, Sk, window=window, block_mask=bm, block_size=bs)
    vis = vis.expand(*(bm.shape[:2] if bm is not None else (1, 1)), Sq, Sk)
    any_vis, all_vis = tile_truth(vis, br, bc)
    for by_key in (False, True):
        m = T.attention_tile_map(bm, Sq, Sk, window[0], window[1], bs, br, bc, by_key)
        visited = m >= 2
        # sound: every tile holding a visible pair is visited
        assert torch.all(visited[any_vis]), f"by_key={by_key}: a visible tile is skipped"
        # "full" (no per-element masking) only where every pair is visible
        assert torch.all(all_vis[m == 3]), f"by_key={by_key}: a tile marked full hides masked pairs"
        scan = bs is None or (math.ceil(br / bs) + 1) * (math.ceil(bc / bs) + 1) <= 64
        if scan:  # block scans within budget: the lists are exact
            assert torch.equal(visited, any_vis), f"by_key={by_key}: lists are not exact"
        if by_key:
            assert torch.equal(visited, fwd_visited), "forward and dK/dV lists disagree"
        else:
            fwd_visited = visited
            # the window range alone must already contain every visible tile
            assert torch.all((m >= 1)[any_vis])


# ------------------------------------------------------------------------------ layouts, indexing
def test_mma_fragment_layouts_are_consistent():
    acc, a, a_src, b, shfl = T.attention_fragment_maps()
    lanes = torch.arange(32)
    g, t = lanes // 4, lanes % 4

    def covers(coords, rows, cols):
        flat = coords.reshape(-1, 2)
        idx = flat[:, 0] * cols + flat[:, 1]
        return flat[:, 0].max() < rows and flat[:, 1].max() < cols and torch.equal(idx.sort().values,
                                                                                      torch.arange(rows * cols))

    # accumulators of 2 n-tiles: a 16 x 16 tile, each element once; PTX: row g (+8), col 2t (+1)
    assert covers(acc, 16, 16)
    assert torch.equal(acc[:, 0, 0, 0], g) and torch.equal(acc[:, 0, 0, 1], 2 * t)
    assert torch.equal(acc[:, 1, 3, 0], g + 8) and torch.equal(acc[:, 1, 3, 1], 8 + 2 * t + 1)
    # A operand: 16 x 16, each element once; B: 16 x 8 per n-tile
    assert covers(a, 16, 16)
    assert covers(b[:, 0], 16, 8)
    assert torch.equal(b[:, 1, :, 1], b[:, 0, :, 1] + 8)
    # consecutive element pairs share a 32-bit register: same row (A) / same column (B), next index
    assert torch.equal(a[:, 1::2, 0], a[:, 0::2, 0]) and torch.equal(a[:, 1::2, 1], a[:, 0::2, 1] + 1)
    assert torch.equal(b[:, :, 1::2, 1], b[:, :, 0::2, 1]) and torch.equal(b[:, :, 1::2, 0], b[:, :, 0::2, 0] + 1)
    # feeding an S accumulator back as the A operand (P V, dS K): same (row, k) coordinates
    assert torch.equal(a_src, a)
    # fp32 path: the shuffled register holds (this thread's row, column k)
    k = torch.arange(16)
    assert torch.equal(shfl[:, :, 0, 0], g[:, None].expand(32, 16))
    assert torch.equal(shfl[:, :, 1, 0], g[:, None].expand(32, 16) + 8)
    assert torch.equal(shfl[:, :, :, 1], k[None, :, None].expand(32, 16, 2))


@pytest.mark.parametrize("heads,n_tiles,n_slices", [(3, 5, 1), (1, 1, 2), (4, 7, 2)])
def test_block_coords_enumerate_the_grid(heads, n_tiles, n_slices):
    B = 3
    n = B * heads * n_tiles * n_slices
    c = T.attention_block_coords(n, heads, n_tiles, n_slices)
    grid = torch.cartesian_prod(torch.arange(B), torch.arange(heads), torch.arange(n_tiles), torch.arange(n_slices))
    assert torch.equal(c, grid)  # bijective, slices fastest, then tiles (L2 reuse of one head's K/V)


@pytest.mark.parametrize("Hq,Hkv", [(8, 8), (8, 2), (8, 1), (6, 3), (12, 4)])
def test_gqa_head_mapping(Hq, Hkv):
    # the reference repeats kv head j for query heads j * g .. j * g + g - 1
    expect = torch.arange(Hkv).repeat_interleave(Hq // Hkv)
    assert torch.equal(T.attention_kv_heads(Hq, Hkv), expect)


@pytest.mark.parametrize("S,D,rows,cols,vec", [(17, 8, 16, 32, 8), (70, 33, 64, 64, 8), (5, 96, 64, 96, 4),
                                                (129, 256, 32, 256, 4), (1, 1, 16, 32, 8)])
@pytest.mark.parametrize("strided", [False, True])
def test_tile_loader_index_arithmetic(S, D, rows, cols, vec, strided):
    x = torch.randn(2, S, 3, D).transpose(1, 2) if strided else torch.randn(2, 3, S, D)
    got = T.attention_gather_tiles(x, rows, cols, vec)
    n = math.ceil(S / rows) * rows
    expect = torch.zeros(2, 3, n, cols)
    expect[:, :, :S, :D] = x
    assert torch.equal(got, expect)


def test_tile_configs_and_head_dim_buckets():
    cfg, buckets = T.attention_tile_configs()
    d = torch.arange(301)
    expect = torch.zeros(301, dtype=torch.long)
    for lo, hi, bkt in [(1, 32, 32), (33, 64, 64), (65, 96, 96), (97, 128, 128), (129, 192, 192), (193, 256, 256)]:
        expect[(d >= lo) & (d <= hi)] = bkt
    assert torch.equal(buckets, expect)  # every head dim 1..256 has a kernel; 0 and > 256 none
    for eb, D, fbr, fbc, abc, abr, ads, qbr, qbc, qds in cfg.tolist():
        pitch = D + 16 // eb
        for x in (fbr, fbc, abc, abr, qbr, qbc):
            assert x % 16 == 0 and x >= 16
        for ds in (ads, qds):
            assert ds % 8 == 0 and D % ds == 0 and ds <= 128
        smem = {"fwd": (fbr + 2 * fbc) * pitch * eb + fbc,
                "dkdv": (2 * abc + 2 * abr) * pitch * eb + 8 * abr,
                "dq": (2 * qbr + 2 * qbc) * pitch * eb + qbc}
        for name, bytes_ in smem.items():
            assert bytes_ <= 160 * 1024, f"{name} D={D} elem={eb}: {bytes_} B of shared memory"


@pytest.mark.parametrize("which", "qkv")
@pytest.mark.parametrize("tiles", [(64, 64), (16, 16)], ids=lambda t: f"{t[0]}x{t[1]}")
def test_host_kernel_nan_reaches_its_rows(which, tiles):
    """A NaN in q, k or v makes exactly the rows that see it NaN (fmaxf would drop it from
    the row max and leave zeros), lse too for q/k; rows without a visible key stay zero."""
    gen = torch.Generator().manual_seed(7)
    (q64, k64, v64), kw = make(1, 2, 1, 40, 33, 8, {"causal": True}, gen)
    q, k, v = (t.float().contiguous() for t in (q64, k64, v64))
    t = {"q": q, "k": k, "v": v}[which]
    pos = 20
    t[0, t.shape[1] - 1, pos, 3] = float("nan")
    vis = reference.attention_visibility(1, 2, 40, 33, window=kw["window"])[0, 0]  # (Sq, Sk)
    reached = torch.zeros(1, 2, 40, dtype=torch.bool)
    if which == "q":
        reached[0, 1, pos] = bool(vis[pos].any())
    else:
        reached[0, :, :] = vis[:, pos]
    out, lse = T.attention_host_fwd(q, k, v, *kernel_args(kw, 0.35), *tiles)
    bad = torch.isnan(out).any(-1)
    assert bad[reached].all()
    if which != "v":
        assert torch.equal(bad, reached) and torch.equal(torch.isnan(lse), reached)
    empty = ~vis.any(-1)
    assert torch.all(out[0, :, empty] == 0)


@pytest.mark.parametrize("opts", [{"window": (0, 0)}, {"causal": True}, {"key_mask": "one"}],
                         ids=["window_0_0", "causal", "key_mask_one"])
@pytest.mark.parametrize("tiles", [(64, 64), (16, 16)], ids=lambda t: f"{t[0]}x{t[1]}")
def test_host_kernel_one_key_rows_get_exact_zero_dq(opts, tiles):
    """delta is computed by the product that computes dP (the fp32 path's fma chain), so a row
    whose only visible key is j gets dS exactly 0: dq of the row is 0, and dk of a key that
    only such rows see."""
    gen = torch.Generator().manual_seed(3)
    B, Hq, Hkv, Sq, Sk, D = 1, 4, 2, 33, 33, 16
    (q64, k64, v64), kw = make(B, Hq, Hkv, Sq, Sk, D, {o: x for o, x in opts.items() if o != "key_mask"}, gen)
    if opts.get("key_mask"):
        kw["key_mask"] = torch.zeros(B, Sk, dtype=torch.bool)
        kw["key_mask"][:, 11] = True
    q, k, v = (t.float().contiguous() for t in (q64, k64, v64))
    out, lse = T.attention_host_fwd(q, k, v, *kernel_args(kw, D ** -0.5), *tiles)
    do = torch.randn(B, Hq, Sq, D, generator=gen)
    dq, dk, dv, _ = T.attention_host_bwd(do, q, k, v, out, lse, *kernel_args(kw, D ** -0.5), *tiles)
    vis = reference.attention_visibility(B, Hq, Sq, Sk, window=kw["window"], key_mask=kw["key_mask"])
    vis = vis.expand(B, Hq, Sq, Sk)
    one = vis.sum(-1) == 1
    assert one.any() and dq[one].abs().max().item() == 0
    g = Hq // Hkv
    only_one = (~vis.reshape(B, Hkv, g, Sq, Sk) | one.reshape(B, Hkv, g, Sq, 1)).all(2).all(2)
    if only_one.any():
        assert dk[only_one].abs().max().item() == 0
    assert dv.abs().max() > 0


@pytest.mark.parametrize("tiles", [(16, 16), (64, 32)], ids=lambda t: f"{t[0]}x{t[1]}")
@pytest.mark.parametrize("opts", [{"causal": True}, {"window": (5, 3), "alibi": "heads", "softcap": 3.0},
                                  {"key_mask": "random"}], ids=["causal", "window_alibi_softcap", "key_mask"])
def test_host_kernel_rel_bias_and_dropout(opts, tiles):
    """The CUDA kernels' T5 bias by distance and Philox dropout (forward, dQ / dK / dV and the
    bias-gradient kernel) against the float64 reference given the same keep mask."""
    gen = torch.Generator().manual_seed(11)
    B, Hq, Hkv, Sq, Sk, D, p = 2, 4, 2, 19, 27, 16, 0.3
    (q64, k64, v64), kw = make(B, Hq, Hkv, Sq, Sk, D, opts, gen)
    rel64 = torch.randn(Hq, Sq + Sk - 1, generator=gen, dtype=torch.float64)
    kw.update(rel=rel64.float(), dropout_p=p, seed=torch.tensor(1234))
    keep = reference.dropout_keep_mask(1234, (B, Hq, Sq, Sk), p)
    scale = D ** -0.5
    do64 = torch.randn(B, Hq, Sq, D, generator=gen, dtype=torch.float64)
    ins64 = [t.clone().requires_grad_(True) for t in (q64, k64, v64, rel64)]
    ref_out, ref_lse = reference._attention(
        *ins64[:3], causal=False, scale=scale, alibi_slopes=kw["alibi_slopes"], window=kw["window"],
        block_mask=kw["block_mask"], block_size=kw["block_size"], key_mask=kw["key_mask"], softcap=kw["softcap"],
        rel_vec=ins64[3], keep=keep, dropout_p=p, return_lse=True)
    ref_out.backward(do64)
    q, k, v = (t.float() for t in (q64, k64, v64))
    out, lse = T.attention_host_fwd(q, k, v, *kernel_args(kw, scale), *tiles)
    # float32 kernels on O(1) values: a fixed tolerance (the mask must match exactly for it)
    torch.testing.assert_close(out.double(), ref_out.detach(), rtol=1e-4, atol=1e-5)
    grads = T.attention_host_bwd(do64.float(), q, k, v, out, lse, *kernel_args(kw, scale), *tiles)
    for name, ours, ref in zip(("dq", "dk", "dv", "drel"), grads, ins64):
        torch.testing.assert_close(ours.double(), ref.grad, rtol=1e-4, atol=1e-4, msg=lambda m: f"{name}: {m}")
