"""Benchmark cases, defined once and run by both `python -m truthgpt_kernels bench` and the
pytest-benchmark suites in benchmarks/. Each op family has one module `bench/<op>.py` with
`cases(device, quick) -> list[Case]`: its CPU cases and its GPU (device "cuda") cases; the
first entry of `Case.impls` is ours, the rest are the PyTorch baselines it is compared against
in the same run.

The other modules, leaf first (each imports only those above it):
    timing.py        time_fn (the timer) and the number formats of the tables
    roofline.py      the machine's ceilings (GEMM rate, copy bandwidth), measured at the start
                     of a run, and a case's roofline floor
    copy_ceiling.py  the per-case "copy, same bytes" row that the elementwise cases list
    report.py        the results JSON, the plot, --compare and `... report summary`
    runner.py        the job: runs the cases, prints the tables; the `bench` CLI options

Writing a case (only `op`, `name`, `setup` and `impls` are required):

    Case(op="swiglu", name="fwd+bwd 8192x5504 bfloat16",
         setup=lambda: {"g": ..., "u": ...},            # built once, passed to every impl
         impls={"truthgpt": ours, "torch eager": eager},  # ours first
         bytes=...,                                      # or flops=..., per call
         reference=in_float64(eager_or_spec),            # optional: the error column
         extra={"dtype": "bfloat16", "seq_len": 4096})   # optional: filtering and plots

- `reference(inputs)` returns what the impls return (a tensor, or a tuple/list/dict of them),
  computed in float64; `in_float64(fn)` builds one from any impl by upcasting the inputs.
  Without it the error column stays blank.
- `extra["dtype"]` lets `--dtype` filter without building inputs (else a dtype word in the
  name, else the inputs' first floating tensor decides); `extra["seq_len"]` puts the case on
  the time-vs-sequence-length plot (one line per impl and per `extra["series"]`, which
  defaults to the name with the sequence length blanked out).
- `peak_memory=False` skips the extra profiled call that measures peak memory.
"""
import importlib
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional

import torch

from .. import backends

FAMILIES = ("attention", "attention_varlen", "rotary", "swiglu", "rms_norm", "layer_norm", "geglu", "linear", "grouped_linear",
            "linear_cross_entropy", "cross_entropy", "model", "dropin")

DTYPES = {  # accepted spellings -> canonical torch name
    "float32": "float32", "fp32": "float32", "f32": "float32", "float": "float32",
    "bfloat16": "bfloat16", "bf16": "bfloat16",
    "float16": "float16", "fp16": "float16", "f16": "float16", "half": "float16",
    "float64": "float64", "fp64": "float64", "f64": "float64", "double": "float64",
}


@dataclass
class Case:
    op: str                                   # op family, e.g. "swiglu"
    name: str                                 # e.g. "fwd+bwd 8192x5504 float32"
    setup: Callable[[], Dict[str, Any]]       # builds the inputs once
    impls: Dict[str, Callable[[Dict[str, Any]], Any]]  # "ours" first, then baselines
    flops: float = 0.0                        # per call, for GFLOP/s
    bytes: float = 0.0                        # per call (read + written), for GB/s
    extra: Dict[str, Any] = field(default_factory=dict)
    # optional, added later (keyword-only in spirit: pass them by name)
    reference: Optional[Callable[[Dict[str, Any]], Any]] = None  # float64 ground truth
    peak_memory: bool = True                  # measure each impl's peak memory (one extra call)

    @property
    def ours(self) -> str:
        return next(iter(self.impls))

    @property
    def baselines(self) -> List[str]:
        return list(self.impls)[1:]


def _to_float64(value):
    if isinstance(value, torch.Tensor):
        if value.is_floating_point() or value.is_complex():
            t = value.detach().to(torch.complex128 if value.is_complex() else torch.float64)
            return t.requires_grad_(value.requires_grad)
        return value
    if isinstance(value, dict):
        return {k: _to_float64(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_float64(v) for v in value)
    return value


def upcast(inputs: Dict[str, Any]) -> Dict[str, Any]:
    """A copy of a case's inputs with every floating tensor in float64 (leaves that required
    grad still do), for computing references."""
    return _to_float64(inputs)


def fwd_bwd(fn: Callable[[Dict[str, Any]], Any], names, grad: str = "dy") -> Callable[[Dict[str, Any]], Any]:
    """An impl timing forward + backward: out = fn(inputs), then the gradients of the inputs
    named in `names` given inputs[grad] (torch.autograd.grad: nothing accumulates across calls)."""
    def run(inputs):
        return torch.autograd.grad(fn(inputs), [inputs[n] for n in names], inputs[grad])
    return run


def gpu_backends(family: str) -> List[str]:
    """Our GPU backends that can run op family `family` here, CUDA C++ first: the "ours"
    impls of the GPU cases (one impl per backend)."""
    return [b for b in ("cuda", "triton")
            if not backends.unavailable_reason(b) and backends.implements(family, b)]


def in_float64(fn: Callable[[Dict[str, Any]], Any]) -> Callable[[Dict[str, Any]], Any]:
    """Case.reference from any impl-like callable: runs fn on upcast(inputs)."""
    def reference(inputs):
        return fn(upcast(inputs))
    reference.__name__ = f"in_float64({getattr(fn, '__name__', 'fn')})"
    return reference


def canonical_dtype(name: str) -> Optional[str]:
    """'bf16' -> 'bfloat16'; None if not a dtype name we know."""
    return DTYPES.get(str(name).lower().replace("torch.", ""))


def dtype_hint(case: Case) -> Optional[str]:
    """The case's dtype without building its inputs: extra['dtype'], else a dtype word in the
    name; None when neither says."""
    if "dtype" in case.extra:
        return canonical_dtype(case.extra["dtype"]) or str(case.extra["dtype"])
    for word in re.split(r"[\s,;/()\[\]=_-]+", case.name):
        if canonical_dtype(word):
            return canonical_dtype(word)
    return None


def load_family(op: str, device: str = "cpu", quick: bool = False) -> Optional[List[Case]]:
    """The cases of one family; None if bench/<op>.py does not exist yet."""
    try:
        module = importlib.import_module(f"truthgpt_kernels.bench.{op}")
    except ModuleNotFoundError as e:
        if e.name == f"truthgpt_kernels.bench.{op}":
            return None  # no cases for this family yet
        raise
    return list(module.cases(device, quick))


def load_cases(device: str = "cpu", quick: bool = False, ops=None) -> List[Case]:
    cases = []
    for op in ops or FAMILIES:
        cases.extend(load_family(op, device, quick) or [])
    return cases
