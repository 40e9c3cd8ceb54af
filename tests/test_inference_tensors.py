"""Inputs made under torch.inference_mode (a batch from an inference-mode data pipeline, a
cached table) combined with a trainable parameter, outside inference mode: torch's composite
ops save tensors derived from the input and work, while our ops saved the input itself and
raised "Inference tensors cannot be saved for backward". Each op's value and parameter
gradient equal torch's on normal copies of the inputs (backends.saveable clones an inference
input for the backward)."""
import pytest
import torch
import torch.nn.functional as F

import truthgpt_kernels as tk

D = 32


def _cases(x, q, k, v, idx):
    return {
        "rms_norm": (lambda w: tk.rms_norm(x, w), lambda w: F.rms_norm(x, (D,), w)),
        "RMSNorm module": (lambda w: tk.modules.RMSNorm(D)(x) * w, lambda w: torch.nn.RMSNorm(D)(x) * w),
        "add_rms_norm": (lambda w: tk.add_rms_norm(x, x * 0.5, w)[0], lambda w: F.rms_norm(x * 1.5, (D,), w)),
        "layer_norm": (lambda w: tk.layer_norm(x, w), lambda w: F.layer_norm(x, (D,), w)),
        "swiglu gate": (lambda w: tk.swiglu(x, w.expand_as(x)), lambda w: F.silu(x) * w),
        "swiglu up": (lambda w: tk.swiglu(w.expand_as(x), x), lambda w: F.silu(w) * x),
        "geglu gate": (lambda w: tk.geglu(x, w.expand_as(x)), lambda w: F.gelu(x, approximate="tanh") * w),
        "linear": (lambda w: tk.linear(x, w.view(1, D)), lambda w: F.linear(x, w.view(1, D))),
        "attention": (lambda w: tk.attention(q + w[:16], k, v, causal=True),
                      lambda w: F.scaled_dot_product_attention(q + w[:16], k, v, is_causal=True)),
        "attention v": (lambda w: tk.attention(q, k, v + w[:16], causal=True),
                        lambda w: F.scaled_dot_product_attention(q, k, v + w[:16], is_causal=True)),
        "linear_cross_entropy": (lambda w: tk.linear_cross_entropy(x, w.view(1, D).expand(10, D) * 1, idx),
                                 lambda w: F.cross_entropy(F.linear(x, w.view(1, D).expand(10, D)), idx)),
    }


@pytest.mark.parametrize("name", list(_cases(*[None] * 5)))
def test_inference_input_with_trainable_parameter(name):
    g = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        x = torch.randn(4, D, generator=g)
        q, k, v = (torch.randn(1, 2, 8, 16, generator=g) for _ in range(3))
        idx = torch.randint(0, 10, (4,), generator=g)
    assert x.is_inference()
    ours = _cases(x, q, k, v, idx)[name][0]
    # torch's side on normal copies (torch's own linear, layer_norm, SDPA and x * w raise on an
    # inference input here too: ours does better than torch there)
    theirs = _cases(*(t.clone() for t in (x, q, k, v, idx)))[name][1]
    results = []
    for fn in (ours, theirs):
        w = (torch.rand(D, generator=torch.Generator().manual_seed(1)) + 0.5).requires_grad_()
        out = fn(w)
        out.square().sum().backward()
        results.append((out.detach(), w.grad))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(results[0][1], results[1][1], rtol=1e-4, atol=1e-5)
