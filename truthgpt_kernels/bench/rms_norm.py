"""RMSNorm benchmark cases: forward + backward (dx and dweight) against `F.rms_norm` with
autograd.

- CPU: ours (default backend), the copy-bandwidth ceiling for the same bytes, F.rms_norm.
- GPU: each of our GPU backends (CUDA C++, Triton) against F.rms_norm, float32 and bfloat16.
"""
import torch
import torch.nn.functional as F

import truthgpt_kernels as tk

from . import Case, copy_ceiling, fwd_bwd, gpu_backends

EPS = 1e-6


def _fwd_bwd(fn):
    return fwd_bwd(lambda x: fn(x["x"], x["w"]), ("x", "w"))


def _setup(rows, n, device, dtype, weight):
    """x and dy (rows, n) and the weight `weight()` (n,), x and the weight requiring grad."""
    def setup():
        x = torch.randn(rows, n, device=device, dtype=dtype, requires_grad=True)
        w = weight().requires_grad_(True)
        return {"x": x, "w": w, "dy": torch.randn(rows, n, device=device, dtype=dtype)}
    return setup


def _bytes(rows, n, dtype):
    elem = torch.tensor([], dtype=dtype).element_size()
    # fwd: read x, write y; bwd: read dy, x, write dx (weight, rstd: negligible)
    return rows * n * elem * (2 + 3)


def cases(device, quick):
    return gpu_cases(quick) if device == "cuda" else cpu_cases(quick)


def cpu_cases(quick=False, device="cpu"):
    rows, n = (256, 4096) if quick else (8192, 4096)
    out = []
    for dtype in (torch.float32, torch.bfloat16):
        def weight(dtype=dtype):
            return (1 + 0.1 * torch.randn(n, device=device)).to(dtype)
        nbytes = _bytes(rows, n, dtype)
        out.append(Case(
            op="rms_norm", name=f"fwd+bwd {rows}x{n} {str(dtype)[6:]}",
            setup=copy_ceiling.with_copy(_setup(rows, n, device, dtype, weight), nbytes, device, dtype),
            impls={"truthgpt": _fwd_bwd(lambda x, w: tk.rms_norm(x, w, EPS)),
                   copy_ceiling.NAME: copy_ceiling.copy,
                   "torch F.rms_norm": _fwd_bwd(lambda x, w: F.rms_norm(x, (n,), w, EPS))},
            bytes=nbytes,
        ))
    return out


def gpu_cases(quick=False, device="cuda"):
    rows, n = (256, 1024) if quick else (8192, 4096)
    out = []
    for dtype in (torch.float32, torch.bfloat16):
        def weight(dtype=dtype):
            return torch.randn(n, device=device, dtype=dtype)

        impls = {}
        for b in gpu_backends("rms_norm"):
            impls[f"truthgpt {b}"] = fwd_bwd(lambda x, b=b: tk.rms_norm(x["x"], x["w"], EPS, backend=b),
                                              ("x", "w"))
        impls["torch eager"] = fwd_bwd(lambda x: F.rms_norm(x["x"], (n,), x["w"], EPS), ("x", "w"))
        out.append(Case(op="rms_norm", name=f"fwd+bwd {rows}x{n} {str(dtype)[6:]}",
                        setup=_setup(rows, n, device, dtype, weight), impls=impls,
                        bytes=_bytes(rows, n, dtype)))
    return out
