"""Benchmark cases, defined once and run by both `python -m truthgpt_kernels bench` and the
pytest-benchmark suites in benchmarks/. Each op family has a module `bench/<op>.py` with
`cases(device, quick) -> list[Case]`; the first entry of `Case.impls` is ours, the rest are
the PyTorch baselines it is compared against in the same run."""
import importlib
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List

FAMILIES = ("attention", "rotary", "swiglu", "rms_norm", "model", "dropin")


@dataclass
class Case:
    op: str                                   # op family, e.g. "swiglu"
    name: str                                 # e.g. "fwd+bwd 8192x5504 float32"
    setup: Callable[[], Dict[str, Any]]       # builds the inputs once
    impls: Dict[str, Callable[[Dict[str, Any]], Any]]  # "ours" first, then baselines
    flops: float = 0.0                        # per call, for GFLOP/s
    bytes: float = 0.0                        # per call (read + written), for GB/s
    extra: Dict[str, Any] = field(default_factory=dict)


def load_cases(device: str = "cpu", quick: bool = False, ops=None) -> List[Case]:
    cases = []
    for op in ops or FAMILIES:
        try:
            module = importlib.import_module(f"truthgpt_kernels.bench.{op}")
        except ModuleNotFoundError as e:
            if e.name == f"truthgpt_kernels.bench.{op}":
                continue  # no cases for this family yet
            raise
        cases.extend(module.cases(device, quick))
    return cases
