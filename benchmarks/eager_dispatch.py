"""Fixed per-step cost of our eager model: the small preset's training step (bf16 autocast,
fused AdamW) at d_model 64 and sequence 16, where the kernels take no time, with the eager fast
path of `backends.apply` on and off, alternating in one process (median / min ms):
python benchmarks/eager_dispatch.py [--steps 100]"""
import argparse
import statistics
import time

import torch

from truthgpt_kernels import backends
from truthgpt_kernels.bench import model as bm

p = argparse.ArgumentParser()
p.add_argument("--steps", type=int, default=100)
args = p.parse_args()

cfg, ours, _ = bm._models("small", "cpu", vocab_size=512, d_model=64, d_ff=192, n_heads=4, n_kv_heads=4)
g = torch.Generator().manual_seed(0)
x = {"tokens": torch.randint(0, cfg.vocab_size, (1, 16), generator=g),
     "targets": torch.randint(0, cfg.vocab_size, (1, 16), generator=g)}
step = bm._train_step(ours, bm._adamw(ours), torch.bfloat16)
plain_eager = backends._plain_eager
times = {"fast path": [], "custom ops": []}
for _ in range(3):
    step(x)
try:
    for _ in range(args.steps):
        for name in times:
            backends._plain_eager = plain_eager if name == "fast path" else (lambda a: False)
            t = time.perf_counter()
            step(x)
            times[name].append((time.perf_counter() - t) * 1e3)
finally:
    backends._plain_eager = plain_eager
for name, ts in times.items():
    print(f"{name:10s} median {statistics.median(ts):6.2f} ms  min {min(ts):6.2f} ms")
