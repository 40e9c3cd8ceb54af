"""The main benchmark job, `python -m truthgpt_kernels bench`: measures the machine's ceilings
(roofline.py), runs every case's impls (ours first, then the PyTorch baselines) on the same inputs, checks
each output against the float64 reference, and prints one table per op family; report.py
saves the JSON and the plot and compares with an earlier run.

Time budget: each impl gets one warm-up call, then is called until `min_time` seconds have
passed and at least `MIN_REPS` calls were timed, but never more than `max_reps` calls. The
warm-up call also yields the output for the error column and the peak memory. On the CPU the
timed calls of a case's impls are interleaved (one call of each in turn, after every warm-up),
so a slow moment of the machine falls on ours and the baselines alike. So an impl costs
about max(min_time, MIN_REPS x its time) plus one call, and each case its setup and, once,
the float64 reference; each case's seconds are in the JSON and each op's total under its
table. The whole run prints how long it took; `make bench` uses the defaults (MIN_TIME,
MAX_REPS, MIN_REPS in timing.py, which also holds the timer and the number formats).
"""
import argparse
import contextlib
import importlib.util
import math
import os
import re
import sys
import tempfile
import time
from typing import Any, Callable, Dict, List, Optional

import torch

from . import FAMILIES, Case, canonical_dtype, dtype_hint, load_family, report, roofline
from .timing import (MAX_REPS, MIN_TIME, fmt_err, fmt_mib, fmt_ms, fmt_pct, paired_ratios, sync,
                     time_fn, time_interleaved)

# kineto's banners, and c10's note that a tensor allocated before the profiler started was
# freed inside it (the previous step's gradients)
_KINETO_LOG = re.compile(r"^[A-Z]+:\d{4}-\d\d-\d\d [\d:]+ \d+:\d+ \S+\.cpp:\d+\]"
                         r"|^\[W\d{4} [\d:.]+ CPUAllocator\.cpp:\d+\] Memory block of unknown size")


@contextlib.contextmanager
def _without_profiler_banners():
    """The profiler's C++ side logs banners to fd 2 (kineto's USDT/STAGE lines); catch fd 2 in a
    temporary file during one call and pass on every other line (the impl's own warnings)."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):
        yield
        return
    with tempfile.TemporaryFile(mode="w+b") as capture:
        os.dup2(capture.fileno(), 2)
        try:
            yield
        finally:
            try:
                sys.stderr.flush()
            except ValueError:
                pass
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            kept = [line for line in capture.read().decode(errors="replace").splitlines(True)
                    if not _KINETO_LOG.match(line)]
            if kept:
                sys.stderr.write("".join(kept))


def call_with_peak(fn: Callable[[], Any], device: str):
    """(fn's output, bytes allocated at the peak of the call above what was allocated before it,
    outputs included). CUDA: the caching allocator's statistics. CPU: the allocation events of
    the PyTorch profiler (None where they cannot be read). Exceptions of fn propagate."""
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        out = fn()
        torch.cuda.synchronize()
        return out, int(torch.cuda.max_memory_allocated() - before)
    try:  # the autograd profiler: torch.profiler.profile would import torch._inductor (seconds)
        os.environ.setdefault("KINETO_LOG_LEVEL", "5")
        prof = torch.autograd.profiler.profile(use_cpu=True, profile_memory=True)
    except Exception:
        return fn(), None
    with _without_profiler_banners():
        try:
            prof.__enter__()
        except Exception:  # e.g. another profiler is active
            prof = None
        if prof is None:
            out = fn()
        else:
            try:
                out = fn()
            finally:
                prof.__exit__(None, None, None)
    if prof is None:
        return out, None
    try:
        events = prof.kineto_results.events()  # not a documented API: guarded
        allocs = sorted(((e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]"),
                        key=lambda x: x[0])
    except Exception:
        return out, None
    current = peak = 0
    for _, nbytes in allocs:
        current += nbytes
        peak = max(peak, current)
    return out, int(peak)


def peak_memory(fn: Callable[[], Any], device: str) -> Optional[int]:
    """Peak bytes of one call of fn (see call_with_peak)."""
    return call_with_peak(fn, device)[1]


def flatten(value) -> List[torch.Tensor]:
    """The tensors of an impl's output, in a fixed order (tensor, tuple/list, dict)."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        return [t for k in sorted(value, key=str) for t in flatten(value[k])]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in flatten(v)]
    return []


