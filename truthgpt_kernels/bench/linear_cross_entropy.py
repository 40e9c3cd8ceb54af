"""Fused linear cross-entropy benchmark cases: forward + backward (dx, dweight) of the LM head
and its loss against the eager `F.cross_entropy(F.linear(x, w), t)`, which materialises the
(N, V) logits (compare the peak-memory column). The float64 reference is only computed for
the quick size (at full size its logits alone take 2 GB)."""
import torch
import torch.nn.functional as F

import truthgpt_kernels as tk
from truthgpt_kernels.ops import reference

from . import Case, fwd_bwd, in_float64


def _fwd_bwd(fn):
    return fwd_bwd(lambda x: fn(x["x"], x["w"], x["t"]), ("x", "w"))


def cases(device, quick):
    N, d, V = (512, 256, 4000) if quick else (8192, 2048, 32000)
    out = []
    for dtype in (torch.float32, torch.bfloat16):
        def setup(dtype=dtype):
            x = torch.randn(N, d, device=device, dtype=dtype, requires_grad=True)
            w = (torch.randn(V, d, device=device) * d ** -0.5).to(dtype).requires_grad_(True)
            t = torch.randint(0, V, (N,), device=device)
            t[::10] = -100  # some padding
            return {"x": x, "w": w, "t": t, "dy": torch.ones((), device=device, dtype=dtype)}
        out.append(Case(
            op="linear_cross_entropy", name=f"fwd+bwd N={N} d={d} V={V} {str(dtype)[6:]}",
            setup=setup,
            impls={"truthgpt": _fwd_bwd(tk.linear_cross_entropy),
                   "torch eager": _fwd_bwd(lambda x, w, t: F.cross_entropy(F.linear(x, w), t))},
            flops=6.0 * N * d * V,
            reference=in_float64(_fwd_bwd(reference.linear_cross_entropy)) if quick else None,
        ))
    return out
