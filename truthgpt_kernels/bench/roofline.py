"""The machine's ceilings, measured once at the start of a run rather than taken from a
datasheet: the float32 and bfloat16 matrix-product rate (GFLOP/s, torch.mm on random data;
float32 on the CPU: the faster of torch.mm and oneDNN's linear)
and the copy bandwidth (GB/s, a large tensor copy counting bytes read plus bytes written).
A case's fraction of the ceiling is its roofline floor, max(flops / GEMM rate, bytes /
bandwidth), over its measured time: 100% means it runs as fast as this machine can.

On CUDA the float32 rate is whatever torch.mm does by default (full fp32 unless the user
enabled TF32); float16 cases use the bfloat16 rate (the same tensor-core rate on the chips we
target)."""
import time
from typing import Dict, Optional

import torch

from .timing import time_fn

# (matrix size n for an n x n x n product, copy size in MiB); quick sizes for --quick
_SIZES = {
    ("cpu", False): {"float32": 1024, "bfloat16": 1024, "copy_mib": 128},
    ("cpu", True): {"float32": 512, "bfloat16": 512, "copy_mib": 64},
    ("cuda", False): {"float32": 8192, "bfloat16": 8192, "copy_mib": 2048},
    ("cuda", True): {"float32": 4096, "bfloat16": 8192, "copy_mib": 1024},
}


def _best_ms(fn, device: str, min_time: float, max_reps: int = 50) -> float:
    """Median ms of fn after a warm-up call (ceilings want a steady rate, not a spread)."""
    return time_fn(fn, device, min_time=min_time, max_reps=max_reps)["median_ms"]


def measure(device: str = "cpu", quick: bool = False, min_time: float = 0.2, rounds: int = 2) -> Dict:
    """{'gemm_gflops': {'float32': .., 'bfloat16': ..}, 'copy_gbps': .., 'sizes': .., 'seconds': ..}:
    the best of `rounds` rounds (each a median) for each rate. (A shared VM's speed moves for seconds at a time:
    one round that fell in a slow second once put the ceilings at half the machine's rate and
    a case at "144%" of it.)"""
    start = time.perf_counter()
    out = _measure_once(device, quick, min_time)
    for _ in range(rounds - 1):
        again = _measure_once(device, quick, min_time)
        for k, v in again["gemm_gflops"].items():
            out["gemm_gflops"][k] = max(v, out["gemm_gflops"].get(k) or 0.0)
        if again["copy_gbps"]:
            out["copy_gbps"] = max(again["copy_gbps"], out["copy_gbps"] or 0.0)
    out["seconds"] = time.perf_counter() - start
    return out


def _measure_once(device: str, quick: bool, min_time: float) -> Dict:
    start = time.perf_counter()
    sizes = _SIZES[(device, quick)]
    out: Dict = {"gemm_gflops": {}, "copy_gbps": None, "sizes": dict(sizes), "errors": {}}
    for dtype_name in ("float32", "bfloat16"):
        n = sizes[dtype_name]
        dtype = getattr(torch, dtype_name)
        try:
            a = torch.randn(n, n, device=device, dtype=dtype)  # random: zeros run faster
            b = torch.randn(n, n, device=device, dtype=dtype)
            c = torch.empty(n, n, device=device, dtype=dtype)
            ms = _best_ms(lambda: torch.mm(a, b, out=c), device, min_time)
            if device == "cpu" and dtype_name == "float32" and torch.backends.mkldnn.is_available():
                # the machine's ceiling is the faster of torch's BLAS and oneDNN (which tk.linear
                # uses where it is faster: MKL runs AVX2 code on AMD CPUs with AVX-512)
                bt = b.t().contiguous()
                dnn = torch.ops.mkldnn._linear_pointwise
                ms = min(ms, _best_ms(lambda: dnn(a, bt, None, "none", [], ""), device, min_time))
            out["gemm_gflops"][dtype_name] = 2.0 * n ** 3 / ms / 1e6
            del a, b, c
        except Exception as e:  # a dtype the machine cannot multiply: leave it unmeasured
            out["errors"][f"gemm {dtype_name}"] = f"{type(e).__name__}: {e}"
    try:
        numel = sizes["copy_mib"] * 2 ** 20 // 4
        src = torch.randn(numel, device=device)
        dst = torch.empty_like(src)
        ms = _best_ms(lambda: dst.copy_(src), device, min_time)
        out["copy_gbps"] = 2.0 * src.numel() * 4 / ms / 1e6
        del src, dst
    except Exception as e:
        out["errors"]["copy"] = f"{type(e).__name__}: {e}"
    if device == "cuda":
        torch.cuda.empty_cache()
    out["seconds"] = time.perf_counter() - start
    return out


def gemm_rate(ceilings: Dict, dtype: Optional[str]) -> Optional[float]:
    """GFLOP/s ceiling for a case of this dtype (float16 -> bfloat16's; others -> float32's)."""
    rates = (ceilings or {}).get("gemm_gflops") or {}
    key = {"bfloat16": "bfloat16", "float16": "bfloat16"}.get(dtype or "", "float32")
    return rates.get(key)


def roofline_ms(ceilings: Dict, dtype: Optional[str], flops: float, nbytes: float):
    """(floor on a call's time in ms, 'flops' or 'bytes': which term sets it), from its flops
    and bytes; (None, None) if nothing is known."""
    floors = []
    rate = gemm_rate(ceilings, dtype)
    if flops and rate:
        floors.append((flops / rate / 1e6, "flops"))
    bw = (ceilings or {}).get("copy_gbps")
    if nbytes and bw:
        floors.append((nbytes / bw / 1e6, "bytes"))
    return max(floors) if floors else (None, None)


def describe(ceilings: Dict) -> str:
    rates = ceilings.get("gemm_gflops", {})
    parts = [f"GEMM {k} {v:,.0f} GFLOP/s" for k, v in rates.items()]
    if ceilings.get("copy_gbps"):
        parts.append(f"copy {ceilings['copy_gbps']:,.1f} GB/s")
    parts.append(f"(measured in {ceilings.get('seconds', 0):.1f} s)")
    return "ceilings: " + ", ".join(parts)
