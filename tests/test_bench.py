"""The benchmark runner (`python -m truthgpt_kernels bench`) on tiny sizes: tables, JSON, plot,
the error column, --compare and bad input. Speed itself is never asserted here."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from truthgpt_kernels import __main__ as cli
from truthgpt_kernels.bench import Case, dtype_hint, in_float64, report, runner, timing, upcast

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# one thread: steady on a busy CI machine (OpenMP threads that wait for a descheduled peer
# make tiny ops many times slower); restored after each test
FAST = ["--min-time", "0.005", "--max-reps", "5", "--no-progress", "--threads", "1"]
FAKE_CEILINGS = {"gemm_gflops": {"float32": 50.0, "bfloat16": 100.0}, "copy_gbps": 10.0,
                 "sizes": {}, "errors": {}, "seconds": 0.0}


def _attention_math(x):
    q, k, v = x["q"], x["k"], x["v"]
    p = torch.softmax(q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5, dim=-1)
    return p @ v


def _sdpa(x):
    return F.scaled_dot_product_attention(x["q"], x["k"], x["v"])


def synthetic_cases(device="cpu", quick=True):
    """Attention-like cases over three sequence lengths and two dtypes, one without a
    reference, and one whose 'ours' is deliberately off by 1e-2."""
    out = []
    for dtype in (torch.float32, torch.bfloat16):
        for s in (16, 32, 64):
            def setup(s=s, dtype=dtype):
                g = torch.Generator().manual_seed(s)
                return {n: torch.randn(1, 2, s, 16, generator=g).to(dtype) for n in "qkv"}
            out.append(Case(op="attention", name=f"fwd S{s} D16 {str(dtype)[6:]}", setup=setup,
                            impls={"ours": _attention_math, "sdpa": _sdpa},
                            flops=4 * 2 * s * s * 16, bytes=4 * 2 * s * 16 * dtype.itemsize,
                            reference=in_float64(_attention_math), extra={"seq_len": s}))
    out.append(Case(op="attention", name="no reference 8x8", setup=lambda: {"x": torch.randn(8, 8)},
                    impls={"ours": lambda x: x["x"] * 2, "eager": lambda x: x["x"] + x["x"]}))
    out.append(Case(op="attention", name="off by 1e-2 32x32 float32",
                    setup=lambda: {"x": torch.randn(32, 32)},
                    impls={"ours": lambda x: x["x"] + 1e-2, "eager": lambda x: x["x"].clone()},
                    reference=in_float64(lambda x: x["x"])))
    return out


@pytest.fixture(autouse=True)
def _restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.fixture
def synthetic(monkeypatch):
    """`--ops attention` runs synthetic_cases(), with fixed ceilings (no measuring)."""
    def load_family(op, device="cpu", quick=False):
        return synthetic_cases(device, quick) if op == "attention" else None
    monkeypatch.setattr(runner, "load_family", load_family)
    monkeypatch.setattr("truthgpt_kernels.bench.roofline.measure", lambda *a, **k: dict(FAKE_CEILINGS))


def run_cli(capsys, *argv):
    rc = cli.main(["bench", *argv])
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.fixture(scope="module")
def results_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("bench")


def test_synthetic_run_writes_table_json_and_plot(synthetic, capsys, results_dir):
    js, png = results_dir / "a.json", results_dir / "a.png"
    rc, out, err = run_cli(capsys, "--ops", "attention", *FAST, "--json", str(js), "--plot", str(png))
    assert rc == 0, err
    assert "## attention (cpu)" in out
    header = next(line for line in out.splitlines() if line.startswith("| case"))
    for col in ("ours ms", "baseline", "base ms", "speedup", "ours rate", "% roof", "err ours",
                "err base", "peak MiB ours/base"):
        assert col in header
    assert "fwd S32 D16 bfloat16" in out and "GFLOP/s" in out
    assert f"results: {js}" in out and f"plot:    {png}" in out
    assert "geometric mean" in out and "bench took" in out

    doc = report.load(str(js))
    json.loads(js.read_text())  # strict JSON (no NaN/Infinity literals)
    assert doc["format"] == report.FORMAT
    for key in ("created", "command", "settings", "machine", "versions", "ceilings", "elapsed_s"):
        assert key in doc
    assert doc["versions"]["torch"] == torch.__version__
    assert doc["settings"]["device"] == "cpu" and doc["settings"]["min_time"] == 0.005
    cases = {c["name"]: c for c in doc["cases"]}
    assert len(cases) == 8
    for name, c in cases.items():
        assert c["ours"] == "ours" and c["baselines"]
        for impl, e in c["impls"].items():
            assert e["error"] is None, (name, impl, e)
            assert 0 < e["median_ms"] and e["q1_ms"] <= e["median_ms"] <= e["q3_ms"]
            assert 1 <= e["n"] <= 5
        assert set(c["speedup"]) == set(c["baselines"]) and all(v > 0 for v in c["speedup"].values())

    # the error column: computed against the float64 reference, and small where it should be
    f32, bf16 = cases["fwd S64 D16 float32"], cases["fwd S64 D16 bfloat16"]
    assert f32["dtype"] == "float32" and bf16["dtype"] == "bfloat16"
    assert f32["impls"]["ours"]["max_err"] < 1e-5 and f32["impls"]["sdpa"]["max_err"] < 1e-5
    assert 0 < bf16["impls"]["ours"]["max_err"] < 0.1
    assert bf16["impls"]["ours"]["rel_err"] < 2e-2
    off = cases["off by 1e-2 32x32 float32"]["impls"]
    assert off["ours"]["max_err"] == pytest.approx(1e-2, rel=1e-3) and off["eager"]["max_err"] == 0
    assert "max_err" not in cases["no reference 8x8"]["impls"]["ours"]
    # rates and the fraction of the (fake) ceilings: flops/bytes over the median
    ms = f32["impls"]["ours"]["median_ms"]
    assert f32["gflops"] == pytest.approx(f32["flops"] / ms / 1e6)
    floor = max(f32["flops"] / 50.0, f32["bytes"] / 10.0) / 1e6
    assert f32["roofline_frac"] == pytest.approx(floor / ms)
    assert f32["impls"]["ours"]["peak_bytes"] is None or f32["impls"]["ours"]["peak_bytes"] >= 0

    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


def test_compare_prints_the_change(synthetic, capsys, results_dir):
    old = results_dir / "compare_base.json"  # its own saved run (xdist may run the others elsewhere)
    rc, _, err = run_cli(capsys, "--ops", "attention", *FAST, "--json", str(old))
    assert rc == 0 and old.exists(), err
    rc, out, err = run_cli(capsys, "--ops", "attention", *FAST, "--no-save", "--compare", str(old))
    assert rc == 0, err
    assert "## compared with" in out
    section = out[out.index("## compared with"):]
    assert "before ms" in section and "now ms" in section and "change" in section
    assert "fwd S16 D16 float32" in section and "%" in section
    assert "results:" not in out  # --no-save
    # the same comparison from saved files, as a module command
    assert report.main(["compare", str(old), str(old)]) == 0
    assert "+0.0%" in capsys.readouterr().out


def test_dtype_filter(synthetic, capsys):
    rc, out, err = run_cli(capsys, "--ops", "attention", *FAST, "--no-save", "--dtype", "bf16")
    assert rc == 0, err
    assert "bfloat16" in out and "fwd S16 D16 float32" not in out
    assert "no reference 8x8" not in out  # its inputs are float32 (found by building them)


def test_cases_filter(synthetic, capsys):
    rc, out, err = run_cli(capsys, "--ops", "attention", *FAST, "--no-save", "--cases", "S64")
    assert rc == 0, err
    assert "fwd S64 D16 float32" in out and "fwd S16 D16 float32" not in out


def test_failing_impl_is_reported_and_exits_nonzero(monkeypatch, capsys):
    def broken(x):
        raise RuntimeError("kernel exploded")
    cases = [Case(op="rotary", name="broken 4", setup=lambda: {"x": torch.randn(4)},
                  impls={"ours": broken, "eager": lambda x: x["x"] * 1})]
    monkeypatch.setattr(runner, "load_family", lambda op, *a: cases if op == "rotary" else None)
    monkeypatch.setattr("truthgpt_kernels.bench.roofline.measure", lambda *a, **k: dict(FAKE_CEILINGS))
    rc, out, err = run_cli(capsys, "--ops", "rotary", *FAST, "--no-save")
    assert rc == 1
    assert "failed: RuntimeError: kernel exploded" in out
    assert "kernel exploded" in err and "Traceback" not in err


def test_swiglu_quick_real_cases(tmp_path, capsys):
    js = tmp_path / "s.json"
    rc, out, err = run_cli(capsys, "--ops", "swiglu", "--quick", "--min-time", "0.02", "--max-reps", "10",
                           "--no-progress", "--threads", "1", "--json", str(js))
    assert rc == 0, err
    assert "## swiglu (cpu)" in out and "GB/s" in out
    doc = report.load(str(js))
    assert len(doc["cases"]) >= 2
    assert doc["ceilings"]["copy_gbps"] > 0 and doc["ceilings"]["gemm_gflops"]["float32"] > 0
    assert os.path.exists(str(js)[:-5] + ".png")  # the plot defaults to next to the JSON
    atol = {"float32": 2e-5, "bfloat16": 2e-2}
    for c in doc["cases"]:
        ours = c["impls"][c["ours"]]
        assert c["has_reference"] and ours["max_err"] is not None
        for base in c["baselines"]:  # DESIGN.md: ours <= 2x PyTorch's error + atol
            if c["impls"][base]["max_err"] is None:
                continue  # the copy-bandwidth ceiling computes nothing comparable
            assert ours["max_err"] <= 2 * c["impls"][base]["max_err"] + atol[c["dtype"]]


@pytest.mark.parametrize("argv, message", [
    (["--ops", "attention,nope"], "unknown op(s) nope"),
    (["--ops", ","], "--ops is empty"),
    (["--dtype", "float8"], "unknown dtype(s) float8"),
    (["--compare", "/nonexistent/old.json"], "no such file"),
    (["--no-save", "--json", "x.json"], "cannot be combined"),
])
def test_bad_input(capsys, argv, message):
    rc, out, err = run_cli(capsys, *argv)
    assert rc == 2
    assert err.startswith("error: ") and message in err and "Traceback" not in err


def test_bad_compare_files(capsys, tmp_path):
    (tmp_path / "garbage.json").write_text("{not json")
    (tmp_path / "other.json").write_text(json.dumps({"benchmarks": []}))
    for name, message in (("garbage.json", "not valid JSON"), ("other.json", "not a results file"),
                          ("", "is a directory")):
        rc, out, err = run_cli(capsys, "--compare", str(tmp_path / name))
        assert rc == 2 and message in err, err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_cuda_without_gpu(capsys):
    rc, out, err = run_cli(capsys, "--device", "cuda")
    assert rc == 2 and "--device cuda, but" in err


def test_bad_option_values_exit_cleanly(capsys):
    for argv in (["--min-time", "-1"], ["--max-reps", "0"], ["--device", "tpu"]):
        with pytest.raises(SystemExit) as e:
            cli.main(["bench", *argv])
        assert e.value.code == 2
    assert "Traceback" not in capsys.readouterr().err


def test_command_line_bad_input_has_no_traceback(tmp_path):
    """The real process: one line on stderr, exit status 2."""
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    p = subprocess.run([sys.executable, "-m", "truthgpt_kernels", "bench", "--ops", "attention,bogus"],
                       capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120)
    assert p.returncode == 2
    assert "unknown op(s) bogus" in p.stderr and "Traceback" not in p.stderr


def test_helpers():
    x = {"a": torch.randn(3, dtype=torch.bfloat16, requires_grad=True), "i": torch.arange(3), "s": 2}
    up = upcast(x)
    assert up["a"].dtype == torch.float64 and up["a"].requires_grad and up["a"].is_leaf
    assert up["i"].dtype == torch.int64 and up["s"] == 2
    assert dtype_hint(Case("x", "fwd 4x4 bf16", dict, {"o": None})) == "bfloat16"
    assert dtype_hint(Case("x", "fwd", dict, {"o": None}, extra={"dtype": "fp16"})) == "float16"
    assert dtype_hint(Case("x", "fwd 4x4", dict, {"o": None})) is None
    r = runner.compare_outputs((torch.ones(2), torch.zeros(2)), (torch.ones(2, dtype=torch.float64),
                                                                 torch.full((2,), 0.5, dtype=torch.float64)))
    assert r["max_err"] == 0.5 and r["rel_err"] == pytest.approx(math.sqrt(0.5 / 2.5))
    assert runner.compare_outputs(torch.tensor([float("nan")]), torch.tensor([1.0]))["max_err"] == math.inf
    assert runner.compare_outputs(torch.tensor([1.0, float("inf")]),
                                  torch.tensor([1.0, -float("inf")]))["max_err"] == math.inf
    assert runner.compare_outputs(torch.tensor([2.0, float("inf")]),
                                  torch.tensor([1.0, float("inf")]))["max_err"] == 1.0
    assert runner.compare_outputs(torch.ones(2), torch.ones(3))["max_err"] is None
    t = timing.time_fn(lambda: None, "cpu", min_time=0.001, max_reps=7)
    assert 3 <= t["n"] <= 7 and t["min_ms"] <= t["median_ms"]
    assert runner.peak_memory(lambda: torch.ones(1024, 1024), "cpu") in (None, 4 * 2 ** 20)


def test_cpu_timing_is_interleaved():
    """time_interleaved: one call of each impl in turn; each gets at least min_reps and at most
    max_reps calls; an impl whose call raises stops and is reported, the others go on."""
    order = []

    def impl(name, fail_at=None):
        def run():
            order.append(name)
            if fail_at is not None and order.count(name) == fail_at:
                raise RuntimeError(f"{name} broke")
        return run
    got = timing.time_interleaved({"a": impl("a"), "b": impl("b"), "c": impl("c", fail_at=2)},
                                  min_time=1.0, max_reps=5, min_reps=3)
    assert isinstance(got["c"], RuntimeError) and order.count("c") == 2
    assert got["a"]["n"] == got["b"]["n"] == 5  # min_time not reached: max_reps
    assert order[:6] == ["a", "b", "c", "a", "b", "c"] and order[6:] == ["a", "b"] * 3
    got = timing.time_interleaved({"x": lambda: None}, min_time=0.0, max_reps=50, min_reps=3)
    assert got["x"]["n"] == 3


def test_paired_ratios_pair_calls_of_the_same_round():
    """time_interleaved returns each impl's calls in round order; paired_ratios divides them
    round by round (over the rounds both ran), and the table prints their range."""
    clock = {"t": 0.0}
    cost = {"ours": [1.0, 2.0, 1.0, 4.0], "base": [3.0, 4.0, 2.0]}  # ms per call, in order

    def impl(name):
        def run():
            clock["t"] += cost[name].pop(0) / 1e3
        return run
    real = timing.time.perf_counter
    timing.time.perf_counter = lambda: clock["t"]
    try:
        got = timing.time_interleaved({"ours": impl("ours"), "base": impl("base")},
                                      min_time=0.0065, max_reps=4, min_reps=3)
    finally:
        timing.time.perf_counter = real
    assert got["ours"]["samples_ms"] == [1.0, 2.0, 1.0, 4.0] and got["base"]["samples_ms"] == [3.0, 4.0, 2.0]
    r = timing.paired_ratios(got["base"]["samples_ms"], got["ours"]["samples_ms"])
    assert r == {"median": 2.0, "q1": 2.0, "q3": 2.5, "min": 2.0, "max": 3.0, "n": 3}
    assert timing.paired_ratios([1.0, 2.0], [1.0, 1.0]) is None  # under 3 rounds
    result = {"name": "c", "ours": "ours", "baselines": ["base"], "impls": {
        "ours": {"median_ms": 1.5, "spread_pct": 0.0}, "base": {"median_ms": 3.0}},
        "speedup": {"base": 2.0}, "speedup_rounds": {"base": r}}
    assert runner.table_rows([result])[0]["speedup"] == "2.00x (2.00-2.50)"


def test_run_case_times_cpu_impls_round_robin():
    """The runner warms every impl up first (that call also gives the error column), then
    times them interleaved; an impl failing only in the timed calls gets its error."""
    calls = []

    def impl(name, fail_after=None):
        def run(x):
            calls.append(name)
            if fail_after is not None and calls.count(name) > fail_after:
                raise ValueError("late failure")
            return x["t"] * 2
        return run
    case = Case("toy", "interleaved", lambda: {"t": torch.ones(4)},
                {"ours": impl("ours"), "base": impl("base"), "flaky": impl("flaky", fail_after=2)},
                reference=lambda x: x["t"].double() * 2)
    r = runner.run_case(case, "cpu", None, min_time=10.0, max_reps=4)
    assert calls[:3] == ["ours", "base", "flaky"]  # the warm-up calls
    assert calls[3:6] == ["ours", "base", "flaky"]  # then one timed call of each in turn
    assert r["impls"]["ours"]["n"] == r["impls"]["base"]["n"] == 4
    assert r["impls"]["ours"]["max_err"] == 0.0
    assert "late failure" in r["impls"]["flaky"]["error"] and "median_ms" not in r["impls"]["flaky"]
    assert r["speedup"]["base"] > 0


def test_git_commit_only_of_this_checkout(monkeypatch, tmp_path):
    """An installed copy inside some other git repository (a venv in the user's project) reports
    no commit, not that repository's HEAD; a checkout of this project reports its own."""
    import shutil
    import subprocess

    from truthgpt_kernels.bench import report
    if shutil.which("git") is None:
        pytest.skip("no git")
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run(git + ["init", "-q", str(tmp_path)], check=True)
    pkg = tmp_path / "venv" / "site-packages" / "truthgpt_kernels" / "bench"
    pkg.mkdir(parents=True)
    (pkg / "report.py").write_text("")
    subprocess.run(git + ["-C", str(tmp_path), "add", "-A"], check=True)
    subprocess.run(git + ["-C", str(tmp_path), "commit", "-q", "-m", "x"], check=True)
    monkeypatch.setattr(report, "__file__", str(pkg / "report.py"))
    assert report._git_commit() is None