_CHUNK = 1 << 22  # elements per step of compare_outputs: small temporaries, no huge allocations


def compare_outputs(out, ref) -> Dict[str, Any]:
    """Max absolute error and normwise relative error ||out - ref|| / ||ref|| over all output
    tensors, in float64 on the reference's device; inf when a value is non-finite where the
    reference is finite (or the other way round)."""
    outs, refs = flatten(out), flatten(ref)
    if len(outs) != len(refs) or not refs:
        return {"max_err": None, "rel_err": None,
                "note": f"output has {len(outs)} tensors, reference {len(refs)}"}
    max_err, diff_sq, ref_sq = 0.0, 0.0, 0.0
    for o, r in zip(outs, refs):
        if o.shape != r.shape:
            return {"max_err": None, "rel_err": None,
                    "note": f"shape {tuple(o.shape)} != reference {tuple(r.shape)}"}
        r = r.detach().reshape(-1)
        o = o.detach().reshape(-1)
        for start in range(0, r.numel(), _CHUNK):
            rc = r[start:start + _CHUNK].to(torch.float64)
            oc = o[start:start + _CHUNK].to(rc.device, torch.float64)
            d = oc - rc
            m = torch.linalg.vector_norm(d, float("inf")).item()
            if not math.isfinite(m):  # a non-finite value on either side: compare where finite
                r_finite = torch.isfinite(rc)
                nf = ~r_finite
                if not torch.equal(torch.isfinite(oc), r_finite) or not torch.equal(
                        torch.nan_to_num(oc[nf]), torch.nan_to_num(rc[nf])):  # inf != -inf
                    return {"max_err": math.inf, "rel_err": math.inf, "note": "non-finite values differ"}
                d, rc = d[r_finite], rc[r_finite]
                m = torch.linalg.vector_norm(d, float("inf")).item() if d.numel() else 0.0
            max_err = max(max_err, m)
            diff_sq += torch.linalg.vector_norm(d).item() ** 2
            ref_sq += torch.linalg.vector_norm(rc).item() ** 2
    rel = math.sqrt(diff_sq / ref_sq) if ref_sq > 0 else (0.0 if diff_sq == 0 else math.inf)
    return {"max_err": max_err, "rel_err": rel}


def _infer_dtype(inputs) -> Optional[str]:
    for t in flatten(inputs if isinstance(inputs, (dict, list, tuple)) else [inputs]):
        if t.is_floating_point():
            return str(t.dtype).replace("torch.", "")
    return None


def _short_error(e: BaseException) -> str:
    msg = str(e).strip().splitlines()
    return f"{type(e).__name__}: {msg[0] if msg else ''}"[:300]


