"""GeGLU benchmark cases: forward + backward against the eager `F.gelu(g, approximate="tanh") * u`
with autograd, and the copy-bandwidth ceiling for the same bytes. The same cases serve CPU and
CUDA (ours: the "auto" backend for the device)."""
import torch
import torch.nn.functional as F

import truthgpt_kernels as tk
from truthgpt_kernels.ops import reference

from . import Case, copy_ceiling, fwd_bwd, in_float64


def _fwd_bwd(fn):
    return fwd_bwd(lambda x: fn(x["g"], x["u"]), ("g", "u"))


def cases(device, quick):
    rows, n = (256, 1376) if quick else (8192, 5504)
    out = []
    for dtype in (torch.float32, torch.bfloat16):
        def setup(dtype=dtype):
            g = torch.randn(rows, n, device=device, dtype=dtype, requires_grad=True)
            u = torch.randn(rows, n, device=device, dtype=dtype, requires_grad=True)
            return {"g": g, "u": u, "dy": torch.randn(rows, n, device=device, dtype=dtype)}
        elem = torch.tensor([], dtype=dtype).element_size()
        nbytes = rows * n * elem * (3 + 5)  # fwd: read g,u write out; bwd: read dy,g,u write dg,du
        out.append(Case(
            op="geglu", name=f"fwd+bwd {rows}x{n} {str(dtype)[6:]}",
            setup=copy_ceiling.with_copy(setup, nbytes, device, dtype),
            impls={"truthgpt": _fwd_bwd(tk.geglu),
                   copy_ceiling.NAME: copy_ceiling.copy,
                   "torch eager": _fwd_bwd(lambda g, u: F.gelu(g, approximate="tanh") * u)},
            bytes=nbytes,
            reference=in_float64(_fwd_bwd(reference.geglu)),
        ))
    return out
