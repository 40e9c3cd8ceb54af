"""tk.explain: agrees with what actually runs, for every backend available here, for single
calls and for a model config; the CPU plan follows the extension's dispatch; bad input; CLI."""
import json

import pytest
import torch

import truthgpt_kernels as tk
from truthgpt_kernels import backends
from truthgpt_kernels.config import TransformerConfig
from truthgpt_kernels.explain import FAMILIES

AVAILABLE = [b for b in backends.BACKENDS if not backends.unavailable_reason(b)]
HAS_CPU = "cpu" in AVAILABLE
needs_cpu = pytest.mark.skipif(not HAS_CPU, reason="the C++ CPU extension is not built")


@pytest.fixture
def ran(monkeypatch):
    """Records (family, backend) of every kernel that actually runs."""
    seen = []
    real = backends.kernel

    def spy(family, name, which):
        seen.append((family, name))
        return real(family, name, which)

    monkeypatch.setattr(backends, "kernel", spy)
    return seen


def _calls(dtype):
    q, k = torch.randn(2, 4, 6, 16, dtype=dtype), torch.randn(2, 2, 6, 16, dtype=dtype)
    cos, sin = tk.rotary_cos_sin(8, 16)
    x = torch.randn(3, 32, dtype=dtype)
    return {
        "attention": (tk.attention, (q, k, k), dict(causal=True)),
        "apply_rotary_qk": (tk.apply_rotary_qk, (q, k, cos, sin), {}),
        "rms_norm": (tk.rms_norm, (x,), {}),
        "swiglu": (tk.swiglu, (x,), {}),
        "linear": (tk.linear, (x, torch.randn(5, 32, dtype=dtype)), {}),
    }


