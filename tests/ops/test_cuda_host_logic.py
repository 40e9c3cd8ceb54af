"""Host builds of the CUDA kernels' logic (csrc/cuda/*_math.cuh, run on the CPU through the
test-only ops of csrc/testing/) against the float64 reference: the rotary decomposition,
vector-width choice and rotation; RMSNorm's thread teams, column ownership, grid-stride row
loop and deterministic dweight reduction; SwiGLU's vectorised index walk and math. The ops
also check that every output element is written exactly once. The kernels themselves run in
the `cuda`-marked tests of test_rotary.py / test_rms_norm.py / test_swiglu.py on a GPU."""
import zlib

import pytest
import torch

from truthgpt_kernels.ops import reference

from ..helpers import assert_close
from .host_ext import T, skip_unless_built

pytestmark = skip_unless_built


def _ops():
    return T


# --------------------------------------------------------------------------- rotary
def _rotary_case(gen, B, Hq, Hk, S, D, R, dtype, layout):
    """q, k with the given layout: "contiguous", "transposed" (B, S, H, D memory order),
    "inner" (inner stride 2), "offset" (a pointer one element past an aligned one)."""
    def make(H):
        if layout == "transposed":
            return torch.randn(B, S, H, D, generator=gen).to(dtype).transpose(1, 2)
        if layout == "inner":
            return torch.randn(B, H, S, 2 * D, generator=gen).to(dtype)[..., ::2]
        if layout == "offset":
            return torch.randn(B * H * S * D + 1, generator=gen).to(dtype)[1:].view(B, H, S, D)
        return torch.randn(B, H, S, D, generator=gen).to(dtype)
    return make(Hq), make(Hk)


def _positions(gen, B, S, P, kind):
    if kind == "arange":  # a broadcast view, stride 0 over the batch
        return torch.arange(S).expand(B, S)
    if kind == "repeat":
        return torch.randint(0, P, (1, S), generator=gen).expand(B, S)
    return torch.randint(0, P, (B, S), generator=gen)  # gaps and repeats


ROTARY_CASES = [
    # B, Hq, Hk, S, D, R, dtype, layout, positions
    (3, 7, 7, 9, 80, 80, torch.float32, "contiguous", "random"),
    (3, 7, 1, 9, 80, 32, torch.float32, "transposed", "arange"),
    (2, 4, 2, 5, 64, 64, torch.bfloat16, "contiguous", "repeat"),
    (2, 4, 2, 5, 96, 24, torch.bfloat16, "contiguous", "random"),
    (1, 3, 0, 4, 20, 12, torch.float16, "inner", "random"),
    (2, 2, 3, 3, 16, 16, torch.float32, "offset", "arange"),
    (1, 5, 2, 7, 6, 2, torch.float32, "contiguous", "random"),
    (2, 3, 3, 11, 128, 128, torch.float32, "contiguous", "random"),
]


@pytest.mark.parametrize("case", ROTARY_CASES, ids=lambda c: f"{c[:6]}-{str(c[6])[6:]}-{c[7]}-{c[8]}")
@pytest.mark.parametrize("interleaved", [False, True], ids=["neox", "gptj"])
def test_rotary_host_matches_reference(case, interleaved):
    B, Hq, Hk, S, D, R, dtype, layout, pos_kind = case
    gen = torch.Generator().manual_seed(zlib.crc32(str(case).encode()))
    P = 2 * S + 3
    cos, sin = reference.rotary_cos_sin(P, R)
    q, k = _rotary_case(gen, B, Hq, Hk, S, D, R, dtype, layout)
    pos = _positions(gen, B, S, P, pos_kind)
    qo, ko, v = _ops().rotary_host(q, k, cos, sin, pos, interleaved, 0)
    for name, x, out in (("q", q, qo), ("k", k, ko)):
        expected = reference.apply_rotary(x.double(), cos.double(), sin.double(),
                                          interleaved=interleaved, position_ids=pos)
        baseline = reference.apply_rotary(x, cos, sin, interleaved=interleaved, position_ids=pos)
        assert out.is_contiguous()
        assert_close(f"{name} (V={v})", out, expected, baseline)
    # the vector width: 16 bytes when everything is aligned, 1 without a unit inner stride
    half, elem = R // 2, q.element_size()
    if layout == "inner":
        assert v == 1
    elif layout == "offset":  # the data pointer sits one element past an aligned address
        assert v == 1
    else:
        widest = max(w for w in (1, 2, 4, 8) if w * elem <= 16 and half % w == 0 and D % w == 0)
        assert v == widest, (v, widest)


