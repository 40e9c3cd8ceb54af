"""train(): metrics.jsonl, checkpoints written atomically, resume (bitwise the same losses as an
uninterrupted run), gradient accumulation, autocast, profiler trace, TensorBoard, the report
command, and bad --resume input."""
import json
import os
import sys

import pytest
import torch

from truthgpt_kernels import train as train_mod
from truthgpt_kernels.config import TransformerConfig
from truthgpt_kernels.modules import Transformer
from truthgpt_kernels.train import load_state, train


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(**kw):
    # dropout: the resumed run must also restore the global RNG to match
    kw.setdefault("dropout", 0.1)
    return TransformerConfig.preset("tiny", **kw)


COMMON = dict(batch_size=4, lr=3e-3, n_digits=3, seed=3, progress=False, evaluate=False, gemm_gflops=50.0)


class Killed(Exception):
    pass


def _kill_at(step):
    def callback(record):
        if record["step"] == step:
            raise Killed(step)
    return callback


def _read(path):
    with open(path) as fh:
        return [json.loads(line) for line in fh]


def _snapshot(d):
    return {name: open(os.path.join(d, name), "rb").read() for name in sorted(os.listdir(d))
            if os.path.isfile(os.path.join(d, name))}


@pytest.mark.parametrize("kw", [dict(), dict(grad_accum=2, autocast=True)], ids=["plain", "accum-autocast"])
def test_resume_after_kill_gives_bitwise_the_same_losses(tmp_path, kw):
    steps = 8
    _, full = train(tiny(), steps=steps, out=str(tmp_path / "full"), **COMMON, **kw)
    run = str(tmp_path / "run")
    with pytest.raises(Killed):  # dies after step 4; its last checkpoint holds 3 steps
        train(tiny(), steps=steps, out=run, save_every=3, callback=_kill_at(4), **COMMON, **kw)
    assert load_state(run)["step"] == 3
    assert [r["step"] for r in _read(os.path.join(run, "metrics.jsonl"))] == [0, 1, 2, 3, 4]
    _, resumed = train(tiny(), steps=steps, resume=run, save_every=3, **COMMON, **kw)
    assert resumed.start_step == 3
    assert resumed.losses == full.losses  # bitwise: same floats
    records = _read(os.path.join(run, "metrics.jsonl"))
    assert [r["step"] for r in records] == list(range(steps))
    assert [r["loss"] for r in records] == full.losses
    assert [r["grad_norm"] for r in records] == [r["grad_norm"] for r in full.metrics]
    # the final weights too
    a = train_mod.load_checkpoint(str(tmp_path / "full")).state_dict()
    b = train_mod.load_checkpoint(run).state_dict()
    assert all(torch.equal(a[n], b[n]) for n in a)


def test_metrics_jsonl_matches_the_result(tmp_path):
    out = str(tmp_path / "run")
    _, result = train(tiny(), steps=5, out=out, eval_every=2, **dict(COMMON, gemm_gflops=None))
    records = _read(os.path.join(out, "metrics.jsonl"))
    assert records == result.metrics
    assert [r["loss"] for r in records] == result.losses
    assert [r["step"] for r in records] == list(range(5))
    for r in records:
        assert set(r) >= {"step", "loss", "lr", "grad_norm", "tokens_per_s", "step_time_s", "peak_mem_mb", "mfu"}
        assert r["loss"] > 0 and r["lr"] > 0 and r["grad_norm"] > 0 and r["step_time_s"] > 0
        assert r["tokens_per_s"] == pytest.approx(4 * 7 / r["step_time_s"])  # batch 4 x (2n + 1) tokens
        assert r["peak_mem_mb"] > 0 and 0 < r["mfu"] < 1  # against the GEMM rate measured at the start
    assert [r["step"] for r in records if "eval" in r] == [1, 3]
    assert set(records[1]["eval"]) == {"digit_accuracy", "exact_match", "chance"}
    assert sorted(os.listdir(out)) == ["config.json", "metrics.jsonl", "model.safetensors", "train.json"]


def test_interrupted_checkpoint_write_keeps_the_previous_one(tmp_path, monkeypatch):
    run = str(tmp_path / "run")
    real_save = torch.save
    calls = []

    def failing_save(obj, f, *a, **k):
        calls.append(f)
        if len(calls) == 2:  # the second checkpoint: write half a file, then crash
            with open(f, "wb") as fh:
                fh.write(b"PK\x03\x04 half a checkpoint")
            raise OSError("simulated crash while writing")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(train_mod.torch, "save", failing_save)
    with pytest.raises(OSError, match="simulated crash"):
        train(tiny(), steps=6, out=run, save_every=2, **COMMON)
    monkeypatch.setattr(train_mod.torch, "save", real_save)
    assert load_state(run)["step"] == 2  # the previous checkpoint, intact
    assert not [n for n in os.listdir(run) if ".tmp-" in n]
    _, resumed = train(tiny(), steps=6, resume=run, save_every=2, **COMMON)
    _, full = train(tiny(), steps=6, **COMMON)
    assert resumed.losses == full.losses


