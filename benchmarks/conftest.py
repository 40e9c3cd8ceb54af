"""pytest-benchmark suites over the cases of truthgpt_kernels.bench: ours and its PyTorch
baselines share a group, so they print side by side.
Run: pytest benchmarks --benchmark-only [--quick] [--benchmark-autosave]"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_addoption(parser):
    parser.addoption("--quick", action="store_true", help="tiny sizes")
    parser.addoption("--device", default="cuda" if torch.cuda.is_available() else "cpu")


def params(op, config):
    """(case, impl) pairs of one op family, for pytest_generate_tests."""
    from truthgpt_kernels.bench import load_cases

    out = []
    for case in load_cases(config.getoption("--device"), config.getoption("--quick"), [op]):
        for impl in case.impls:
            out.append(pytest.param(case, impl, id=f"{case.name}-{impl}"))
    return out


def pytest_generate_tests(metafunc):
    if {"case", "impl"} <= set(metafunc.fixturenames):
        op = metafunc.module.OP
        metafunc.parametrize(("case", "impl"), params(op, metafunc.config))


def run_case(benchmark, case, impl):
    inputs = case.setup()
    benchmark.group = f"{case.op}: {case.name}"
    benchmark.extra_info.update({"flops": case.flops, "bytes": case.bytes, **case.extra})
    fn = case.impls[impl]
    if inputs and any(isinstance(v, torch.Tensor) and v.is_cuda for v in inputs.values()):
        def call():
            fn(inputs)
            torch.cuda.synchronize()
        benchmark(call)
    else:
        benchmark(fn, inputs)


@pytest.fixture
def bench_case(benchmark):
    return lambda case, impl: run_case(benchmark, case, impl)
