OP = "swiglu"


def test_swiglu(bench_case, case, impl):
    bench_case(case, impl)
