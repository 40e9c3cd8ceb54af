"""The whole-model benchmark cases of bench/model.py (issue #14) on the quick sizes: the cases
and impls the table needs exist, ours and plain PyTorch are the same model (same loss, same
greedy tokens), and every impl runs. Speed is never asserted here."""
import math

import pytest
import torch

from truthgpt_kernels.bench import model as bench_model
from truthgpt_kernels.bench.model import DECODE_IMPLS, TRAIN_IMPLS

pytestmark = pytest.mark.usefixtures("one_thread")


def _by_name(quick):
    return {c.name: c for c in bench_model.cases("cpu", quick)}


def _initial_loss(x, key):
    """The loss at the setup's weights, without a step."""
    with torch.no_grad():
        if key == "ours":
            return x["ours"](x["tokens"], x["targets"], return_logits=False)[1].item()
        return x["plain"](x["tokens"], x["targets"])[1].item()


def _compiled_names(case):
    return [n for n in case.impls if n.endswith(" compiled")]


@pytest.mark.parametrize("quick", [True, False])
def test_issue_cases_and_impls(quick):
    cases = _by_name(quick)
    preset, (B, S), (P, N), (Bp, Sp) = ("tiny", (2, 32), (16, 16), (1, 128)) if quick else \
        ("small", (2, 1024), (128, 128), (1, 2048))
    for precision, dtype in (("fp32", "float32"), ("bf16 autocast", "bfloat16")):
        case = cases[f"train step {preset} B{B} S{S} {precision}"]
        assert tuple(case.impls) == TRAIN_IMPLS
        assert case.extra["dtype"] == dtype and case.extra["optimizer"] == "AdamW fused"
        assert not case.peak_memory  # the warm-up call of a compiled impl is the compilation
    peak = cases[f"train step {preset} B{Bp} S{Sp} fp32 peak memory"]
    assert tuple(peak.impls) == ("truthgpt", "torch sdpa") and peak.peak_memory
    for b in (1, 8):
        assert tuple(cases[f"decode {preset} B{b} prompt {P} +{N} tokens kv-cache"].impls) == DECODE_IMPLS
    # the cases that were there before stay
    assert any(n.startswith(f"generate {preset} 8 prompts") for n in cases)
    assert f"train step {preset} B{2 if quick else 1} S{64 if quick else 256} fp32" in cases


def test_train_case_models_are_equal_fp32():
    case = _by_name(True)["train step tiny B2 S32 fp32"]
    x = case.setup()
    ours, plain = _initial_loss(x, "ours"), _initial_loss(x, "plain")
    assert math.isfinite(ours) and abs(ours - plain) <= 1e-4 * abs(plain)


def test_eager_impls_run_once():
    """Every impl that is not compiled, once, on a fresh setup of each quick case."""
    for case in bench_model.cases("cpu", True):
        x = case.setup()
        outs = {n: impl(x) for n, impl in case.impls.items() if n not in _compiled_names(case)}
        if case.name.startswith("train step"):
            for n, loss in outs.items():
                assert loss.dim() == 0 and torch.isfinite(loss), (case.name, n)
        elif case.name.startswith("decode"):
            B, P = x["prompt"].shape
            ours, plain = outs["truthgpt"], outs["torch sdpa"]
            assert ours.shape == (B, P + x["new"]) and torch.equal(ours[:, :P], x["prompt"])
            assert torch.equal(ours, plain), case.name
            # a random tied-embedding model mostly repeats its last token, so equal tokens say
            # little: the logits on the prompt say that both are the same model
            with torch.no_grad():
                want = x["plain"](x["prompt"])
                torch.testing.assert_close(x["ours"](x["prompt"]), want, rtol=1e-4, atol=1e-4 * want.abs().max().item())
        else:
            assert len(outs["truthgpt batched (paged cache)"]) == len(x["prompts"])


@pytest.mark.slow
def test_compiled_impls_run_once():
    """The torch.compile impls (tens of seconds of compilation each): a compiled train step
    from the setup's weights returns the eager loss; compiled greedy decoding gives the eager
    tokens and does not recompile on a second call."""
    from torch._dynamo.utils import counters

    for case in bench_model.cases("cpu", True):
        compiled = _compiled_names(case)
        if not compiled:
            continue
        x = case.setup()
        if case.name.startswith("train step"):
            rtol = 1e-4 if case.extra["dtype"] == "float32" else 3e-2  # bf16: 8 mantissa bits
            want = _initial_loss(x, "plain")  # fp32, at the setup's weights
            for n in compiled:  # each the first step of its own model
                loss = x["run"][n](x).item()
                assert abs(loss - want) <= rtol * abs(want), (case.name, n, loss, want)
        else:
            eager = x["run"]["torch sdpa"](x)
            assert torch.equal(x["run"]["torch sdpa compiled"](x), eager), case.name
            graphs = counters["stats"]["unique_graphs"]
            assert torch.equal(x["run"]["torch sdpa compiled"](x), eager), case.name
            assert counters["stats"]["unique_graphs"] == graphs, f"{case.name}: recompiled"
            ours = x["run"]["truthgpt"](x)
            assert torch.equal(x["run"]["truthgpt compiled"](x), ours), case.name
            graphs = counters["stats"]["unique_graphs"]
            assert torch.equal(x["run"]["truthgpt compiled"](x), ours), case.name
            assert counters["stats"]["unique_graphs"] == graphs, f"{case.name}: ours recompiled"
