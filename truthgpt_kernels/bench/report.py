"""Saving, plotting and comparing benchmark results.

JSON layout (`format` = "truthgpt_kernels.bench/1"):
    created      ISO 8601 time (UTC) of the run
    command      the command line that produced it
    settings     device, quick, min_time, max_reps, ops, dtypes, threads, load_average (1 min,
                 at the start) and busy_warning when other processes competed for the CPU
    machine      platform, CPU model and cores, torch threads, memory; GPU name, capability,
                 memory where device is cuda
    versions     python, torch (+ CUDA), triton, truthgpt_kernels, its extensions' build info,
                 the git commit when run from a checkout, and each backend's availability
    ceilings     measured GEMM GFLOP/s per dtype and copy GB/s (roofline.py)
    elapsed_s    seconds the whole run took
    cases        one dict per case: op, name, dtype, flops, bytes, extra, ours, baselines,
                 impls {name: median_ms, q1_ms, q3_ms, min_ms, n, spread_pct, max_err,
                 rel_err, peak_bytes, error}, speedup {baseline: x}, gflops / gbps,
                 roofline_ms, roofline_frac, bound, seconds, error
Non-finite floats are written as the strings "inf" / "nan" so the file is strict JSON.

Also `python -m truthgpt_kernels.bench.report summary FILE.json` prints a short table of a
saved run (benchmarks/gpu_check.sh ends with it), and `... compare OLD.json NEW.json` the
change between two runs.
"""
import datetime
import json
import math
import os
import platform
import re
import subprocess
import sys
from typing import Any, Dict, List, Optional

from . import canonical_dtype
from .timing import fmt_err, fmt_ms, fmt_pct

FORMAT = "truthgpt_kernels.bench/1"
RESULTS_DIR = "bench-results"


class ReportError(Exception):
    pass


# ----------------------------------------------------------------------------- metadata
def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _mem_total_gib() -> Optional[float]:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return round(int(line.split()[1]) / 2 ** 20, 1)
    except (OSError, ValueError):
        pass
    return None


def machine_info(device: str) -> Dict[str, Any]:
    import torch

    info = {"platform": platform.platform(), "arch": platform.machine(), "cpu": _cpu_model(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "memory_gib": _mem_total_gib()}

    if device == "cuda" and torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info["gpu"] = {"name": p.name, "capability": f"{p.major}.{p.minor}",
                       "memory_gib": round(p.total_memory / 2 ** 30, 1),
                       "multiprocessors": p.multi_processor_count,
                       "count": torch.cuda.device_count()}
    return info


def _git_commit() -> Optional[str]:
    """This checkout's commit; None for an installed copy (site-packages inside some other git
    repository would otherwise report that repository's commit)."""
    here = os.path.dirname(os.path.abspath(__file__))
    package = os.path.dirname(here)
    try:
        top = subprocess.run(["git", "rev-parse", "--show-toplevel"], cwd=here, capture_output=True,
                             text=True, timeout=5)
        if top.returncode != 0 or not os.path.isfile(os.path.join(top.stdout.strip(), "setup.py")) or \
                os.path.realpath(os.path.join(top.stdout.strip(), "truthgpt_kernels")) != os.path.realpath(package):
            return None
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True,
                             timeout=5)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def versions_info() -> Dict[str, Any]:
    import torch

    import truthgpt_kernels as tk
    from truthgpt_kernels import _ext

    v: Dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                         "torch_cuda": torch.version.cuda, "truthgpt_kernels": tk.__version__}
    try:
        import triton
        v["triton"] = triton.__version__
    except ImportError:
        v["triton"] = None
    for name in ("_C", "_cuda"):
        mod, info = _ext.load(name)
        v[f"extension {name}"] = f"built ({info})" if mod else info
    try:
        v["backends"] = {name: ("available" if e["available"] else f"unavailable: {e['reason']}")
                         for name, e in tk.available_backends().items()}
    except Exception as e:  # informational only
        v["backends"] = f"unknown ({type(e).__name__})"
    v["git_commit"] = _git_commit()
    return v


# ----------------------------------------------------------------------------- JSON
def _clean(value):
    """JSON-safe copy: non-finite floats as strings, unknown objects as their str()."""
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, (str, int, bool)) or value is None:
        return value
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return str(value)


def build(results: List[Dict], ceilings: Dict, settings: Dict, elapsed: float, command: str = "") -> Dict:
    return _clean({
        "format": FORMAT,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": command,
        "settings": settings,
        "machine": machine_info(settings.get("device", "cpu")),
        "versions": versions_info(),
        "ceilings": ceilings,
        "elapsed_s": elapsed,
        "cases": results,
    })


def default_path(device: str, quick: bool, ext: str) -> str:
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    return os.path.join(RESULTS_DIR, f"bench-{device}{'-quick' if quick else ''}-{stamp}{ext}")


def save_json(doc: Dict, path: str):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=1, allow_nan=False)
        f.write("\n")
    os.replace(tmp, path)


