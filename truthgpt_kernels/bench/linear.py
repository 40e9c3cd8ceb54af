"""tk.linear benchmark cases: the projections of one decoding step of the small preset (6
layers of qkv / out / gate_up / down, then the 32000 x 512 lm_head: 143 MB of float32 weights,
more than the caches hold, so each call streams them from memory as decoding does) for 1 and 8
rows (batch 1 and 8, one token each), against eager F.linear and torch.compile of the same
loop, with the copy ceiling for the same bytes. And the training shape: forward + backward of
the small preset's gate_up projection for a B2 S1024 step (2048 rows), float32 and bfloat16, where
tk.linear's own backward runs float32 GEMMs on CPUs whose bf16 GEMM is slow."""
import torch
import torch.nn.functional as F

import truthgpt_kernels as tk
from truthgpt_kernels.ops import reference

from . import Case, copy_ceiling, fwd_bwd, in_float64

# (N, K) of the small preset's projections: qkv, out, gate_up, down per layer, then lm_head
LAYER = [(1536, 512), (512, 512), (2816, 512), (512, 1408)]


def _step(linear):  # linear(x, weight, bias)
    def run(x):
        with torch.no_grad():
            return [linear(x["x"][w.shape[1]], w, None) for w in x["weights"]]
    return run


def cases(device, quick):
    shapes = LAYER * (1 if quick else 6) + [(1000 if quick else 32000, 512)]
    out = []
    for dtype, rows in ((torch.float32, 1), (torch.float32, 8), (torch.bfloat16, 1)):
        def setup(dtype=dtype, rows=rows):
            g = torch.Generator().manual_seed(0)
            weights = [(torch.randn(s, generator=g) * 0.02).to(device, dtype) for s in shapes]
            xs = {k: torch.randn(rows, k, generator=g).to(device, dtype) for k in {k for _, k in shapes}}
            return {"weights": weights, "x": xs}
        elem = torch.tensor([], dtype=dtype).element_size()
        nbytes = sum(n * k for n, k in shapes) * elem
        compiled = torch.compile(_step(F.linear))
        out.append(Case(
            op="linear", name=f"decode step projections {rows} row{'s' if rows > 1 else ''} "
                             f"{nbytes / 1e6:.0f} MB {str(dtype)[6:]}",
            setup=copy_ceiling.with_copy(setup, nbytes, device, dtype),
            impls={"truthgpt": _step(tk.linear), copy_ceiling.NAME: copy_ceiling.copy,
                   "torch eager": _step(F.linear), "torch compiled": compiled},
            bytes=nbytes, flops=2.0 * rows * sum(n * k for n, k in shapes),
            reference=in_float64(_step(reference.linear_fwd)),
            extra={"dtype": str(dtype)[6:], "rows": rows},
        ))
    out += _train_cases(device, quick)
    return out


def _train_cases(device, quick):
    M, N, K = (64, 96, 64) if quick else (2048, 2816, 512)
    out = []
    for dtype in (torch.float32, torch.bfloat16):
        def setup(dtype=dtype):
            g = torch.Generator().manual_seed(0)
            make = lambda *s: torch.randn(*s, generator=g).to(device, dtype).requires_grad_()  # noqa: E731
            return {"x": make(M, K), "w": make(N, K), "dy": torch.randn(M, N, generator=g).to(device, dtype)}

        def impl(linear):
            return fwd_bwd(lambda x: linear(x["x"], x["w"]), ("x", "w"))
        out.append(Case(
            op="linear", name=f"fwd+bwd {M}x{K} @ {K}x{N} {str(dtype)[6:]}", setup=setup,
            impls={"truthgpt": impl(tk.linear), "torch eager": impl(F.linear),
                   "torch compiled": impl(torch.compile(F.linear))},
            flops=3 * 2.0 * M * N * K,
            reference=in_float64(impl(lambda x, w: reference.linear_fwd(x, w, None))),
            extra={"dtype": str(dtype)[6:], "rows": M},
        ))
    return out
