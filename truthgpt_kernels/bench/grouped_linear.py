"""tk.grouped_linear benchmark cases: the routed experts' GEMMs of one Mixtral-like MoE layer
(8 experts, top-2 of 1024 tokens: 2048 routed rows sorted by expert, hidden 512, expert
intermediate 1376), forward + backward of the gate_up (E, 2752, 512) and down (E, 512, 1376)
products, float32 and bfloat16, against torch's grouped_mm (what transformers 5 runs for
these experts) and a loop of F.linear over the experts (split, then cat; the weights unbound)."""
import torch
import torch.nn.functional as F

import truthgpt_kernels as tk
from truthgpt_kernels.ops import reference

from . import Case, fwd_bwd, in_float64

_GROUPED_MM = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


def _loop(x, w, offsets):
    counts = torch.diff(offsets, prepend=offsets.new_zeros(1)).tolist()
    ws = w.unbind(0)
    return torch.cat([F.linear(xe, ws[e]) for e, xe in enumerate(x.split(counts))])


def cases(device, quick):
    E, T, H, inter = (4, 64, 32, 48) if quick else (8, 1024, 512, 1376)
    N = 2 * T  # top-2 routed rows
    out = []
    for M, K, what in ((2 * inter, H, "gate_up"), (H, inter, "down")):
        for dtype in (torch.float32, torch.bfloat16):
            def setup(M=M, K=K, dtype=dtype):
                g = torch.Generator().manual_seed(0)
                counts = torch.multinomial(torch.ones(E), N, replacement=True, generator=g).bincount(minlength=E)
                return {"x": torch.randn(N, K, generator=g).to(device, dtype).requires_grad_(),
                        "w": (torch.randn(E, M, K, generator=g) * 0.02).to(device, dtype).requires_grad_(),
                        "offsets": torch.cumsum(counts, 0, dtype=torch.int32).to(device),
                        "dy": torch.randn(N, M, generator=g).to(device, dtype)}

            def impl(fn):
                return fwd_bwd(lambda x: fn(x["x"], x["w"], x["offsets"]), ("x", "w"))
            impls = {"truthgpt": impl(tk.grouped_linear)}
            if _GROUPED_MM is not None:
                impls["torch grouped_mm"] = impl(lambda x, w, o: _GROUPED_MM(x, w.transpose(-2, -1), offs=o))
            impls["torch F.linear per expert"] = impl(_loop)
            out.append(Case(
                op="grouped_linear", name=f"{what} fwd+bwd {E} experts {N}x{K} @ {K}x{M} {str(dtype)[6:]}",
                setup=setup, impls=impls, flops=3 * 2.0 * N * M * K,
                reference=in_float64(impl(reference.grouped_linear_fwd)),
                extra={"dtype": str(dtype)[6:], "rows": N}))
    return out