def load(path: str) -> Dict:
    """An earlier run's JSON; ReportError with a one-line reason if it cannot be used."""
    try:
        with open(path) as f:
            doc = json.load(f)
    except FileNotFoundError:
        raise ReportError(f"cannot read {path}: no such file")
    except IsADirectoryError:
        raise ReportError(f"cannot read {path}: it is a directory")
    except PermissionError:
        raise ReportError(f"cannot read {path}: permission denied")
    except OSError as e:
        raise ReportError(f"cannot read {path}: {e.strerror or e}")
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ReportError(f"cannot read {path}: not valid JSON ({e})")
    if not isinstance(doc, dict) or not isinstance(doc.get("cases"), list) \
            or not str(doc.get("format", "")).startswith("truthgpt_kernels.bench/"):
        raise ReportError(f"cannot read {path}: not a results file of `python -m truthgpt_kernels bench`")
    return doc


def _num(x) -> Optional[float]:
    if isinstance(x, (int, float)) and not isinstance(x, bool):
        return float(x)
    if isinstance(x, str):
        try:
            return float(x)
        except ValueError:
            return None
    return None


# ----------------------------------------------------------------------------- compare
def format_compare(old: Dict, new: Dict) -> str:
    """The change of each (case, impl) median between two runs, matched by op, case name and
    impl name; 'faster'/'slower' only when the change exceeds both runs' spreads and 5%."""
    from tabulate import tabulate

    def index(doc):
        out = {}
        for c in doc.get("cases", []):
            if not isinstance(c, dict):
                continue
            for impl, e in (c.get("impls") or {}).items():
                out[(c.get("op"), c.get("name"), impl)] = (c, e)
        return out

    before, after = index(old), index(new)
    lines = [f"\n## compared with {old.get('created', '?')} ({old.get('command', '?')})"]
    om, nm = old.get("machine", {}), new.get("machine", {})
    if (om.get("cpu"), (om.get("gpu") or {}).get("name")) != (nm.get("cpu"), (nm.get("gpu") or {}).get("name")):
        lines.append(f"note: different machines: before {om.get('cpu')} {(om.get('gpu') or {}).get('name', '')}".rstrip()
                     + f"; now {nm.get('cpu')} {(nm.get('gpu') or {}).get('name', '')}".rstrip())
    os_, ns_ = old.get("settings", {}), new.get("settings", {})
    for key in ("device", "quick"):
        if os_.get(key) != ns_.get(key):
            lines.append(f"note: {key} was {os_.get(key)}, now {ns_.get(key)}")
    rows = []
    for key in after:
        if key not in before:
            continue
        (oc, oe), (nc, ne) = before[key], after[key]
        o, n = _num(oe.get("median_ms")), _num(ne.get("median_ms"))
        if not o or not n:
            continue
        change = n / o - 1
        noise = max(0.05, (_num(oe.get("spread_pct")) or 0) / 100, (_num(ne.get("spread_pct")) or 0) / 100)
        verdict = "~" if abs(change) <= noise else ("faster" if change < 0 else "slower")
        sp = ""
        if key[2] == nc.get("ours"):
            ospd, nspd = oc.get("speedup") or {}, nc.get("speedup") or {}
            sp = "; ".join(f"{b}: {_num(ospd[b]):.2f}x -> {_num(nspd[b]):.2f}x"
                           for b in nspd if b in ospd and _num(ospd[b]) and _num(nspd[b]))
        rows.append({"op": key[0], "case": key[1], "impl": key[2], "before ms": fmt_ms(o),
                     "now ms": fmt_ms(n), "change": f"{100 * change:+.1f}%", "": verdict,
                     "speedup before -> now": sp})
    if rows:
        lines.append(tabulate(rows, headers="keys", tablefmt="github", disable_numparse=True))
    else:
        lines.append("no case of this run is in the earlier file (matched by op, case name and impl)")
    only_new = len({k[:2] for k in after} - {k[:2] for k in before})
    only_old = len({k[:2] for k in before} - {k[:2] for k in after})
    if only_new or only_old:
        lines.append(f"{only_new} case(s) only in this run, {only_old} only in the earlier one")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- summary
def format_summary(doc: Dict) -> str:
    """A short table of a saved run: one row per case, ours against its fastest baseline."""
    from tabulate import tabulate

    rows = []
    for c in doc.get("cases", []):
        impls = c.get("impls") or {}
        ours = impls.get(c.get("ours"), {})
        speedups = {b: _num(s) for b, s in (c.get("speedup") or {}).items() if _num(s)}
        best = min(speedups, key=speedups.get) if speedups else None  # the fastest baseline
        rows.append({
            "op": c.get("op"), "case": c.get("name"),
            "ours ms": c.get("error") or ours.get("error") or fmt_ms(_num(ours.get("median_ms"))),
            "fastest baseline": best or "", "base ms": fmt_ms(_num(impls.get(best, {}).get("median_ms"))) if best else "",
            "speedup": f"{speedups[best]:.2f}x" if best else "",
            "% roof": fmt_pct(_num(c.get("roofline_frac"))),
            "err ours": fmt_err(_num(ours.get("max_err"))),
        })
    m = doc.get("machine", {})
    where = (m.get("gpu") or {}).get("name") or m.get("cpu", "?")
    head = f"{len(rows)} case(s) on {where}, {doc.get('created', '?')}, {doc.get('elapsed_s', 0):.0f} s"
    return head + "\n" + tabulate(rows, headers="keys", tablefmt="github", disable_numparse=True)


