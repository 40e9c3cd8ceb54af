OP = "rotary"


def test_rotary(bench_case, case, impl):
    bench_case(case, impl)
