"""Peak memory (and time) of one fwd+bwd of the bf16 fused linear cross-entropy, ours or
torch's F.linear + F.cross_entropy: python benchmarks/lce_peak.py ours|torch N d V
(BENCHMARKS.md, linear_cross_entropy)."""
import sys, time, torch, torch.nn.functional as F
import truthgpt_kernels as tk
from truthgpt_kernels.bench.runner import call_with_peak
torch.set_num_threads(2)
which, N, d, V = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
g = torch.Generator().manual_seed(0)
x = (torch.randn(N, d, generator=g) * 0.5).bfloat16().requires_grad_(True)
w = (torch.randn(V, d, generator=g) * 0.02).bfloat16().requires_grad_(True)
t = torch.randint(0, V, (N,), generator=g)
def ours():
    return torch.autograd.grad(tk.linear_cross_entropy(x, w, t), [x, w])
def torch_ref():
    return torch.autograd.grad(F.cross_entropy(F.linear(x, w), t), [x, w])
fn = ours if which == "ours" else torch_ref
t0 = time.time()
_, peak = call_with_peak(fn, "cpu")
print(which, N, d, V, f"peak {peak / 2**20:.0f} MiB", f"{time.time() - t0:.1f} s", flush=True)
