OP = "model"


def test_model(bench_case, case, impl):
    bench_case(case, impl)
