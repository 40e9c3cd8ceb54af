"""RotaryEmbedding against an eager rotation, its tables across dtype casts, and the absolute
position embeddings."""
import math

import pytest
import torch

from truthgpt_kernels.modules import (AlibiSlopes, LearnedPositionalEmbedding, RotaryEmbedding,
                                      SinusoidalPositionalEmbedding, sinusoidal_table)

from .test_attention import rope_tables, rotate

f64 = torch.float64


@pytest.mark.parametrize("rotary_dim", [None, 6])
def test_rotary_matches_eager(rotary_dim):
    rope = RotaryEmbedding(16, rotary_dim=rotary_dim, base=1000.0, max_seq_len=32)
    q = torch.randn(2, 4, 9, 16, dtype=f64, requires_grad=True)
    k = torch.randn(2, 2, 9, 16, dtype=f64, requires_grad=True)
    R = rotary_dim or 16
    cos, sin = rope_tables(20, R, 1000.0)
    qo, ko = rope(q, k, offset=11)
    torch.testing.assert_close(qo, rotate(q, cos[11:], sin[11:]), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ko, rotate(k, cos[11:], sin[11:]), rtol=1e-12, atol=1e-12)
    gq, = torch.autograd.grad(qo.sum(), q)
    gq2, = torch.autograd.grad(rotate(q, cos[11:], sin[11:]).sum(), q)
    torch.testing.assert_close(gq, gq2)


def test_rotary_tables_stay_float32_and_grow():
    rope = RotaryEmbedding(8, max_seq_len=16)
    exact = rope.cos.clone()
    rope.to(torch.bfloat16)
    assert rope.cos.dtype == torch.float32 and torch.equal(rope.cos, exact)
    q = torch.randn(1, 1, 4, 8, dtype=torch.bfloat16)
    qo, _ = rope(q, q, offset=20)  # beyond max_seq_len: the tables grow
    assert rope.max_seq_len >= 24 and qo.dtype == torch.bfloat16
    assert rope.state_dict() == {}


def test_rotary_scaling_linear_halves_angles():
    a = RotaryEmbedding(8, scaling={"type": "linear", "factor": 2.0}, max_seq_len=8)
    b = RotaryEmbedding(8, max_seq_len=8)
    torch.testing.assert_close(a.cos[2], b.cos[1])
    with pytest.raises(ValueError, match="rotary_dim"):
        RotaryEmbedding(8, rotary_dim=5)


def test_alibi_slopes_survive_half():
    m = AlibiSlopes(6).half()
    assert m().dtype == torch.float32 and m().shape == (6,)


def test_sinusoidal():
    t = sinusoidal_table(10, 8)
    pos, i = 3, 2  # feature pair i: sin(pos / 10000^(2i/d)), cos(...)
    assert math.isclose(t[pos, 2 * i].item(), math.sin(pos / 10000 ** (2 * i / 8)), rel_tol=1e-6)
    assert math.isclose(t[pos, 2 * i + 1].item(), math.cos(pos / 10000 ** (2 * i / 8)), rel_tol=1e-6)
    emb = SinusoidalPositionalEmbedding(10, 8)
    assert torch.equal(emb(4, offset=3), t[3:7])
    with pytest.raises(ValueError, match="max_seq_len"):
        emb(8, offset=3)


def test_learned():
    emb = LearnedPositionalEmbedding(10, 8)
    assert torch.equal(emb(2, offset=5), emb.weight[5:7])
    with pytest.raises(ValueError, match="max_seq_len"):
        emb(11)