@pytest.mark.parametrize("backend", AVAILABLE + ["auto"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
def test_explain_agrees_with_what_runs(backend, dtype, ran):
    for op, (fn, args, kw) in _calls(dtype).items():
        (d,) = tk.explain(op, *args, backend=backend, **kw)
        ran.clear()
        try:
            fn(*args, backend=backend, **kw)
        except backends.BackendError as e:
            assert d.backend == "error" and str(e) in d.reason, (op, d)
            continue
        assert ran, op
        assert {name for _, name in ran} == {d.backend}, (op, backend, dtype, ran, d)
        assert d.family in FAMILIES and d.path
        if backend != "auto":
            assert d.requested == backend and "backend= argument" in d.reason


def test_use_backend_and_env_are_the_source(monkeypatch):
    x = torch.randn(3, 8)
    with tk.use_backend("reference"):
        (d,) = tk.explain("rms_norm", x)
    assert d.backend == "reference" and "use_backend('reference')" in d.reason
    monkeypatch.setenv(backends.ENV_VAR, "reference")
    (d,) = tk.explain("rms_norm", x)
    assert d.backend == "reference" and "TRUTHGPT_BACKEND=reference" in d.reason


@needs_cpu
def test_cpu_attention_plan_follows_the_extension(monkeypatch):
    q = torch.randn(1, 8, 1, 64)
    k = torch.randn(1, 2, 4096, 64)
    (decode,) = tk.explain("attention", q, k, k)
    assert decode.backend == "cpu" and "split-key decode" in decode.path, decode
    (prefill,) = tk.explain("attention", torch.randn(2, 4, 256, 64), torch.randn(2, 4, 256, 64),
                            torch.randn(2, 4, 256, 64), causal=True)
    assert "no key split" in prefill.path and "tiles 128x512" in prefill.path, prefill
    monkeypatch.setenv("TRUTHGPT_ATTN_SPLITK", "3")
    assert "(3 key splits)" in tk.explain("attention", q, k, k)[0].path
    monkeypatch.setenv("TRUTHGPT_CPU_ATTN", "portable")
    assert "portable tile GEMMs + portable rows" in tk.explain("attention", q, k, k)[0].path
    monkeypatch.setenv("TRUTHGPT_ATTN_BWD", "single")
    assert "backward: one pass per (batch, kv head)" in tk.explain("attention", q, k, k)[0].path
    # runs nothing: the plan of a huge problem is instant and allocates nothing of its size
    big = torch.empty(1, 1, 1, 128).expand(64, 32, 65536, 128)
    assert "work items" in tk.explain("attention", big, big, big)[0].path


def _model_ran(config, ran):
    model = tk.Transformer(config).eval()
    ran.clear()
    with torch.no_grad():
        model(torch.randint(0, config.vocab_size, (1, 12)))
    return {(f, b) for f, b in ran}


@pytest.mark.parametrize("kw", [dict(), dict(use_flash_attention=False), dict(position="alibi", ffn="mlp"),
                                dict(backend="reference"), dict(norm="layernorm", attention="sliding_window", window=4),
                                dict(ffn="geglu")],
                         ids=["default", "no-flash", "alibi-mlp", "reference", "layernorm-window", "geglu"])
def test_explain_config_agrees_with_the_model(kw, ran):
    config = TransformerConfig.preset("tiny", **kw)
    ex = tk.explain(config)
    explained = {(d.family, d.backend) for d in ex}
    assert _model_ran(config, ran) == explained, str(ex)
    ops = [d.op for d in ex]
    assert ops[:2] == ["attention", "attention (decode)"]
    assert ("rotary" in ops) == (config.position == "rope")
    assert ("rms_norm" in ops) == (config.norm == "rmsnorm")
    assert ("layer_norm" in ops) == (config.norm == "layernorm")
    assert ("geglu" in ops) == (config.ffn == "geglu")
    assert ("swiglu" in ops) == (config.ffn in ("swiglu", "moe"))
    if not config.use_flash_attention:
        assert ex[0].backend == "reference" and "use_flash_attention=False" in ex[0].reason


@pytest.mark.skipif("triton" not in AVAILABLE, reason="triton is not available here")
def test_explain_config_triton(ran):
    config = TransformerConfig.preset("tiny", backend="triton")
    ex = tk.explain(config)
    assert {d.backend for d in ex if d.family != "linear"} == {"triton"}  # tk.Linear: always auto
    assert _model_ran(config, ran) == {(d.family, d.backend) for d in ex}


@needs_cpu
def test_explain_model_and_sparse_config():
    model = tk.Transformer(TransformerConfig.preset("tiny"))
    assert tk.explain(model).backends["attention"] == "cpu"
    sparse = TransformerConfig.preset("tiny", attention="sparse", max_seq_len=128,
                                      sparsity={"layout": "local", "block_size": 32, "num_local_blocks": 2})
    ex = tk.explain(sparse, seq_len=128)
    assert ex[0].backend == "cpu" and "work items" in ex[0].path
    text = str(ex)
    assert "attention (decode)" in text and "why: auto" in text


def test_bad_input(tmp_path):
    x = torch.randn(2, 8)
    with pytest.raises(ValueError, match="op must be one of|neither an op name"):
        tk.explain("nope", x)
    with pytest.raises(ValueError, match="needs the op's input tensors"):
        tk.explain("rms_norm")
    with pytest.raises(ValueError, match="4-d q and k"):
        tk.explain("attention", x, x, x)
    with pytest.raises(TypeError, match="TransformerConfig"):
        tk.explain(42)
    with pytest.raises(ValueError, match="takes device="):
        tk.explain(TransformerConfig.preset("tiny"), x)
    with pytest.raises(ValueError, match="backend must be one of"):
        tk.explain("rms_norm", x, backend="fast")
    (d,) = tk.explain("rms_norm", x, backend="cuda")  # unavailable here: the call would raise
    if backends.unavailable_reason("cuda"):
        assert d.backend == "error" and "unavailable" in d.reason


def test_cli(capsys, tmp_path):
    from truthgpt_kernels.__main__ import main

    assert main(["explain", "--config", "configs/tiny.yaml"]) == 0
    out = capsys.readouterr().out
    assert "attention (decode)" in out and "rms_norm" in out and "why:" in out
    assert main(["explain", "--config", "configs/tiny.yaml", "--json", "--dtype", "bfloat16"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {r["dtype"] for r in rows} == {"bfloat16"} and rows[0]["op"] == "attention"
    assert main(["explain", "--config", "configs/tiny.yaml", "--json", "--dtype", "bf16"]) == 0  # bench's aliases
    assert {r["dtype"] for r in json.loads(capsys.readouterr().out)} == {"bfloat16"}
    for bad_dtype in ("int8", "bogus"):  # (a traceback / silently accepted before)
        assert main(["explain", "--config", "configs/tiny.yaml", "--dtype", bad_dtype]) == 2
        assert f"--dtype {bad_dtype!r} is not a float dtype" in capsys.readouterr().err
    assert main(["explain", "--config", str(tmp_path / "missing.yaml")]) == 2
    assert "not a file" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("d_model: -3\n")
    assert main(["explain", "--config", str(bad)]) == 2
