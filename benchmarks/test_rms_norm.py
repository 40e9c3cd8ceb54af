OP = "rms_norm"


def test_rms_norm(bench_case, case, impl):
    bench_case(case, impl)
