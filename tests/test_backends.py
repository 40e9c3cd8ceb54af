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
    # ... and which backends could serve the call (README, Backend selection)
    cpu = ["cpu"] if tk.available_backends()["cpu"]["available"] else []
    with pytest.raises(tk.BackendError, match=r"backends that can serve this call: \[.*'reference'\]") as e:
        tk.swiglu(torch.randn(2, 4), backend="cuda")
    assert all(f"'{b}'" in str(e.value) for b in cpu)


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
    with pytest.raises(tk.BackendError, match=r"has no swiglu kernel; backends that can serve this call: \['reference'\]"):
        tk.swiglu(torch.randn(2, 4), backend="cpu")


# ---------------------------------------------------------------- eager fast path (backends.apply)
def _linear_op():
    import importlib
    return importlib.import_module("truthgpt_kernels.ops.linear").linear_op


def _train_grads(monkeypatch, fast, backend, dtype):
    """Loss and gradients of one tiny-model step, with the eager fast path on or off."""
    from truthgpt_kernels.config import TransformerConfig
    from truthgpt_kernels.modules import Transformer
    if not fast:
        monkeypatch.setattr(backends, "_plain_eager", lambda args: False)
    torch.manual_seed(0)
    cfg = TransformerConfig.preset("tiny", backend=backend, dtype=dtype)
    model = Transformer(cfg)
    tokens = torch.randint(0, cfg.vocab_size, (2, 12))
    _, loss = model(tokens, tokens.roll(-1, 1), return_logits=False)
    loss.backward()
    monkeypatch.undo()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("backend,dtype", [("cpu", "float32"), ("cpu", "bfloat16"), ("reference", "float64")])
def test_eager_fast_path_gives_the_custom_ops_results(monkeypatch, backend, dtype):
    """The same kernels run either way: loss and every gradient bit-identical."""
    if not tk.available_backends()[backend]["available"]:
        pytest.skip(tk.available_backends()[backend]["reason"])
    loss_fast, grads_fast = _train_grads(monkeypatch, True, backend, dtype)
    loss_op, grads_op = _train_grads(monkeypatch, False, backend, dtype)
    assert torch.equal(loss_fast, loss_op)
    assert grads_fast.keys() == grads_op.keys()
    for name in grads_op:
        assert torch.equal(grads_fast[name], grads_op[name]), name


def test_eager_fast_path_is_taken_only_in_plain_eager_mode():
    from torch.utils._python_dispatch import TorchDispatchMode
    op = _linear_op()
    x = torch.randn(3, 8, requires_grad=True)
    w = torch.randn(5, 8, requires_grad=True)
    fast = backends._formulas(op)
    if not fast:
        pytest.skip("this torch's CustomOpDef does not expose its implementation")
    def node(y):  # the op's autograd node (under the output's view)
        n = y.grad_fn
        while not n.name().startswith("GeneratedBackwardFor"):
            n = n.next_functions[0][0]
        return n

    y = tk.linear(x, w, backend="reference")
    assert node(y)._forward_cls is fast.function
    # the node is named as the custom op's own
    assert node(y).name() == "GeneratedBackwardFor_truthgpt_linear_defaultBackward"

    class Passthrough(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    with Passthrough():  # a dispatch mode must see the op itself
        y2 = tk.linear(x, w, backend="reference")
    assert node(y2)._forward_cls is not fast.function
    assert node(y2).name() == node(y).name()
    with torch.profiler.profile() as prof:  # so must a profile, which names the ops
        tk.linear(x, w, backend="reference").sum().backward()
    assert "truthgpt::linear" in {e.key for e in prof.key_averages()}


def test_eager_fast_path_keeps_double_backward():
    """create_graph through the fast path: the backward op's own formulas (linear's double
    backward), checked numerically in float64."""
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda a, b: tk.linear(a, b, backend="reference"), (x, w))


@pytest.mark.parametrize("archs,cc,ok", [
    ("8.0;9.0+PTX", (8, 0), True), ("8.0;9.0+PTX", (8, 6), True), ("8.0;9.0+PTX", (8, 9), True),
    ("8.0;9.0+PTX", (9, 0), True), ("8.0;9.0+PTX", (10, 0), True), ("8.0;9.0+PTX", (12, 0), True),
    ("8.0;9.0+PTX", (7, 5), False), ("8.0;9.0", (10, 0), False), ("8.0;9.0", (12, 0), False),
    ("9.0", (8, 0), False), ("9.0", (9, 0), True), ("8.6", (8, 0), False), ("", (8, 0), True)])
def test_cuda_backend_needs_code_for_the_gpu(archs, cc, ok):
    """"auto" must not pick a _cuda build without code for the GPU (SASS runs within its major
    version, PTX on newer GPUs; sm_80 at least): it would fail every launch ("no kernel image")
    instead of falling back to Triton."""
    reason = backends.cuda_arch_reason(f"archs={archs}" if archs else "", cc)
    assert (reason == "") == ok, reason
    if not ok:
        assert f"{cc[0]}.{cc[1]}" in reason


def test_auto_sends_big_head_dims_to_triton_where_cuda_shared_memory_is_short(monkeypatch):
    """sm_86 / sm_89 / sm_120 allow 99 KiB of shared memory per block, the CUDA attention tiles for
    head dims above 128 need up to 160 KiB: "auto" then picks Triton (where it is available); an
    explicit backend="cuda" is kept; sm_80 / sm_90 keep CUDA."""
    monkeypatch.setattr(backends, "select", lambda family, backend, q: "cuda" if backend in (None, "cuda") else backend)
    monkeypatch.setattr(backends, "unavailable_reason", lambda b: "")
    monkeypatch.setattr(backends, "implements", lambda family, b: True)
    for optin, big in ((99 * 1024, "triton"), (227 * 1024, "cuda"), (163 * 1024, "cuda")):
        monkeypatch.setattr(backends, "_smem_optin", lambda device, optin=optin: optin)
        for family in ("attention", "attention_varlen", "attention_with_kvcache"):
            assert backends.select_attention(family, None, torch.empty(1, 2, 3, 256)) == big
            assert backends.select_attention(family, None, torch.empty(1, 2, 3, 192)) == big
            assert backends.select_attention(family, None, torch.empty(1, 2, 3, 128)) == "cuda"
            assert backends.select_attention(family, "cuda", torch.empty(1, 2, 3, 256)) == "cuda"
    monkeypatch.setattr(backends, "_smem_optin", lambda device: 99 * 1024)
    monkeypatch.setattr(backends, "unavailable_reason", lambda b: "triton is not installed" if b == "triton" else "")
    assert backends.select_attention("attention", None, torch.empty(1, 2, 3, 256)) == "cuda"
    assert backends.cuda_attention_fits(256, 160 * 1024) and not backends.cuda_attention_fits(256, 99 * 1024)