# ----------------------------------------------------------------------------- running
def run_case(case: Case, device: str, ceilings: Optional[Dict] = None, *, min_time: float = MIN_TIME,
             max_reps: int = MAX_REPS, dtypes=None, progress=None) -> Optional[Dict[str, Any]]:
    """Runs one case; returns its result dict (see report.py for the JSON layout), or None when
    --dtype filters it out."""
    started = time.perf_counter()
    result: Dict[str, Any] = {
        "op": case.op, "name": case.name, "dtype": dtype_hint(case), "flops": float(case.flops),
        "bytes": float(case.bytes), "extra": dict(case.extra), "ours": case.ours,
        "baselines": case.baselines, "impls": {}, "speedup": {}, "has_reference": case.reference is not None,
        "error": None,
    }
    if dtypes and result["dtype"] is not None and result["dtype"] not in dtypes:
        if progress is not None:
            progress.update(len(case.impls))
        return None
    try:
        inputs = case.setup()
    except Exception as e:
        result["error"] = f"setup failed: {_short_error(e)}"
        if progress is not None:
            progress.update(len(case.impls))
        return result
    if result["dtype"] is None:
        result["dtype"] = _infer_dtype(inputs)
        if dtypes and result["dtype"] not in dtypes:
            if progress is not None:
                progress.update(len(case.impls))
            return None

    reference, ref_error = None, None
    warm: Dict[str, Callable[[], Any]] = {}
    for impl_name, impl in case.impls.items():
        if progress is not None:
            progress.set_postfix_str(f"{case.op}: {case.name} [{impl_name}]"[:60], refresh=True)
        entry: Dict[str, Any] = {"error": None}
        try:
            # first call: warm-up (compiles, caches), peak memory and the output for the error
            # column; then the timed calls
            if case.peak_memory:
                out, entry["peak_bytes"] = call_with_peak(lambda: impl(inputs), device)
            else:
                out = impl(inputs)
            sync(device)
            if case.reference is not None:
                if reference is None and ref_error is None:
                    try:
                        reference = case.reference(inputs)
                    except Exception as e:
                        ref_error = f"reference failed: {_short_error(e)}"
                if reference is not None:
                    entry.update(compare_outputs(out, reference))
                else:
                    entry["note"] = ref_error
            del out
            if device == "cuda":  # CUDA events, L2 flushed between calls, impl by impl
                _timed(entry, time_fn(lambda: impl(inputs), device, min_time, max_reps, warmup=False))
            else:  # CPU: timed round-robin below, once every impl is warm
                warm[impl_name] = lambda impl=impl: impl(inputs)
        except Exception as e:  # one failing impl must not stop the run
            entry["error"] = _short_error(e)
        result["impls"][impl_name] = entry
        if progress is not None:
            progress.update(1)
    for impl_name, timed in time_interleaved(warm, min_time, max_reps).items():
        if isinstance(timed, Exception):
            result["impls"][impl_name]["error"] = _short_error(timed)
        else:
            _timed(result["impls"][impl_name], timed)
    del inputs, reference, warm
    if device == "cuda":
        torch.cuda.empty_cache()

    ours = result["impls"].get(case.ours, {})
    if ours.get("median_ms"):
        for base in case.baselines:
            b = result["impls"].get(base, {})
            if b.get("median_ms"):
                result["speedup"][base] = b["median_ms"] / ours["median_ms"]
                rounds = paired_ratios(b.get("samples_ms", ()), ours.get("samples_ms", ()))
                if rounds:
                    result.setdefault("speedup_rounds", {})[base] = rounds
        ms = ours["median_ms"]
        if case.flops:
            result["gflops"] = case.flops / ms / 1e6
        if case.bytes:
            result["gbps"] = case.bytes / ms / 1e6
        floor, bound = roofline.roofline_ms(ceilings, result["dtype"], case.flops, case.bytes)
        if floor:
            result["roofline_ms"] = floor
            result["roofline_frac"] = floor / ms
            result["bound"] = bound
    result["seconds"] = time.perf_counter() - started
    return result


def _timed(entry: Dict[str, Any], stats: Dict[str, float]) -> None:
    entry.update(stats)
    entry["spread_pct"] = 100.0 * (entry["q3_ms"] - entry["q1_ms"]) / entry["median_ms"] \
        if entry["median_ms"] > 0 else 0.0


# ----------------------------------------------------------------------------- tables
def _num3(x: float) -> str:
    return f"{x:,.0f}" if x >= 100 else f"{x:.1f}" if x >= 10 else f"{x:.3g}"


def _rate(result) -> str:
    """GFLOP/s, or GB/s when the case sets only bytes or its roofline floor is the bytes."""
    if "gflops" in result and (not result.get("gbps") or result.get("bound") != "bytes"):
        return f"{_num3(result['gflops'])} GFLOP/s"
    if "gbps" in result:
        return f"{_num3(result['gbps'])} GB/s"
    return ""


def table_rows(results: List[Dict]) -> List[Dict[str, str]]:
    """One row per (case, baseline); ours' columns are filled on the case's first row."""
    rows = []
    for r in results:
        ours = r["impls"].get(r["ours"], {})
        if r.get("error"):
            rows.append({"case": r["name"], "ours ms": f"failed: {r['error']}"})
            continue
        first = {
            "case": r["name"],
            "ours ms": fmt_ms(ours.get("median_ms")) if not ours.get("error") else f"failed: {ours['error']}",
            "±": f"{ours['spread_pct']:.0f}%" if "spread_pct" in ours else "",
            "ours rate": _rate(r),
            "% roof": fmt_pct(r.get("roofline_frac")),
            "err ours": fmt_err(ours.get("max_err")) or (ours.get("note") or "")[:40],
        }
        bases = r["baselines"] or [None]
        for i, base in enumerate(bases):
            row = dict(first) if i == 0 else {k: "" for k in first}
            b = r["impls"].get(base, {}) if base else {}
            row["baseline"] = base or ""
            row["base ms"] = (fmt_ms(b.get("median_ms")) if not b.get("error")
                              else f"failed: {b['error']}") if base else ""
            sp = r["speedup"].get(base) if base else None
            rounds = r.get("speedup_rounds", {}).get(base) if base else None
            row["speedup"] = (f"{sp:.2f}x" + (f" ({rounds['q1']:.2f}-{rounds['q3']:.2f})" if rounds else "")
                              if sp else "")
            row["err base"] = fmt_err(b.get("max_err"))
            if "peak_bytes" in ours or "peak_bytes" in b:
                row["peak MiB ours/base"] = f"{fmt_mib(ours.get('peak_bytes'))} / {fmt_mib(b.get('peak_bytes'))}" \
                    if base else fmt_mib(ours.get("peak_bytes"))
            else:
                row["peak MiB ours/base"] = ""
            rows.append(row)
    columns = ["case", "ours ms", "±", "baseline", "base ms", "speedup", "ours rate", "% roof",
               "err ours", "err base", "peak MiB ours/base"]
    return [{c: row.get(c, "") for c in columns} for row in rows]


