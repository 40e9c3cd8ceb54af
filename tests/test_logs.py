"""Logging: INFO names the backend and kernel path once per distinct call key, nothing on
cached calls, the slow-path warnings fire once, TRUTHGPT_LOG_LEVEL, and torch.compile."""
import logging
import os
import subprocess
import sys

import pytest
import torch

import truthgpt_kernels as tk
from truthgpt_kernels import backends, logs
from truthgpt_kernels.explain import kernel_path

HAS_CPU = not backends.unavailable_reason("cpu")
needs_cpu = pytest.mark.skipif(not HAS_CPU, reason="the C++ CPU extension is not built")


@pytest.fixture(autouse=True)
def _fresh():
    """Each test sees uncached backend choices and no once-only messages logged yet."""
    backends._resolve.cache_clear()
    logs.reset_once()
    yield
    backends._resolve.cache_clear()
    logs.reset_once()


def _records(caplog, level=logging.INFO, name="truthgpt_kernels"):
    return [r for r in caplog.records if r.levelno == level and r.name.startswith(name)]


@needs_cpu
def test_info_names_backend_and_path_once_per_key(caplog):
    caplog.set_level(logging.INFO, logger="truthgpt_kernels")
    x = torch.randn(4, 32)
    tk.rms_norm(x)
    tk.rms_norm(x)  # same (family, device, dtype, requested): no second record
    recs = _records(caplog)
    assert len(recs) == 1, [r.getMessage() for r in recs]
    msg = recs[0].getMessage()
    assert recs[0].name == "truthgpt_kernels.backends"
    assert "rms_norm on cpu float32 (requested auto): backend cpu" in msg
    assert kernel_path("rms_norm", "cpu", "cpu", torch.float32) in msg and "vector kernels" in msg
    tk.rms_norm(x.double())                 # another dtype
    tk.rms_norm(x, backend="reference")     # another requested backend
    msgs = [r.getMessage() for r in _records(caplog)]
    assert len(msgs) == 3
    assert "rms_norm on cpu float64 (requested auto): backend cpu" in msgs[1]
    assert "(requested reference): backend reference, PyTorch reference" in msgs[2]


@needs_cpu
def test_info_attention_path_comes_from_the_extension(caplog, monkeypatch):
    caplog.set_level(logging.INFO, logger="truthgpt_kernels")
    q = torch.randn(1, 2, 8, 16)
    tk.attention(q, q, q, causal=True)
    (rec,) = _records(caplog)
    assert "attention on cpu float32 (requested auto): backend cpu, C++ CPU " in rec.getMessage()
    assert "tile GEMMs + " in rec.getMessage() and "rows" in rec.getMessage()
    # the path follows the extension's own dispatch knob
    monkeypatch.setenv("TRUTHGPT_CPU_ATTN", "portable")
    assert "portable tile GEMMs + portable rows" in kernel_path("attention", "cpu", "cpu", torch.float32)


@needs_cpu
def test_auto_skip_reason_and_reference_warning_once(caplog, monkeypatch, request):
    caplog.set_level(logging.INFO, logger="truthgpt_kernels")
    # a dtype the cpu backend does not take (float16 is taken since #19: take it away here)
    monkeypatch.setitem(backends.DTYPES, "cpu", tuple(d for d in backends.DTYPES["cpu"] if d != torch.float16))
    backends._resolve.cache_clear()
    request.addfinalizer(backends._resolve.cache_clear)  # after monkeypatch's undo: float16 again
    x = torch.randn(4, 32, dtype=torch.float16)
    tk.swiglu(x)
    tk.swiglu(x)
    info = [r.getMessage() for r in _records(caplog)]
    assert len(info) == 1 and "backend reference" in info[0]
    assert "auto skipped cpu: does not take float16" in info[0]
    warns = [r.getMessage() for r in _records(caplog, logging.WARNING)]
    assert len(warns) == 1 and "runs the PyTorch reference" in warns[0]


def test_silent_at_default_level(caplog):
    caplog.set_level(logging.WARNING, logger="truthgpt_kernels")
    x = torch.randn(4, 32)
    tk.rms_norm(x)
    q = torch.randn(1, 2, 8, 16)
    tk.attention(q, q, q)
    assert [r for r in caplog.records if r.name.startswith("truthgpt_kernels")] == []


def test_cached_calls_do_no_logging_work(monkeypatch):
    """The per-call cost: once a choice is cached, the logging code is never reached."""
    calls = []
    real = logs.backend_chosen
    monkeypatch.setattr(logs, "backend_chosen", lambda *a: calls.append(a) or real(*a))
    x = torch.randn(4, 32)
    for _ in range(5):
        tk.rms_norm(x)
    assert len(calls) == 1


