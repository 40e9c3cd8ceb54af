"""Every public op under torch.compile(fullgraph=True), forward and backward, with no graph
breaks and the same results as eager."""
import pytest
import torch

import truthgpt_kernels as tk
from truthgpt_kernels import backends

BACKENDS = [b for b in ("cpu", "reference") if not backends.unavailable_reason(b)]


def _attention(b):
    q, k, v = torch.randn(2, 4, 9, 16), torch.randn(2, 2, 11, 16), torch.randn(2, 2, 11, 16)
    slopes = tk.alibi_slopes(4)
    return (lambda q, k, v: tk.attention(q, k, v, causal=True, alibi_slopes=slopes, window=(6, -1),
                                         softcap=5.0, backend=b)), (q, k, v)


def _rotary(b):
    cos, sin = tk.rotary_cos_sin(32, 12)
    q, k = torch.randn(2, 4, 9, 16), torch.randn(2, 2, 9, 16)
    return (lambda q, k: sum(t.sum() for t in tk.apply_rotary_qk(q, k, cos, sin, offset=3, backend=b))
            + tk.apply_rotary(q, cos, sin, interleaved=True, backend=b).square().sum()), (q, k)


def _swiglu(b):
    return (lambda x: tk.swiglu(x, backend=b)), (torch.randn(5, 24),)


def _rms_norm(b):
    return (lambda x, w: tk.rms_norm(x, w, backend=b)), (torch.randn(5, 24), torch.randn(24))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("make", [_attention, _rotary, _swiglu, _rms_norm], ids=lambda f: f.__name__[1:])
def test_compile_fullgraph_matches_eager(make, backend):
    family = make.__name__[1:].replace("_qk", "")
    if not backends.implements(family, backend):
        pytest.skip(f"backend {backend!r} has no {family} kernel yet")
    torch._dynamo.reset()
    fn, inputs = make(backend)
    eager_in = [t.clone().requires_grad_() for t in inputs]
    comp_in = [t.clone().requires_grad_() for t in inputs]
    expected = fn(*eager_in)
    expected.sum().backward()
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    out = compiled(*comp_in)
    out.sum().backward()
    torch.testing.assert_close(out, expected)
    for a, b in zip(comp_in, eager_in):
        torch.testing.assert_close(a.grad, b.grad)
