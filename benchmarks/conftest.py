"""pytest-benchmark suites over the cases of truthgpt_kernels.bench (the same cases that
`python -m truthgpt_kernels bench` runs): one file per op family (test_<op>.py, with
`OP = "<op>"` and one test taking `bench_case, case, impl`). Ours and its PyTorch baselines
share a group named "<op>: <case>", so they print side by side.

Run:
    pytest benchmarks --benchmark-only                     # all families, full sizes
    pytest benchmarks/test_swiglu.py --benchmark-only --quick   # tiny sizes
    pytest benchmarks --benchmark-only --device cuda       # default: cuda when a GPU is visible

Saving and comparing (pytest-benchmark stores runs under .benchmarks/<machine>/, gitignored):
    pytest benchmarks --benchmark-only --benchmark-autosave          # saves 0001_<commit>...json
    pytest benchmarks --benchmark-only --benchmark-compare           # against the latest saved
    pytest benchmarks --benchmark-only --benchmark-compare=0001 --benchmark-compare-fail=median:10%
    pytest-benchmark compare 0001 0002 --group-by=group              # two saved runs
    pytest benchmarks --benchmark-only --benchmark-json=out.json     # one file, anywhere
Test ids are "<case name>-<impl>" and stable across runs, so runs compare by name. Each
result's extra_info holds: op, case, impl, ours (true for our impl), dtype, flops and bytes
per call, gflops_per_s and gb_per_s at the median, max_err against the float64 reference
(when the case has one) and the case's extra fields (JSON-safe). The machine_info of a saved
run adds torch, CUDA, Triton and the GPU's name.

A case whose impl raises truthgpt_kernels.BackendError here (a kernel this machine cannot run)
is skipped with that message; any other exception fails the test.
"""
import math
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_addoption(parser):
    group = parser.getgroup("truthgpt benchmarks")
    group.addoption("--quick", action="store_true", help="tiny sizes (the `bench --quick` cases)")
    group.addoption("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                    choices=("cpu", "cuda"), help="device of the cases (default: cuda if visible)")


def pytest_configure(config):
    if config.getoption("--device") == "cuda" and not torch.cuda.is_available():
        raise pytest.UsageError("--device cuda, but no CUDA device is visible")


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["torch"] = torch.__version__
    machine_info["torch_cuda"] = torch.version.cuda
    machine_info["bench_device"] = config.getoption("--device")
    machine_info["torch_threads"] = torch.get_num_threads()
    if torch.cuda.is_available():
        machine_info["gpu"] = torch.cuda.get_device_name(0)
    try:
        import triton
        machine_info["triton"] = triton.__version__
    except ImportError:
        machine_info["triton"] = None


def params(op, config):
    """(case, impl) pairs of one op family, for pytest_generate_tests."""
    from truthgpt_kernels.bench import load_family

    out = []
    for case in load_family(op, config.getoption("--device"), config.getoption("--quick")) or []:
        for impl in case.impls:
            out.append(pytest.param(case, impl, id=f"{case.name}-{impl}"))
    return out


def pytest_generate_tests(metafunc):
    if {"case", "impl"} <= set(metafunc.fixturenames):
        op = metafunc.module.OP
        metafunc.parametrize(("case", "impl"), params(op, metafunc.config))


def _json_safe(value):
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return str(value)


def run_case(benchmark, case, impl):
    from truthgpt_kernels import BackendError
    from truthgpt_kernels.bench.runner import _infer_dtype, compare_outputs

    inputs = case.setup()
    fn = case.impls[impl]
    benchmark.group = f"{case.op}: {case.name}"
    info = {"op": case.op, "case": case.name, "impl": impl, "ours": impl == case.ours,
            "dtype": _infer_dtype(inputs), "flops": float(case.flops), "bytes": float(case.bytes)}
    info.update({f"extra.{k}": v for k, v in case.extra.items()})
    cuda = any(t.is_cuda for t in _tensors(inputs))
    try:
        out = fn(inputs)  # warm-up (compiles, caches) and the error check, outside the timing
    except BackendError as e:
        pytest.skip(f"{impl}: {e}")
    if case.reference is not None:
        info["max_err"] = compare_outputs(out, case.reference(inputs))["max_err"]
    del out
    if cuda:
        torch.cuda.synchronize()

        def call():
            fn(inputs)
            torch.cuda.synchronize()
        benchmark(call)
    else:
        benchmark(fn, inputs)
    stats = getattr(getattr(benchmark, "stats", None), "stats", None)
    median = getattr(stats, "median", None)
    if median:
        if case.flops:
            info["gflops_per_s"] = case.flops / median / 1e9
        if case.bytes:
            info["gb_per_s"] = case.bytes / median / 1e9
    benchmark.extra_info.update(_json_safe(info))


def _tensors(value):
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _tensors(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _tensors(v)


@pytest.fixture
def bench_case(benchmark):
    return lambda case, impl: run_case(benchmark, case, impl)
