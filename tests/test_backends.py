import pytest
import torch

import truthgpt_kernels as tk
from truthgpt_kernels import backends


def test_available_backends_reports_every_backend_with_reason():
    info = tk.available_backends()
    assert set(info) == set(backends.BACKENDS)
    assert info["reference"]["available"]
    for name, entry in info.items():
        assert isinstance(entry["reason"], str) and entry["reason"]
    if not torch.cuda.is_available():
        assert not info["cuda"]["available"]
        assert "CUDA" in info["cuda"]["reason"] or "_cuda" in info["cuda"]["reason"]


def test_selection_precedence(monkeypatch):
    x = torch.randn(4, 8)
    monkeypatch.setenv(backends.ENV_VAR, "reference")
    assert backends.select("swiglu", None, x) == "reference"
    with tk.use_backend("auto"):
        assert backends.select("swiglu", None, x) == backends.select("swiglu", "auto", x)
        assert backends.select("swiglu", "reference", x) == "reference"  # argument wins
    monkeypatch.delenv(backends.ENV_VAR)
    expected = "cpu" if tk.available_backends()["cpu"]["available"] else "reference"
    assert backends.select("swiglu", None, x) == expected


def test_auto_falls_back_to_reference_for_dtypes_the_cpu_kernels_lack(monkeypatch):
    if tk.available_backends()["cpu"]["available"]:  # float16 is a CPU kernel dtype (issue #19)
        assert backends.select("swiglu", "auto", torch.randn(2, dtype=torch.float16)) == "cpu"
    monkeypatch.setitem(backends.DTYPES, "cpu", (torch.float32,))
    backends._resolve.cache_clear()
    try:
        assert backends.select("swiglu", "auto", torch.randn(2, dtype=torch.float16)) == "reference"
    finally:
        backends._resolve.cache_clear()


def test_unknown_backend_names_the_choices(monkeypatch):
    with pytest.raises(ValueError, match="backend must be one of"):
        tk.swiglu(torch.randn(2, 4), backend="fast")
    with pytest.raises(ValueError, match="backend must be one of"):
        with tk.use_backend("gpu"):
            pass
    monkeypatch.setenv(backends.ENV_VAR, "nope")
    with pytest.raises(ValueError, match="got 'nope'"):
        tk.swiglu(torch.randn(2, 4))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU error")
def test_cuda_backend_on_cpu_tensors_says_why():
    with pytest.raises(tk.BackendError, match="backend 'cuda' is unavailable: .*"):
        tk.swiglu(torch.randn(2, 4), backend="cuda")


def test_backend_device_and_dtype_mismatch_errors(monkeypatch):
    if tk.available_backends()["cpu"]["available"]:
        monkeypatch.setitem(backends.DTYPES, "cpu", (torch.float32,))  # a dtype it would lack
        backends._resolve.cache_clear()
        try:
            with pytest.raises(tk.BackendError, match="takes .* got torch.float16"):
                tk.swiglu(torch.randn(2, 4, dtype=torch.float16), backend="cpu")
        finally:
            monkeypatch.undo()
            backends._resolve.cache_clear()
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # part of the cache key
    if not torch.cuda.is_available():
        with pytest.raises(tk.BackendError, match="triton.*TRITON_INTERPRET"):
            tk.swiglu(torch.randn(2, 4), backend="triton")


def test_backend_without_kernel_names_those_that_have_one(monkeypatch):
    monkeypatch.setattr(backends, "implements", lambda family, name: name == "reference")
    backends._resolve.cache_clear()
    with pytest.raises(tk.BackendError, match=r"has no swiglu kernel; backends with one here: \['reference'\]"):
        tk.swiglu(torch.randn(2, 4), backend="cpu")
