import pytest

OP = "attention"


def test_attention(bench_case, case, impl):
    bench_case(case, impl)


def test_attention_peak_memory(benchmark, request):
    """Forward + backward peak memory, ours vs eager attention (issue target: <= 1/8), measured
    in subprocesses; recorded in the benchmark's extra_info."""
    if request.config.getoption("--device") != "cpu":
        pytest.skip("the memory comparison measures the CPU kernel")
    from truthgpt_kernels.bench.attention import peak_memory

    shape = dict(B=1, H=2, S=1024 if request.config.getoption("--quick") else 8192, D=64)
    mem = benchmark.pedantic(peak_memory, kwargs=shape, rounds=1, iterations=1)
    benchmark.extra_info.update({"shape": shape, "peak_bytes_truthgpt": mem["truthgpt"],
                                 "peak_bytes_eager": mem["eager"],
                                 "ratio": mem["truthgpt"] / max(mem["eager"], 1), "target": "<= 0.125"})
