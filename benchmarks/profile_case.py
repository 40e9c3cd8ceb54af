"""Where a bench case's time goes: each impl of one case of `truthgpt_kernels/bench/<op>.py`
(ours and its baselines) timed in turn in one process (median of --rounds, after warm-up),
then one call of each under torch.profiler, self CPU time, top --rows ops:
python benchmarks/profile_case.py --op dropin --case "HF mixtral fwd+bwd" [--rounds 5] [--rows 12]"""
import argparse
import statistics
import time

import torch
from torch.profiler import ProfilerActivity, profile

from truthgpt_kernels.bench import load_family

p = argparse.ArgumentParser()
p.add_argument("--op", required=True, help="bench family, e.g. dropin, model, grouped_linear")
p.add_argument("--case", required=True, help="text the case's name contains (the first match)")
p.add_argument("--rounds", type=int, default=5)
p.add_argument("--rows", type=int, default=12)
p.add_argument("--threads", type=int, default=None)
args = p.parse_args()
if args.threads:
    torch.set_num_threads(args.threads)

case = next((c for c in load_family(args.op, "cpu", quick=False) if args.case in c.name), None)
if case is None:
    raise SystemExit(f"no {args.op} case's name contains {args.case!r}")
inputs = case.setup()
for impl in case.impls.values():  # warm-up (and compilation, for compiled impls)
    impl(inputs)
    impl(inputs)
times = {name: [] for name in case.impls}
for _ in range(args.rounds):
    for name, impl in case.impls.items():
        t = time.perf_counter()
        impl(inputs)
        times[name].append(time.perf_counter() - t)
ours = statistics.median(times[case.ours])
print(case.name)
for name, ts in times.items():
    med = statistics.median(ts)
    print(f"  {name}: {med * 1e3:.0f} ms" + ("" if name == case.ours else f" ({med / ours:.2f}x ours)"))
for name, impl in case.impls.items():
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        impl(inputs)
    print(f"\n{name}")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows, max_name_column_width=55))
