OP = "dropin"


def test_dropin(bench_case, case, impl):
    bench_case(case, impl)