def test_multihead_fallback_warns_once(caplog):
    caplog.set_level(logging.WARNING, logger="truthgpt_kernels")
    mha = tk.MultiheadAttention(16, 2, batch_first=True).eval()
    x = torch.randn(2, 5, 16)
    mha(x, x, x)                        # need_weights=True (torch's default): torch's implementation
    mha(x, x, x)
    mha(x, x, x, need_weights=False)    # the fast path: no warning
    warns = [r.getMessage() for r in _records(caplog, logging.WARNING)]
    assert len(warns) == 1, warns
    assert "MultiheadAttention runs torch's implementation" in warns[0] and "need_weights=True" in warns[0]


@pytest.mark.skipif(backends.unavailable_reason("triton") != "" or not backends.triton_interpreted(),
                    reason="needs triton under TRITON_INTERPRET=1")
def test_triton_interpreter_warns_once(caplog):
    caplog.set_level(logging.WARNING, logger="truthgpt_kernels")
    x = torch.randn(4, 32)
    tk.rms_norm(x, backend="triton")
    tk.rms_norm(x, backend="triton")
    tk.swiglu(x, backend="triton")
    warns = [r.getMessage() for r in _records(caplog, logging.WARNING)]
    assert len(warns) == 1 and "under the interpreter" in warns[0], warns


def test_hf_sdpa_fallback_warns_once(caplog):
    pytest.importorskip("transformers")
    from truthgpt_kernels.integrations.hf import attention_forward

    class Module(torch.nn.Module):
        is_causal = True
        num_key_value_groups = 1

    caplog.set_level(logging.WARNING, logger="truthgpt_kernels")
    q = torch.randn(1, 2, 4, 8)
    mod = Module().eval()
    for _ in range(2):  # output_attentions: the sdpa function serves it
        try:
            attention_forward(mod, q, q, q, None, output_attentions=True)
        except Exception:  # sdpa's own handling of the flag is not under test here
            pass
    out, _ = attention_forward(mod, q, q, q, None)  # servable: no warning
    warns = [r.getMessage() for r in _records(caplog, logging.WARNING)]
    assert len(warns) == 1 and "fell back to the implementation it replaced" in warns[0], warns


def test_warn_once_is_skipped_while_compiling(caplog):
    caplog.set_level(logging.WARNING, logger="truthgpt_kernels")

    def f(x):
        logs.warn_once("test-key", "inside compiled code")
        return x * 2

    torch._dynamo.reset()
    out = torch.compile(f, fullgraph=True, backend="eager")(torch.ones(3))
    assert torch.equal(out, torch.full((3,), 2.0))
    assert _records(caplog, logging.WARNING) == []
    f(torch.ones(3))  # eager: warns
    assert len(_records(caplog, logging.WARNING)) == 1


def test_choice_logged_under_compile_without_graph_break(caplog):
    """The first resolution may happen while torch.compile traces: still logged, no break."""
    caplog.set_level(logging.INFO, logger="truthgpt_kernels")
    torch._dynamo.reset()
    x, w = torch.randn(4, 32), torch.randn(32)
    out = torch.compile(lambda x, w: tk.rms_norm(x, w), fullgraph=True, backend="eager")(x, w)
    torch.testing.assert_close(out, tk.rms_norm(x, w))
    assert len([r for r in _records(caplog) if "rms_norm on cpu float32" in r.getMessage()]) == 1


def _run(env_level):
    env = dict(os.environ)
    env.pop(logs.ENV_VAR, None)
    if env_level is not None:
        env[logs.ENV_VAR] = env_level
    code = "import torch, truthgpt_kernels as tk; tk.rms_norm(torch.randn(2, 8))"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)


def test_env_level():
    quiet, loud = _run(None), _run("info")
    assert quiet.returncode == 0 and loud.returncode == 0, quiet.stderr + loud.stderr
    assert "truthgpt_kernels" not in quiet.stderr
    assert "truthgpt_kernels.backends INFO: rms_norm on cpu float32 (requested auto): backend" in loud.stderr
    bad = _run("loud")
    assert bad.returncode != 0 and "TRUTHGPT_LOG_LEVEL must be a logging level" in bad.stderr


def test_log_level_is_not_a_config_field():
    from truthgpt_kernels.config import TransformerConfig
    assert TransformerConfig.env_overrides(environ={logs.ENV_VAR: "INFO"}) == {}
