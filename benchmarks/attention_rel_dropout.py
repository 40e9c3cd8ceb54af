"""The issue-16 attention rows only (T5 relative bias fwd S2048 and fwd+bwd S1024, dropout 0.1
fwd+bwd S1024), as `python -m truthgpt_kernels bench --ops attention` would print them:
python benchmarks/attention_rel_dropout.py [--threads N] [--quick]"""
import argparse

import torch

from truthgpt_kernels.bench import attention as A
from truthgpt_kernels.bench.runner import format_table, run_case

p = argparse.ArgumentParser()
p.add_argument("--threads", type=int, default=None)
p.add_argument("--quick", action="store_true")
args = p.parse_args()
if args.threads:
    torch.set_num_threads(args.threads)
B, H, D = 1, 8, 64
S = 256 if args.quick else 2048


def dense_setup(S=S, dtype=torch.float32):
    q, k, v = A._qkv(B, H, H, S, S, D, dtype, "cpu")
    return {"q": q, "k": k, "v": v}


cases = A._rel_bias_cases(B, H, S, D, dense_setup) + [A._dropout_case(B, H, S // 2, D)]
results = [run_case(c, "cpu", min_time=1.0, max_reps=20) for c in cases]
print(format_table("attention", results, "cpu"))
