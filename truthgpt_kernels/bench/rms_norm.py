"""RMSNorm benchmark cases: forward + backward (dx and dweight) against `F.rms_norm` with
autograd, and the copy-bandwidth ceiling for the same bytes."""
import torch
import torch.nn.functional as F

import truthgpt_kernels as tk

from . import Case, ceiling, fwd_bwd

EPS = 1e-6


def _fwd_bwd(fn):
    return fwd_bwd(lambda x: fn(x["x"], x["w"]), ("x", "w"))


def cases(device, quick):
    if device == "cuda":  # CUDA C++ and Triton against eager on the GPU
        from ..triton.small_ops_bench import rms_norm_cases
        return rms_norm_cases(device, quick)
    rows, n = (256, 4096) if quick else (8192, 4096)
    out = []
    for dtype in (torch.float32, torch.bfloat16):
        def setup(dtype=dtype):
            x = torch.randn(rows, n, device=device, dtype=dtype, requires_grad=True)
            w = (1 + 0.1 * torch.randn(n, device=device)).to(dtype).requires_grad_(True)
            return {"x": x, "w": w, "dy": torch.randn(rows, n, device=device, dtype=dtype)}
        elem = torch.tensor([], dtype=dtype).element_size()
        nbytes = rows * n * elem * (2 + 3)  # fwd: read x write y; bwd: read dy,x write dx
        out.append(Case(
            op="rms_norm", name=f"fwd+bwd {rows}x{n} {str(dtype)[6:]}",
            setup=ceiling.with_copy(setup, nbytes, device, dtype),
            impls={"truthgpt": _fwd_bwd(lambda x, w: tk.rms_norm(x, w, EPS)),
                   ceiling.NAME: ceiling.copy,
                   "torch F.rms_norm": _fwd_bwd(lambda x, w: F.rms_norm(x, (n,), w, EPS))},
            bytes=nbytes,
        ))
    return out