def format_table(op: str, results: List[Dict], device: str) -> str:
    from tabulate import tabulate

    lines = [f"\n## {op} ({device}): ours = {results[0]['ours'] if results else '?'}; "
             "speedup = baseline ms / ours ms (>1: ours faster), in brackets the interquartile "
             "range of the per-round ratios (CPU: impls timed in turn); ± = interquartile range; "
             "err = max |out - float64 reference|"]
    lines.append(tabulate(table_rows(results), headers="keys", tablefmt="github", disable_numparse=True))
    lines.extend(speedup_summary(results))
    took = sum(r.get("seconds", 0) for r in results)
    lines.append(f"{op}: {len(results)} case(s) in {took:.{0 if took >= 10 else 1}f} s")
    return "\n".join(lines)


def speedup_summary(results: List[Dict]) -> List[str]:
    """Geometric-mean speedup of ours over each baseline name across an op's cases."""
    by_base: Dict[str, List[float]] = {}
    for r in results:
        for base, sp in r.get("speedup", {}).items():
            by_base.setdefault(base, []).append(sp)
    out = []
    for base, sps in by_base.items():
        gm = math.exp(sum(math.log(s) for s in sps) / len(sps))
        out.append(f"ours vs {base}: geometric mean {gm:.2f}x over {len(sps)} case(s) "
                   f"(min {min(sps):.2f}x, max {max(sps):.2f}x)")
    return out


# ----------------------------------------------------------------------------- the job
def run(cases_by_op: Dict[str, List[Case]], device: str, ceilings: Optional[Dict], *,
        min_time: float = MIN_TIME, max_reps: int = MAX_REPS, dtypes=None, progress: bool = True,
        printer=print) -> List[Dict]:
    """Runs the cases op by op, printing each op's table when it is done."""
    from tqdm.auto import tqdm

    total = sum(len(c.impls) for cases in cases_by_op.values() for c in cases)
    results: List[Dict] = []
    with tqdm(total=total, desc="bench", unit="impl", disable=None if progress else True,
              file=sys.stderr, dynamic_ncols=True, leave=False) as bar:
        for op, cases in cases_by_op.items():
            op_results = []
            for case in cases:
                r = run_case(case, device, ceilings, min_time=min_time, max_reps=max_reps,
                             dtypes=dtypes, progress=bar)
                if r is not None:
                    op_results.append(r)
            results.extend(op_results)
            if op_results:
                with tqdm.external_write_mode(file=sys.stderr):
                    printer(format_table(op, op_results, device))
    return results


def add_arguments(parser: argparse.ArgumentParser, argv: Optional[List[str]] = None):
    """The `bench` subcommand's options (used by __main__.py); argv is recorded in the JSON."""
    parser.set_defaults(command_line=list(argv) if argv is not None else None)
    parser.add_argument("--ops", help=f"comma-separated op families (default: all of {', '.join(FAMILIES)})")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (seconds, for CI and smoke tests)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="default: cpu")
    parser.add_argument("--dtype", help="comma-separated dtypes to keep, e.g. bf16,float32 (default: all)")
    parser.add_argument("--cases", metavar="TEXT",
                        help="keep only the cases whose name contains TEXT, e.g. decode (default: all)")
    parser.add_argument("--json", metavar="PATH",
                        help="where to save the results (default: bench-results/bench-<device>-<time>.json)")
    parser.add_argument("--plot", metavar="PATH",
                        help="where to save the PNG plot (default: next to the JSON, .png)")
    parser.add_argument("--no-save", action="store_true", help="print the tables only; write no JSON or plot")
    parser.add_argument("--compare", metavar="PATH", help="an earlier JSON from this command: print the change")
    parser.add_argument("--min-time", type=_positive_float, default=MIN_TIME,
                        help=f"seconds of timed calls per impl (default {MIN_TIME})")
    parser.add_argument("--max-reps", type=_positive_int, default=MAX_REPS,
                        help=f"cap on timed calls per impl (default {MAX_REPS})")
    parser.add_argument("--threads", type=_positive_int,
                        help="torch CPU threads (default: torch's choice); 1 is steadier on a busy machine")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _positive_float(s):
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {s!r}")
    if not v > 0 or math.isinf(v):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {s!r}")
    return v


