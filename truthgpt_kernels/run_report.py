"""`python -m truthgpt_kernels report RUN`: the loss and throughput curves of a training run
(RUN/metrics.jsonl, written by train) as a PNG, and a short text summary. (Benchmark reports
are truthgpt_kernels/bench/report.py.)"""
import json
import math
import os
from typing import List, Optional, Tuple

from .train import METRICS_FILE


def read_metrics(run: str) -> List[dict]:
    """The records of RUN/metrics.jsonl (or of that file given directly)."""
    path = run if os.path.isfile(run) else os.path.join(run, METRICS_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} does not exist: not a training run directory (train --out writes it)")
    records = []
    with open(path) as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not a JSON record ({e})") from None
    if not records:
        raise ValueError(f"{path} holds no records")
    return records


def _mean(xs: List[float]) -> float:
    xs = [x for x in xs if x is not None and not (isinstance(x, float) and math.isnan(x))]
    return sum(xs) / len(xs) if xs else float("nan")


def summary(records: List[dict]) -> str:
    """A few lines: steps, loss first/last tenth and best, throughput, MFU, memory, evaluation."""
    k = max(1, len(records) // 10)
    losses = [r["loss"] for r in records]
    steady = records[1:] or records  # the first step pays for warm-up
    lines = [f"steps {records[0]['step']}..{records[-1]['step']} ({len(records)} records)",
             f"loss {_mean(losses[:k]):.4f} (first tenth) -> {_mean(losses[-k:]):.4f} (last tenth), "
             f"best {min(losses):.4f} at step {records[losses.index(min(losses))]['step']}",
             f"throughput {_mean([r.get('tokens_per_s') for r in steady]):,.0f} tokens/s, "
             f"step {1e3 * _mean([r.get('step_time_s') for r in steady]):.1f} ms (mean after the first step)"]
    mfu = _mean([r.get("mfu") for r in steady])
    if not math.isnan(mfu):
        lines.append(f"model FLOP utilisation {100 * mfu:.1f}% of the measured GEMM rate")
    mem = [r.get("peak_mem_mb") for r in records if r.get("peak_mem_mb") is not None]
    if mem:
        lines.append(f"peak memory {max(mem):,.0f} MiB")
    evals = [r for r in records if r.get("eval")]
    if evals:
        last = evals[-1]
        lines.append(f"eval at step {last['step']}: " + ", ".join(f"{k} {v:.3f}" for k, v in last["eval"].items()))
    return "\n".join(lines)


def plot(records: List[dict], path: str) -> Optional[str]:
    """Loss (with lr) and tokens/s against the step, saved to `path`; None without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    steps = [r["step"] for r in records]
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    ax1.plot(steps, [r["loss"] for r in records], label="train loss")
    for key in sorted({k for r in records for k in (r.get("eval") or {}) if "loss" in k}):
        pts = [(r["step"], r["eval"][key]) for r in records if key in (r.get("eval") or {})]
        ax1.plot(*zip(*pts), "o-", label=key)
    ax1.set_ylabel("loss")
    ax1.legend(loc="upper right")
    ax1.grid(alpha=0.3)
    if all("lr" in r for r in records):
        lr_ax = ax1.twinx()
        lr_ax.plot(steps, [r["lr"] for r in records], color="gray", alpha=0.4, linewidth=1)
        lr_ax.set_ylabel("lr", color="gray")
    ax2.plot(steps, [r.get("tokens_per_s") or float("nan") for r in records])
    ax2.set_ylabel("tokens/s")
    ax2.set_xlabel("step")
    ax2.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def report(run: str, png: Optional[str] = None) -> Tuple[str, Optional[str]]:
    """(summary text, PNG path or None) for the training run in directory `run`."""
    records = read_metrics(run)
    out = png or os.path.join(run if os.path.isdir(run) else os.path.dirname(run) or ".", "report.png")
    return summary(records), plot(records, out)