@pytest.mark.parametrize("vec", [1, 2, 4, 8])
@pytest.mark.parametrize("interleaved", [False, True], ids=["neox", "gptj"])
def test_rotary_host_every_vector_width(vec, interleaved):
    gen = torch.Generator().manual_seed(vec)
    B, Hq, Hk, S, D, R = 2, 3, 2, 5, 48, 32
    cos, sin = reference.rotary_cos_sin(16, R)
    q, k = _rotary_case(gen, B, Hq, Hk, S, D, R, torch.float32, "contiguous")
    pos = _positions(gen, B, S, 16, "random")
    qo, ko, v = _ops().rotary_host(q, k, cos, sin, pos, interleaved, vec)
    assert v == vec
    q1, k1, _ = _ops().rotary_host(q, k, cos, sin, pos, interleaved, 1)
    assert torch.equal(qo, q1) and torch.equal(ko, k1), "vector widths round differently"
    for x, out in ((q, qo), (k, ko)):
        expected = reference.apply_rotary(x.double(), cos.double(), sin.double(),
                                          interleaved=interleaved, position_ids=pos)
        assert_close("out", out, expected, reference.apply_rotary(x, cos, sin, interleaved=interleaved,
                                                                  position_ids=pos))


def test_rotary_host_inverse_rotation():
    """The backward is the same kernel with sin negated: rotating back restores x."""
    gen = torch.Generator().manual_seed(1)
    q, k = _rotary_case(gen, 2, 4, 2, 6, 64, 48, torch.float32, "contiguous")
    cos, sin = reference.rotary_cos_sin(32, 48)
    pos = _positions(gen, 2, 6, 32, "random")
    for inter in (False, True):
        qo, ko, _ = _ops().rotary_host(q, k, cos, sin, pos, inter, 0)
        qb, kb, _ = _ops().rotary_host(qo, ko, cos, -sin, pos, inter, 0)
        torch.testing.assert_close(qb, q, atol=1e-5, rtol=0)
        torch.testing.assert_close(kb, k, atol=1e-5, rtol=0)


def test_rotary_host_clamps_out_of_range_positions():
    """The public op rejects such positions; the kernel must still never read outside cos/sin."""
    q = torch.randn(1, 2, 4, 8)
    cos, sin = reference.rotary_cos_sin(5, 8)
    pos = torch.tensor([[-3, 0, 4, 99]])
    qo, _, _ = _ops().rotary_host(q, q[:, :0], cos, sin, pos, False, 0)
    expected = reference.apply_rotary(q.double(), cos.double(), sin.double(), position_ids=pos.clamp(0, 4))
    torch.testing.assert_close(qo.double(), expected, atol=1e-6, rtol=0)


def test_rotary_table_vector_loads():
    tv = _ops().rotary_table_vec
    cos, sin = reference.rotary_cos_sin(16, 64)         # (16, 32) float32, contiguous
    assert tv(cos, sin, 4) and tv(cos.bfloat16(), sin.bfloat16(), 8)
    assert not tv(cos, sin, 1)                           # scalar path anyway
    assert not tv(cos, -sin.t().contiguous().t(), 4)     # column-major sin
    wide = torch.randn(16, 34)
    assert not tv(wide[:, 1:33], sin, 4)                 # misaligned rows
    assert not tv(torch.randn(16, 35)[:, :32], sin, 4)   # row stride 35


# --------------------------------------------------------------------------- rms_norm
RMS_SHAPES = [(2, 4231), (9, 41, 341), (7,), (5, 64), (3, 4096), (4, 12288), (33, 8)]


def _weight(n, kind, gen):
    return None if kind is None else torch.randn(n, generator=gen)