# ----------------------------------------------------------------------------- plot
def have_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
        return True
    except ImportError:
        return False


def _series(case: Dict) -> str:
    """Which line-plot panel a seq_len case belongs to: extra['series'] if set, else its name
    with the sequence length blanked: in a token like S1024 / seq=1024 / L1024 if there is one,
    else in the first token holding that number (dtype words such as bfloat16 excepted)."""
    extra = case.get("extra") or {}
    if extra.get("series"):
        return f"{case.get('op')}: {extra['series']}"
    seq = _num(extra.get("seq_len"))
    number = str(int(seq)) if seq is not None and seq == int(seq) else str(extra.get("seq_len"))
    pattern = rf"(?<!\d){re.escape(number)}(?!\d)"
    tokens = str(case.get("name")).split(" ")
    holding = [i for i, t in enumerate(tokens) if re.search(pattern, t) and not canonical_dtype(t)]
    named = [i for i in holding if re.fullmatch(
        rf"(?i)(s|sq|sk|seq|seqlen|seq_len|len|l|n|t|ctx)[=:]?{re.escape(number)}", tokens[i])]
    pick = (named or holding or [None])[0]
    if pick is not None:
        tokens[pick] = re.sub(pattern, "*", tokens[pick], count=1)
    return f"{case.get('op')}: " + " ".join(tokens)


MAX_SERIES = 6


def plot(doc: Dict, path: str):
    """PNG: speedup of ours over each baseline per case (log scale, 1x marked), and for cases
    that set extra['seq_len'], time against sequence length, one panel per series and one line
    per impl (as Triton's perf_report draws them)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    bars = []  # (label, speedup)
    series: Dict[str, Dict[str, List]] = {}
    for c in doc.get("cases", []):
        for base, sp in (c.get("speedup") or {}).items():
            if _num(sp):
                bars.append((f"{c['op']}: {c['name']} vs {base}", _num(sp)))
        seq = _num((c.get("extra") or {}).get("seq_len"))
        if seq:
            lines = series.setdefault(_series(c), {})
            for impl, e in (c.get("impls") or {}).items():
                if _num(e.get("median_ms")):
                    lines.setdefault(impl, []).append((seq, _num(e["median_ms"])))
    names = list(series)[:MAX_SERIES]
    ncols = 2 if len(names) > 1 else 1
    nrows_series = math.ceil(len(names) / ncols)
    bar_height = max(2.5, 0.45 * len(bars) + 1.0)
    fig = plt.figure(figsize=(12, bar_height + 4.0 * nrows_series))
    grid = fig.add_gridspec(1 + nrows_series, ncols, height_ratios=[bar_height] + [4.0] * nrows_series)
    ax = fig.add_subplot(grid[0, :])
    if bars:
        labels = [b[0] for b in bars]
        values = [b[1] for b in bars]
        colors = ["tab:green" if v >= 1 else "tab:red" for v in values]
        ypos = list(range(len(bars)))[::-1]
        ax.barh(ypos, values, color=colors)
        ax.set_yticks(ypos)
        ax.set_yticklabels(labels, fontsize=8)
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(matplotlib.ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda x, _: f"{x:g}x"))
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.axvline(1.0, color="black", linewidth=1)
        for y, v in zip(ypos, values):
            ax.text(v, y, f" {v:.2f}x", va="center", fontsize=8)
        lo, hi = min(values + [1.0]), max(values + [1.0])
        ax.set_xlim(lo / 1.5, hi * 2.0)
    else:
        ax.text(0.5, 0.5, "no speedups measured", ha="center", va="center", transform=ax.transAxes)
    m = doc.get("machine", {})
    where = (m.get("gpu") or {}).get("name") or m.get("cpu", "")
    ax.set_title(f"speedup of ours over each baseline (>1: ours faster) - {where}, {doc.get('created', '')}",
                 fontsize=10)
    for i, name in enumerate(names):
        sax = fig.add_subplot(grid[1 + i // ncols, i % ncols])
        for impl, pts in series[name].items():
            pts = sorted(pts)
            sax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=impl)
        sax.set_xscale("log", base=2)
        sax.set_yscale("log")
        sax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda x, _: f"{x:g}"))
        sax.yaxis.set_major_locator(matplotlib.ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        sax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda y, _: f"{y:g}"))
        sax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        sax.set_xlabel("sequence length")
        sax.set_ylabel("median ms")
        sax.set_title(name, fontsize=9)
        sax.grid(True, which="both", alpha=0.3)
        sax.legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    usage = "usage: python -m truthgpt_kernels.bench.report summary FILE.json | compare OLD.json NEW.json"
    try:
        if len(argv) == 2 and argv[0] == "summary":
            print(format_summary(load(argv[1])))
            return 0
        if len(argv) == 3 and argv[0] == "compare":
            print(format_compare(load(argv[1]), load(argv[2])))
            return 0
    except ReportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(usage, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
