"""Fused cross-entropy (on given logits) benchmark cases: forward + backward (d logits) against
the eager `F.cross_entropy(logits, t)` and torch.compile of it, and ours with
inplace_backward=True (flash-attn's option: the gradient written over the logits, no (N, V)
buffer; it runs on its own copy of the logits, which after the first call hold gradients: the
same work per call). The float64 reference is only computed for the quick size."""
import torch
import torch.nn.functional as F

import truthgpt_kernels as tk
from truthgpt_kernels.ops import reference

from . import Case, fwd_bwd, in_float64


def _fwd_bwd(fn):
    return fwd_bwd(lambda x: fn(x["logits"], x["t"]), ("logits",))


def cases(device, quick):
    N, V = (512, 4000) if quick else (8192, 32000)
    compiled = torch.compile(F.cross_entropy, dynamic=False)
    out = []
    for dtype in (torch.float32, torch.bfloat16):
        def setup(dtype=dtype):
            logits = (torch.randn(N, V, device=device) * 3).to(dtype).requires_grad_(True)
            t = torch.randint(0, V, (N,), device=device)
            t[::10] = -100  # some padding
            return {"logits": logits, "t": t, "dy": torch.ones((), device=device, dtype=dtype),
                    "logits_ip": logits.detach().clone().requires_grad_(True)}
        out.append(Case(
            op="cross_entropy", name=f"fwd+bwd N={N} V={V} {str(dtype)[6:]}",
            setup=setup,
            impls={"truthgpt": _fwd_bwd(tk.cross_entropy),
                   "torch eager": _fwd_bwd(F.cross_entropy),
                   "torch.compile": _fwd_bwd(lambda x, t: compiled(x, t)),
                   "truthgpt inplace_backward": fwd_bwd(
                       lambda x: tk.cross_entropy(x["logits_ip"], x["t"], inplace_backward=True), ("logits_ip",))},
            bytes=3.0 * N * V * torch.empty((), dtype=dtype).element_size(),
            reference=in_float64(_fwd_bwd(reference.cross_entropy)) if quick else None,
        ))
    return out