def _positive_int(s):
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {s!r}")
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {s!r}")
    return v


class UsageError(Exception):
    """Bad input to the bench command: printed as one line, exit status 2."""


def _parse_list(text: Optional[str]) -> Optional[List[str]]:
    if text is None:
        return None
    items = [s.strip() for s in text.split(",") if s.strip()]
    return items


def _check_args(args) -> Dict[str, Any]:
    ops = _parse_list(args.ops)
    if ops is not None:
        if not ops:
            raise UsageError("--ops is empty; choose from " + ", ".join(FAMILIES))
        unknown = [o for o in ops if o not in FAMILIES]
        if unknown:
            raise UsageError(f"unknown op(s) {', '.join(unknown)}; choose from {', '.join(FAMILIES)}")
    dtypes = _parse_list(args.dtype)
    if dtypes is not None:
        bad = [d for d in dtypes if canonical_dtype(d) is None]
        if bad or not dtypes:
            raise UsageError(f"unknown dtype(s) {', '.join(bad) or '(empty)'}; choose from "
                             "float32 (fp32), bfloat16 (bf16), float16 (fp16), float64 (fp64)")
        dtypes = sorted({canonical_dtype(d) for d in dtypes})
    if args.device == "cuda" and not torch.cuda.is_available():
        why = "this torch has no CUDA support" if torch.version.cuda is None else "no CUDA device is visible"
        raise UsageError(f"--device cuda, but {why}; run with --device cpu")
    previous = None
    if args.compare:
        try:
            previous = report.load(args.compare)
        except report.ReportError as e:
            raise UsageError(str(e))
    json_path = plot_path = None
    if not args.no_save:
        json_path = args.json or report.default_path(args.device, args.quick, ".json")
        plot_path = args.plot or os.path.splitext(json_path)[0] + ".png"
        for path in (json_path, plot_path):
            parent = os.path.dirname(os.path.abspath(path))
            try:
                os.makedirs(parent, exist_ok=True)
            except OSError as e:
                raise UsageError(f"cannot create the folder for {path}: {e.strerror}")
            if not os.access(parent, os.W_OK):
                raise UsageError(f"cannot write {path}: folder {parent} is not writable")
        if not report.have_matplotlib():
            if args.plot:
                raise UsageError("--plot needs matplotlib: pip install matplotlib")
            plot_path = None
    elif args.json or args.plot:
        raise UsageError("--no-save cannot be combined with --json or --plot")
    return {"ops": ops, "dtypes": dtypes, "previous": previous, "json": json_path, "plot": plot_path}


