"""Timing one call and printing the result: the leaf of the bench package (it imports no other
bench module), shared by runner.py (the job and its tables), report.py (saved runs) and
roofline.py (the machine's ceilings).

Time budget of `time_fn`: one warm-up call, then calls until `min_time` seconds have passed
and at least `MIN_REPS` calls were timed, but never more than `max_reps` calls.
`time_interleaved` gives several warmed-up impls that budget each, timing them round-robin (the
runner's CPU cases).
"""
import gc
import math
import statistics
import time
from typing import Any, Callable, Dict, Optional

import torch

MIN_TIME = 0.3      # seconds of timed calls per impl (--min-time)
MAX_REPS = 200      # cap on timed calls per impl (--max-reps)
MIN_REPS = 3        # timed calls per impl however slow it is
L2_FLUSH_BYTES = 256 * 2 ** 20  # CUDA: zeroed between timed calls so inputs are not served from L2


# ----------------------------------------------------------------------------- measuring
def sync(device: str):
    """Waits for the device's queued work (CUDA); nothing on the CPU."""
    if device == "cuda":
        torch.cuda.synchronize()


def time_fn(fn: Callable[[], Any], device: str, min_time: float = MIN_TIME,
            max_reps: int = MAX_REPS, min_reps: int = MIN_REPS, warmup: bool = True) -> Dict[str, float]:
    """Times fn after one warm-up call (which compiles and caches; warmup=False when the caller
    has just made that call). CPU: wall time of each call.
    CUDA: CUDA events around each call, with the L2 flushed between calls, synchronised once.
    Returns median, quartiles and min in ms, and the number of timed calls."""
    min_reps = max(1, min(min_reps, max_reps))
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        if warmup:
            fn()
        sync(device)
        if device == "cuda":
            t0 = time.perf_counter()
            fn()
            torch.cuda.synchronize()
            estimate = max(time.perf_counter() - t0, 1e-6)
            reps = int(min(max_reps, max(min_reps, math.ceil(min_time / estimate))))
            flush = torch.empty(L2_FLUSH_BYTES, dtype=torch.int8, device="cuda")
            events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                      for _ in range(reps)]
            for start, end in events:
                flush.zero_()
                start.record()
                fn()
                end.record()
            torch.cuda.synchronize()
            samples = [start.elapsed_time(end) for start, end in events]
            del flush
        else:
            samples = []
            begin = time.perf_counter()
            while len(samples) < min_reps or (
                    time.perf_counter() - begin < min_time and len(samples) < max_reps):
                t0 = time.perf_counter()
                fn()
                samples.append((time.perf_counter() - t0) * 1e3)
    finally:
        if gc_was_enabled:
            gc.enable()
    return summarize(samples)


def summarize(samples) -> Dict[str, float]:
    """Median, quartiles and min (ms) and the count of timed calls (samples in ms)."""
    if len(samples) > 1:
        q1, _, q3 = statistics.quantiles(samples, n=4, method="inclusive")
    else:
        q1 = q3 = samples[0]
    return {"median_ms": statistics.median(samples), "q1_ms": q1, "q3_ms": q3,
            "min_ms": min(samples), "n": len(samples)}


def time_interleaved(fns: Dict[str, Callable[[], Any]], min_time: float = MIN_TIME,
                     max_reps: int = MAX_REPS, min_reps: int = MIN_REPS) -> Dict[str, Any]:
    """CPU: times already warmed-up callables round-robin, one call of each in turn, so a
    change in the machine's state (another process, frequency, memory) during the run falls on
    every impl alike instead of on whichever was being timed. Each gets the budget of time_fn:
    calls until its timed calls add up to min_time and at least min_reps, at most max_reps.
    Returns {name: summarize(samples) + samples_ms (the calls in round order)}, or the
    exception a call raised (that impl stops). Round k holds the k-th call of every impl still
    running, so samples_ms[k] of two impls were timed next to each other (paired_ratios)."""
    min_reps = max(1, min(min_reps, max_reps))
    samples = {name: [] for name in fns}
    out: Dict[str, Any] = {}
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        while True:
            live = [n for n, fn in fns.items() if n not in out and (
                len(samples[n]) < min_reps or
                (sum(samples[n]) < 1e3 * min_time and len(samples[n]) < max_reps))]
            if not live:
                break
            for name in live:
                try:
                    t0 = time.perf_counter()
                    fns[name]()
                    samples[name].append((time.perf_counter() - t0) * 1e3)
                except Exception as e:  # noqa: BLE001 - reported per impl
                    out[name] = e
    finally:
        if gc_was_enabled:
            gc.enable()
    for name, got in samples.items():
        if name not in out:
            out[name] = dict(summarize(got), samples_ms=[round(t, 4) for t in got])
    return out


def paired_ratios(base_ms, ours_ms) -> Optional[Dict[str, float]]:
    """Speedup round by round: base_ms[k] / ours_ms[k] over the rounds both ran (lists from
    time_interleaved). A shared machine's speed drifts for seconds at a time, moving both calls
    of a round alike, so these ratios spread less than the two medians do. Returns their
    median, quartiles, min and max, or None under 3 rounds."""
    ratios = [b / o for b, o in zip(base_ms, ours_ms) if o > 0]
    if len(ratios) < 3:
        return None
    q1, median, q3 = statistics.quantiles(ratios, n=4, method="inclusive")
    return {"median": median, "q1": q1, "q3": q3, "min": min(ratios), "max": max(ratios), "n": len(ratios)}


# ----------------------------------------------------------------------------- printing
def fmt_ms(ms: Optional[float]) -> str:
    if ms is None:
        return ""
    for limit, digits in ((100, 0), (10, 1), (1, 2), (0.1, 3)):
        if ms >= limit:
            return f"{ms:.{digits}f}"
    return f"{ms:.4f}"


def fmt_err(e: Optional[float]) -> str:
    if e is None:
        return ""
    return "inf" if math.isinf(e) else f"{e:.1e}"


def fmt_mib(b: Optional[int]) -> str:
    return "?" if b is None else f"{b / 2 ** 20:.1f}"


def fmt_pct(frac: Optional[float]) -> str:
    if frac is None:
        return ""
    return "<1%" if frac < 0.01 else f"{100 * frac:.0f}%"
