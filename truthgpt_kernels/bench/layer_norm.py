"""LayerNorm benchmark cases: forward + backward (dx, dweight and dbias) against `F.layer_norm`
with autograd, and the copy-bandwidth ceiling for the same bytes. The same cases serve CPU and
CUDA (ours: the "auto" backend for the device)."""
import torch
import torch.nn.functional as F

import truthgpt_kernels as tk
from truthgpt_kernels.ops import reference

from . import Case, copy_ceiling, fwd_bwd, in_float64

EPS = 1e-5


def _fwd_bwd(fn):
    return fwd_bwd(lambda x: fn(x["x"], x["w"], x["b"]), ("x", "w", "b"))


def cases(device, quick):
    rows, n = (256, 4096) if quick else (8192, 4096)
    out = []
    for dtype in (torch.float32, torch.bfloat16):
        def setup(dtype=dtype):
            x = torch.randn(rows, n, device=device, dtype=dtype, requires_grad=True)
            w = (1 + 0.1 * torch.randn(n, device=device)).to(dtype).requires_grad_(True)
            b = (0.1 * torch.randn(n, device=device)).to(dtype).requires_grad_(True)
            return {"x": x, "w": w, "b": b, "dy": torch.randn(rows, n, device=device, dtype=dtype)}
        elem = torch.tensor([], dtype=dtype).element_size()
        nbytes = rows * n * elem * (2 + 3)  # fwd: read x write y; bwd: read dy,x write dx
        out.append(Case(
            op="layer_norm", name=f"fwd+bwd {rows}x{n} {str(dtype)[6:]}",
            setup=copy_ceiling.with_copy(setup, nbytes, device, dtype),
            impls={"truthgpt": _fwd_bwd(lambda x, w, b: tk.layer_norm(x, w, b, EPS)),
                   copy_ceiling.NAME: copy_ceiling.copy,
                   "torch F.layer_norm": _fwd_bwd(lambda x, w, b: F.layer_norm(x, (n,), w, b, EPS))},
            bytes=nbytes,
            reference=in_float64(_fwd_bwd(lambda x, w, b: reference.layer_norm(x, w, b, EPS))),
        ))
    return out