def test_resume_bad_input_names_the_file_and_overwrites_nothing(tmp_path):
    run = str(tmp_path / "run")
    train(tiny(), steps=2, out=run, save_every=1, **COMMON)
    before = _snapshot(run)
    ckpt = os.path.join(run, "checkpoint.pt")
    with pytest.raises(ValueError) as e:
        train(tiny(d_model=32), steps=2, resume=run, **COMMON)
    assert ckpt in str(e.value) and "config.d_model: checkpoint 64, now 32" in str(e.value)
    with pytest.raises(ValueError, match=r"lr: checkpoint 0\.003, now 0\.1"):
        train(tiny(), steps=2, resume=run, **dict(COMMON, lr=0.1))
    assert _snapshot(run) == before
    with open(ckpt, "r+b") as fh:  # corrupt it
        fh.truncate(os.path.getsize(ckpt) // 2)
    before = _snapshot(run)
    with pytest.raises(ValueError, match="corrupted or not a checkpoint") as e:
        train(tiny(), steps=2, resume=run, **COMMON)
    assert ckpt in str(e.value)
    assert _snapshot(run) == before
    with pytest.raises(FileNotFoundError, match="does not exist"):
        train(tiny(), steps=2, resume=str(tmp_path / "nothing"), **COMMON)
    assert not os.path.exists(tmp_path / "nothing")


def test_profile_trace_names_our_ops(tmp_path):
    out = str(tmp_path / "run")
    train(tiny(), steps=3, out=out, profile=1, **COMMON)
    text = open(os.path.join(out, "trace.json")).read()
    trace = json.loads(text)
    names = {ev.get("name") for ev in trace["traceEvents"]}
    assert {"truthgpt::attention", "truthgpt::attention_backward", "truthgpt::rms_norm"} <= names


def test_tensorboard(tmp_path, monkeypatch):
    out = str(tmp_path / "run")
    try:
        import torch.utils.tensorboard  # noqa: F401
        have = True
    except ImportError:
        have = False
    if have:
        train(tiny(), steps=2, out=out, tensorboard=True, **COMMON)
        assert os.listdir(os.path.join(out, "tensorboard"))
        monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if not installed
    with pytest.raises(ValueError, match="needs the tensorboard package"):
        train(tiny(), steps=2, out=str(tmp_path / "tb2"), tensorboard=True, **COMMON)
    assert not os.path.exists(tmp_path / "tb2")


def test_fused_adamw_on_cpu():
    opt = train_mod._make_optimizer(Transformer(tiny()), 1e-3, 0.0, fused_ok=True)
    assert all(g["fused"] for g in opt.param_groups)


def test_bad_arguments(tmp_path):
    for kw in (dict(grad_accum=0), dict(save_every=-1), dict(grad_accum=3), dict(profile=1)):
        with pytest.raises(ValueError):
            train(tiny(), steps=2, **{**COMMON, **kw})


def test_cli_save_resume_and_report(tmp_path, capsys):
    from truthgpt_kernels.__main__ import main

    run = str(tmp_path / "run")
    args = ["train", "--config", "configs/tiny.yaml", "--steps", "4", "--batch-size", "4", "--no-progress",
            "--save-every", "2", "--grad-accum", "2", "--digits", "3"]
    assert main(args + ["--out", run]) == 0
    assert main(args + ["--resume", run]) == 0  # already finished: nothing more to do
    assert main(args[:-2] + ["--digits", "2", "--resume", run]) == 2
    assert "n_digits: checkpoint 3, now 2" in capsys.readouterr().err
    assert main(["report", run]) == 0
    out = capsys.readouterr().out
    assert "loss" in out and "tokens/s" in out
    try:
        import matplotlib  # noqa: F401
        assert os.path.getsize(os.path.join(run, "report.png")) > 1000
    except ImportError:
        assert "matplotlib is not installed" in out
    assert main(["report", str(tmp_path / "nothing")]) == 2
    assert "metrics.jsonl does not exist" in capsys.readouterr().err


def test_train_rejects_arguments_it_would_ignore():
    with pytest.raises(ValueError, match="parallel must be 'ddp' or 'fsdp'"):
        train(tiny(), steps=1, parallel="bogus", **COMMON)
    with pytest.raises(ValueError, match="seq_len sets the window of text data"):
        train(tiny(), steps=1, seq_len=32, **COMMON)