def cli(args) -> int:
    """`python -m truthgpt_kernels bench`; returns the exit status. Bad input: one line on
    stderr, status 2. A failing case or impl is shown in its table and gives status 1."""
    started = time.perf_counter()
    try:
        checked = _check_args(args)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.device == "cpu" and not torch.cuda.is_available() and importlib.util.find_spec("numpy"):
        # Triton impls (if any) on the CPU; Triton's interpreter needs numpy (the dev extra),
        # which a plain install lacks: without it, no Triton rows, and everything else runs
        os.environ.setdefault("TRITON_INTERPRET", "1")
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    load, load_warning = _busy_machine_warning() if args.device == "cpu" else (None, None)
    if load_warning:
        print(load_warning, file=sys.stderr)

    cases_by_op: Dict[str, List[Case]] = {}
    failures: List[str] = []
    for op in checked["ops"] or FAMILIES:
        try:
            cases = load_family(op, args.device, args.quick)
        except Exception as e:
            failures.append(f"bench/{op}.py: cases() failed: {_short_error(e)}")
            print(f"error: bench/{op}.py: cases() failed: {_short_error(e)}", file=sys.stderr)
            continue
        if cases is None:
            if checked["ops"]:
                print(f"note: no benchmark cases for {op} yet (truthgpt_kernels/bench/{op}.py)",
                      file=sys.stderr)
            continue
        if cases and getattr(args, "cases", None):
            cases = [c for c in cases if args.cases in c.name]
        if cases:
            cases_by_op[op] = cases
    if not cases_by_op:
        print("error: no benchmark cases to run" + (f" ({'; '.join(failures)})" if failures else ""),
              file=sys.stderr)
        return 1

    n_cases = sum(len(c) for c in cases_by_op.values())
    print(f"truthgpt_kernels bench: {n_cases} case(s) in {', '.join(cases_by_op)} on {args.device}"
          f"{' (quick sizes)' if args.quick else ''}; min-time {args.min_time} s, max-reps {args.max_reps}"
          + (f"; dtypes {', '.join(checked['dtypes'])}" if checked["dtypes"] else ""), flush=True)
    ceilings = roofline.measure(args.device, args.quick)
    print(roofline.describe(ceilings), flush=True)

    results = run(cases_by_op, args.device, ceilings, min_time=args.min_time, max_reps=args.max_reps,
                  dtypes=checked["dtypes"], progress=not args.no_progress)
    if not results:
        print("error: every case was filtered out by --dtype " + ",".join(checked["dtypes"] or []),
              file=sys.stderr)
        return 1
    for r in results:
        if r.get("error"):
            failures.append(f"{r['op']}: {r['name']}: {r['error']}")
        for impl, e in r["impls"].items():
            if e.get("error"):
                failures.append(f"{r['op']}: {r['name']} [{impl}]: {e['error']}")

    elapsed = time.perf_counter() - started
    settings = {"device": args.device, "quick": args.quick, "min_time": args.min_time,
                "max_reps": args.max_reps, "ops": list(cases_by_op), "dtypes": checked["dtypes"],
                "threads": torch.get_num_threads(), "load_average": load, "busy_warning": load_warning}
    doc = report.build(results, ceilings, settings, elapsed,
                       command=_command_line(args))
    status = 0
    if checked["json"]:
        try:
            report.save_json(doc, checked["json"])
            print(f"\nresults: {checked['json']}")
        except OSError as e:
            print(f"error: could not write {checked['json']}: {e.strerror or e}", file=sys.stderr)
            status = 1
    if checked["plot"]:
        try:
            report.plot(doc, checked["plot"])
            print(f"plot:    {checked['plot']}")
        except Exception as e:
            print(f"error: could not draw the plot {checked['plot']}: {_short_error(e)}", file=sys.stderr)
            status = 1
    if checked["previous"] is not None:
        print(report.format_compare(checked["previous"], doc))
    print(f"\nbench took {elapsed:.0f} s ({len(results)} case(s); ceilings {ceilings['seconds']:.1f} s)")
    if load_warning:
        print(load_warning)
    if failures:
        print(f"\n{len(failures)} failure(s):", file=sys.stderr)
        for f in failures:
            print(f"  {f}", file=sys.stderr)
        status = 1
    return status


def _busy_machine_warning():
    """Other processes on the cores make CPU timings unreliable (OpenMP threads that wait for
    a descheduled peer can run many times slower); say so rather than hide it."""
    try:
        load = os.getloadavg()[0]
    except (OSError, AttributeError):
        return None, None
    cores = os.cpu_count() or 1
    if load > 0.5 * cores:
        return load, (f"warning: load average {load:.1f} on {cores} core(s) before the run: other processes "
                f"compete for the CPU, so CPU timings are unreliable (--threads 1 suffers least)")
    return load, None


def _command_line(args) -> str:
    import shlex

    argv = getattr(args, "command_line", None)
    if argv is None:
        argv = sys.argv[1:]
    return " ".join(["python -m truthgpt_kernels"] + [shlex.quote(str(a)) for a in argv])


def main(device: str = "cpu", quick: bool = False, ops=None, min_time: float = MIN_TIME):
    """Programmatic entry (older signature): runs and prints, saves nothing; returns results."""
    cases_by_op = {}
    for op in ops or FAMILIES:
        cases = load_family(op, device, quick)
        if cases:
            cases_by_op[op] = cases
    return run(cases_by_op, device, roofline.measure(device, quick), min_time=min_time)
