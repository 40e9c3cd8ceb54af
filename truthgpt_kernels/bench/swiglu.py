"""SwiGLU benchmark cases: forward + backward against the eager `F.silu(g) * u` with autograd.

- CPU: ours (default backend), the copy-bandwidth ceiling for the same bytes, eager; with the
  float64 reference for the error column.
- GPU: each of our GPU backends (CUDA C++, Triton) against eager, float32 and bfloat16.
"""
import torch
import torch.nn.functional as F

import truthgpt_kernels as tk
from truthgpt_kernels.ops import reference

from . import Case, copy_ceiling, fwd_bwd, gpu_backends, in_float64


def _fwd_bwd(fn):
    return fwd_bwd(lambda x: fn(x["g"], x["u"]), ("g", "u"))


def _setup(rows, n, device, dtype):
    def setup():
        g = torch.randn(rows, n, device=device, dtype=dtype, requires_grad=True)
        u = torch.randn(rows, n, device=device, dtype=dtype, requires_grad=True)
        return {"g": g, "u": u, "dy": torch.randn(rows, n, device=device, dtype=dtype)}
    return setup


def _bytes(rows, n, dtype):
    elem = torch.tensor([], dtype=dtype).element_size()
    return rows * n * elem * (3 + 5)  # fwd: read g,u write out; bwd: read dy,g,u write dg,du


def cases(device, quick):
    return gpu_cases(quick) if device == "cuda" else cpu_cases(quick)


def cpu_cases(quick=False, device="cpu"):
    rows, n = (256, 1376) if quick else (8192, 5504)
    out = []
    for dtype in (torch.float32, torch.bfloat16):
        nbytes = _bytes(rows, n, dtype)
        out.append(Case(
            op="swiglu", name=f"fwd+bwd {rows}x{n} {str(dtype)[6:]}",
            setup=copy_ceiling.with_copy(_setup(rows, n, device, dtype), nbytes, device, dtype),
            impls={"truthgpt": _fwd_bwd(tk.swiglu),
                   copy_ceiling.NAME: copy_ceiling.copy,
                   "torch eager": _fwd_bwd(lambda g, u: F.silu(g) * u)},
            bytes=nbytes,
            reference=in_float64(_fwd_bwd(reference.swiglu)),
        ))
    return out


def gpu_cases(quick=False, device="cuda"):
    rows, n = (256, 1376) if quick else (8192, 5504)
    out = []
    for dtype in (torch.float32, torch.bfloat16):
        impls = {}
        for b in gpu_backends("swiglu"):
            impls[f"truthgpt {b}"] = fwd_bwd(lambda x, b=b: tk.swiglu(x["g"], x["u"], backend=b), ("g", "u"))
        impls["torch eager"] = fwd_bwd(lambda x: F.silu(x["g"]) * x["u"], ("g", "u"))
        out.append(Case(op="swiglu", name=f"fwd+bwd {rows}x{n} {str(dtype)[6:]}",
                        setup=_setup(rows, n, device, dtype), impls=impls, bytes=_bytes(rows, n, dtype)))
    return out
