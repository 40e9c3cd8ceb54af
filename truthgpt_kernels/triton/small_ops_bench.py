"""GPU benchmark cases of rotary, SwiGLU and RMSNorm (issue 6): our CUDA C++ and Triton kernels
against the eager PyTorch formulas, in float32 and bfloat16, with Case.bytes counting the bytes
read plus written (so the runner prints GB/s to compare with the device's copy bandwidth).

`gpu_cases()` returns truthgpt_kernels.bench.Case objects for device "cuda"; the first impl of
each case is ours (the CUDA C++ backend when it is available, else Triton), the last the PyTorch
baseline. Not wired into bench/<op>.py here (that is the CPU cases' file); the lead does that.
"""
from typing import List

import torch
import torch.nn.functional as F

import truthgpt_kernels as tk
from truthgpt_kernels import backends
from truthgpt_kernels.bench import Case, fwd_bwd

DTYPES = (torch.float32, torch.bfloat16)


def _ours(family: str, device: str = "cuda") -> List[str]:
    """Our backends that can run `family` on `device` here (cuda first)."""
    names = []
    for b in ("cuda", "triton"):
        if not backends.unavailable_reason(b) and backends.implements(family, b):
            names.append(b)
    return names


def _esize(dtype) -> int:
    return torch.tensor([], dtype=dtype).element_size()


def _dt(dtype) -> str:
    return str(dtype).replace("torch.", "")


# ----------------------------------------------------------------------------- rotary
def _rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rotary_cases(device="cuda", quick=False) -> List[Case]:
    B, H, S, D = (1, 4, 128, 128) if quick else (4, 32, 1024, 128)
    out = []
    for dtype in DTYPES:
        def setup(dtype=dtype):
            q = torch.randn(B, H, S, D, device=device, dtype=dtype)
            k = torch.randn(B, H, S, D, device=device, dtype=dtype)
            cos, sin = tk.rotary_cos_sin(S, D, device=device)
            # Hugging Face's layout: full-width (S, D) tables in the activations' dtype
            cos_full = torch.cat((cos, cos), -1).to(dtype)[None, None]
            sin_full = torch.cat((sin, sin), -1).to(dtype)[None, None]
            return {"q": q, "k": k, "cos": cos, "sin": sin, "cos_full": cos_full, "sin_full": sin_full}

        impls = {}
        for b in _ours("rotary", device):
            impls[f"truthgpt {b}"] = (lambda x, b=b: tk.apply_rotary_qk(x["q"], x["k"], x["cos"], x["sin"],
                                                                      backend=b))
        impls["torch eager (HF formula)"] = lambda x: (
            x["q"] * x["cos_full"] + _rotate_half(x["q"]) * x["sin_full"],
            x["k"] * x["cos_full"] + _rotate_half(x["k"]) * x["sin_full"])
        out.append(Case(op="rotary", name=f"q+k B{B} H{H} S{S} D{D} {_dt(dtype)}", setup=setup,
                        impls=impls, bytes=4 * B * H * S * D * _esize(dtype)))  # read q, k; write q, k
    return out


# ----------------------------------------------------------------------------- swiglu
def swiglu_cases(device="cuda", quick=False) -> List[Case]:
    rows, n = (256, 1376) if quick else (8192, 5504)
    out = []
    for dtype in DTYPES:
        def setup(dtype=dtype):
            g = torch.randn(rows, n, device=device, dtype=dtype, requires_grad=True)
            u = torch.randn(rows, n, device=device, dtype=dtype, requires_grad=True)
            return {"g": g, "u": u, "dy": torch.randn(rows, n, device=device, dtype=dtype)}

        impls = {}
        for b in _ours("swiglu", device):
            impls[f"truthgpt {b}"] = fwd_bwd(lambda x, b=b: tk.swiglu(x["g"], x["u"], backend=b), ("g", "u"))
        impls["torch eager"] = fwd_bwd(lambda x: F.silu(x["g"]) * x["u"], ("g", "u"))
        out.append(Case(op="swiglu", name=f"fwd+bwd {rows}x{n} {_dt(dtype)}", setup=setup, impls=impls,
                        # fwd: read g, u, write out; bwd: read dy, g, u, write dg, du
                        bytes=rows * n * _esize(dtype) * (3 + 5)))
    return out


# ----------------------------------------------------------------------------- rms_norm
def rms_norm_cases(device="cuda", quick=False) -> List[Case]:
    rows, n = (256, 1024) if quick else (8192, 4096)
    eps = 1e-6
    out = []
    for dtype in DTYPES:
        def setup(dtype=dtype):
            x = torch.randn(rows, n, device=device, dtype=dtype, requires_grad=True)
            w = torch.randn(n, device=device, dtype=dtype, requires_grad=True)
            return {"x": x, "w": w, "dy": torch.randn(rows, n, device=device, dtype=dtype)}

        impls = {}
        for b in _ours("rms_norm", device):
            impls[f"truthgpt {b}"] = fwd_bwd(lambda x, b=b: tk.rms_norm(x["x"], x["w"], eps, backend=b),
                                              ("x", "w"))
        impls["torch eager"] = fwd_bwd(lambda x: F.rms_norm(x["x"], (n,), x["w"], eps), ("x", "w"))
        out.append(Case(op="rms_norm", name=f"fwd+bwd {rows}x{n} {_dt(dtype)}", setup=setup, impls=impls,
                        # fwd: read x, write y; bwd: read dy, x, write dx (weight, rstd: negligible)
                        bytes=rows * n * _esize(dtype) * (2 + 3)))
    return out


def gpu_cases(quick: bool = False) -> List[Case]:
    """Every GPU case of issue 6, for device "cuda"."""
    return rotary_cases("cuda", quick) + swiglu_cases("cuda", quick) + rms_norm_cases("cuda", quick)