@pytest.mark.parametrize("shape", RMS_SHAPES, ids=str)
@pytest.mark.parametrize("wkind", [None, "f32"], ids=["noweight", "weight"])
@pytest.mark.parametrize("blocks", [1, 3, 8])
def test_rms_norm_host_matches_reference(shape, wkind, blocks):
    gen = torch.Generator().manual_seed(len(shape) * 1000 + shape[-1])
    x = torch.randn(shape, generator=gen) * 2
    dy = torch.randn(shape, generator=gen)
    w = _weight(shape[-1], wkind, gen)
    eps = 1e-5
    ops = _ops()
    y, rstd, geo = ops.rms_norm_host_fwd(x, w, eps, 0, blocks)
    v, tpr, rpb = geo
    assert tpr % 32 == 0 and 32 <= tpr <= 1024 and tpr * rpb >= 256 and rpb <= 8
    assert v == (4 if shape[-1] % 4 == 0 else 1)
    w64 = None if w is None else w.double()
    ey, er = reference.rms_norm_fwd(x.double(), w64, eps)
    by, br = reference.rms_norm_fwd(x, w, eps)
    assert_close("y", y, ey, by)
    assert_close("rstd", rstd, er, br)
    dx, dw = ops.rms_norm_host_bwd(dy, x, w, rstd, 0, blocks)
    edx, edw = reference.rms_norm_bwd(dy.double(), x.double(), w64, er)
    bdx, bdw = reference.rms_norm_bwd(dy, x, w, br)
    assert_close("dx", dx, edx, bdx)
    if w is None:
        assert dw.numel() == 0
    else:
        # a sum over rows: allow the float32 rounding of that many additions
        assert_close("dweight", dw, edw, bdw.float(), atol=1e-5 * x.numel() ** 0.5)
        dx2, dw2 = ops.rms_norm_host_bwd(dy, x, w, rstd, 0, blocks)
        assert torch.equal(dw, dw2), "dweight is not reproducible"


def test_rms_norm_host_forced_scalar_path():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(6, 512, generator=gen)
    w = torch.randn(512, generator=gen)
    y1, r1, g1 = _ops().rms_norm_host_fwd(x, w, 1e-6, 1, 2)
    y4, r4, g4 = _ops().rms_norm_host_fwd(x, w, 1e-6, 4, 2)
    assert g1[0] == 1 and g4[0] == 4
    torch.testing.assert_close(y1, y4, atol=1e-6, rtol=1e-6)


def test_rms_norm_vector_width_choice():
    vec = _ops().rms_norm_vec
    assert vec(torch.randn(3, 64), None) == 4
    assert vec(torch.randn(3, 64).bfloat16(), None) == 8
    assert vec(torch.randn(3, 64).bfloat16(), torch.randn(64)) == 8      # float32 weight
    assert vec(torch.randn(3, 4231), None) == 1                          # n not a multiple
    assert vec(torch.randn(3, 65)[:, 1:], None) == 1                     # misaligned rows
    assert vec(torch.randn(3 * 64 + 1)[1:].view(3, 64), None) == 1       # misaligned pointer
    assert vec(torch.randn(3, 64), torch.randn(65)[1:]) == 1             # misaligned weight


# --------------------------------------------------------------------------- swiglu
@pytest.mark.parametrize("shape,packed", [((9, 41, 341), False), ((2, 4231), True), ((3, 5, 64), True),
                                          ((7, 128), False), ((1,), False)], ids=str)
def test_swiglu_host_matches_reference(shape, packed):
    gen = torch.Generator().manual_seed(shape[-1])
    full = shape[:-1] + (2 * shape[-1],)
    x = torch.randn(full, generator=gen) * 3
    g, u = x.chunk(2, -1) if packed else (x[..., : shape[-1]].contiguous(), x[..., shape[-1]:].contiguous())
    dy = torch.randn(shape, generator=gen)
    out, dg, du, v = _ops().swiglu_host(g, u, dy)
    n = shape[-1]
    assert v == (4 if n % 4 == 0 else 1)
    assert_close("out", out, reference.swiglu_fwd(g.double(), u.double()), reference.swiglu_fwd(g, u))
    edg, edu = reference.swiglu_bwd(dy.double(), g.double(), u.double())
    bdg, bdu = reference.swiglu_bwd(dy, g, u)
    assert_close("dgate", dg, edg, bdg)
    assert_close("dup", du, edu, bdu)
