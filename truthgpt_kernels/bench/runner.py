"""Runs benchmark cases and prints a table (the main job, `python -m truthgpt_kernels bench`)."""
import statistics
import time
from typing import Callable, List

import torch
from tabulate import tabulate

from . import Case, load_cases


def time_fn(fn: Callable[[], object], device: str, min_time: float = 0.5, warmup: int = 2):
    """Median and interquartile spread of fn's wall time, in ms."""
    for _ in range(warmup):
        fn()
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    samples = []
    start = time.perf_counter()
    while len(samples) < 5 or (time.perf_counter() - start < min_time and len(samples) < 200):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        samples.append((time.perf_counter() - t0) * 1e3)
    q = statistics.quantiles(samples, n=4) if len(samples) > 1 else [samples[0]] * 3
    return statistics.median(samples), q[2] - q[0]


def run_cases(cases: List[Case], device: str, min_time: float = 0.5):
    rows = []
    for case in cases:
        inputs = case.setup()
        times = {}
        for name, impl in case.impls.items():
            times[name] = time_fn(lambda: impl(inputs), device, min_time)
        ours_name = next(iter(case.impls))
        ours = times[ours_name][0]
        for name, (med, spread) in times.items():
            rate = ""
            if case.flops:
                rate = f"{case.flops / med / 1e6:.1f} GFLOP/s"
            elif case.bytes:
                rate = f"{case.bytes / med / 1e6:.1f} GB/s"
            rows.append({"op": case.op, "case": case.name, "impl": name, "median ms": round(med, 3),
                         "spread ms": round(spread, 3), "ours speedup": round(med / ours, 2),
                         "rate": rate})
        del inputs
    return rows


def main(device: str = "cpu", quick: bool = False, ops=None, min_time: float = 0.5):
    cases = load_cases(device, quick, ops)
    rows = run_cases(cases, device, min_time)
    print(tabulate(rows, headers="keys", tablefmt="github"))
    return rows
