"""tk.linear against the float64 reference and F.linear, on every backend that has the kernel."""
import pytest
import torch
import torch.nn.functional as F

import truthgpt_kernels as tk
from truthgpt_kernels import backends

from ..helpers import CPU_ISAS, assert_close, backend_params, device_for

BACKENDS = backend_params("linear")
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
# (rows of x, K, N): 1..8 rows take the C++ kernel's own path (chunks of 4 rows, 8/4/3/2
# weight rows at a time, tails of both), more rows at::linear
SHAPES = [(1, 64, 50), (2, 7, 5), (3, 513, 97), (4, 1, 9), (5, 40, 3), (7, 96, 49), (8, 130, 200),
          (9, 64, 33), (33, 17, 11)]


def _case(shape, dtype, dev, bias=True, seed=0):
    M, K, N = shape
    g = torch.Generator().manual_seed(seed)
    x64, w64 = torch.randn(M, K, generator=g, dtype=torch.float64), torch.randn(N, K, generator=g, dtype=torch.float64)
    b64 = torch.randn(N, generator=g, dtype=torch.float64) if bias else None
    to = lambda t: None if t is None else t.to(dev, dtype)  # noqa: E731
    return (to(x64), to(w64), to(b64)), (x64.to(dev), w64.to(dev), None if b64 is None else b64.to(dev))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("bias", [False, True], ids=["no_bias", "bias"])
def test_linear_matches_reference(backend, shape, bias):
    dev = device_for(backend)
    for dtype in DTYPES:
        (x, w, b), (x64, w64, b64) = _case(shape, dtype, dev, bias)
        with torch.no_grad():
            out = tk.linear(x, w, b, backend=backend)
        assert_close(f"out[{dtype}]", out, F.linear(x64, w64, b64), F.linear(x, w, b))


@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_leading_dims_and_strides(backend):
    """x (B, S, K) and a non-contiguous x (rows strided) and weight (a transposed view)."""
    dev = device_for(backend)
    x = torch.randn(2, 3, 24, device=dev, dtype=torch.float64)[:, :, :20].float()  # contiguous rows
    xs = torch.randn(2, 40, device=dev)[:, ::2]                                     # inner stride 2
    w = torch.randn(20, 11, device=dev).t()                                         # (11, 20), strides (1, 20)
    with torch.no_grad():
        for inp in (x, xs):
            out = tk.linear(inp, w, backend=backend)
            assert out.shape == inp.shape[:-1] + (11,)
            assert_close("out", out, F.linear(inp.double(), w.double()), F.linear(inp, w))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(7,), (2, 3, 7), (2, 1, 3, 7), (2, 3, 0), (0, 4, 7)], ids=str)
def test_linear_no_grad_leading_dims(backend, shape):
    """Calls without autograd (decoding) take x (..., K) as it is, including K = 0 and no rows."""
    dev = device_for(backend)
    x = torch.randn(*shape, device=dev)
    w, b = torch.randn(5, shape[-1], device=dev), torch.randn(5, device=dev)
    with torch.no_grad():
        out = tk.linear(x, w, b, backend=backend)
    assert out.shape == shape[:-1] + (5,)
    assert_close("out", out, F.linear(x.double(), w.double(), b.double()), F.linear(x, w, b))


def test_linear_no_grad_goes_straight_to_the_cpu_kernel(monkeypatch):
    """No gradient to track on the CPU: one kernel call on x (..., K) as given (no reshape,
    custom-op dispatch or second validation pass in Python); with a gradient, the autograd path."""
    if backends.unavailable_reason("cpu"):
        pytest.skip(backends.unavailable_reason("cpu"))
    seen = []
    real = backends.kernel

    def spy(family, name, which):
        fn = real(family, name, which)
        return lambda *args: seen.append((family, name, which, args[0].shape)) or fn(*args)

    monkeypatch.setattr(backends, "kernel", spy)
    x, w = torch.randn(2, 3, 16), torch.randn(4, 16)
    with torch.no_grad():
        out = tk.linear(x, w)
    assert seen == [("linear", "cpu", "fwd", (2, 3, 16))]
    assert_close("out", out, F.linear(x.double(), w.double()), F.linear(x, w))
    seen.clear()
    xb = x.bfloat16().requires_grad_()
    tk.linear(xb, w.bfloat16()).sum().backward()  # own backward (bf16): custom op on (6, 16)
    assert [s[2:] for s in seen] == [("fwd", (6, 16)), ("bwd", (6, 4))]


@pytest.mark.parametrize("isa", CPU_ISAS)
def test_linear_cpu_instruction_sets(isa, monkeypatch):
    """Every instruction-set path of the C++ kernel (TRUTHGPT_CPU_ISA caps it; a path the CPU
    lacks falls back to the next one down)."""
    if backends.unavailable_reason("cpu"):
        pytest.skip(backends.unavailable_reason("cpu"))
    monkeypatch.setenv("TRUTHGPT_CPU_ISA", isa)
    for shape in [(1, 67, 21), (4, 64, 17), (8, 33, 50)]:
        for dtype in DTYPES:
            (x, w, b), (x64, w64, b64) = _case(shape, dtype, "cpu")
            out = torch.ops.truthgpt.linear_fwd(x, w, b)
            assert_close(f"{isa} {shape} {dtype}", out, F.linear(x64, w64, b64), F.linear(x, w, b))


def test_linear_float32_gradients_are_f_linear(monkeypatch):
    """With a gradient to track, float32 tk.linear is F.linear where the CPU GEMM engine is
    torch's BLAS: the same values and gradients."""
    monkeypatch.setenv("TRUTHGPT_CPU_GEMM", "blas")
    (x, w, b), _ = _case((3, 16, 5), torch.float32, "cpu")
    leaves = [t.clone().requires_grad_() for t in (x, w, b)]
    base = [t.clone().requires_grad_() for t in (x, w, b)]
    out = tk.linear(*leaves)
    ref = F.linear(*base)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    dy = torch.randn_like(out)
    out.backward(dy)
    ref.backward(dy)
    for a, r in zip(leaves, base):
        torch.testing.assert_close(a.grad, r.grad, rtol=0, atol=0)


def _cpu_ops_run(fn):
    """The names of the CPU ops fn() ran (torch.profiler), and fn's result."""
    from torch.profiler import profile
    with profile() as prof:
        out = fn()
    return {e.key for e in prof.key_averages()}, out


@pytest.mark.parametrize("engine", ["blas", "onednn"])
def test_linear_float32_gemm_engines(monkeypatch, engine):
    """float32 GEMMs (more than 8 rows) through each engine of csrc/cpu/gemm_engine.h, forced by
    TRUTHGPT_CPU_GEMM: forward and the three gradients against float64, strided operands too;
    the forced engine is the one that runs, and with oneDNN the gradients are tk.linear's own."""
    if backends.unavailable_reason("cpu"):
        pytest.skip(backends.unavailable_reason("cpu"))
    if engine == "onednn" and not torch.backends.mkldnn.is_available():
        pytest.skip("torch built without oneDNN")
    monkeypatch.setenv("TRUTHGPT_CPU_GEMM", engine)
    f32 = torch.float32
    # (64, 8, 200), (300, 40, 1000): dweight = grad^T x computed as (x^T grad)^T
    # (csrc/cpu/gemm_engine.cpp); (1000, 300, 70): grad^T transposed by 16 x 16 blocks before
    # oneDNN; sizes not multiples of 16 leave partial blocks
    for shape in [(9, 64, 33), (33, 17, 11), (130, 96, 200), (64, 8, 200), (300, 40, 1000), (1000, 300, 70)]:
        for bias in (False, True):
            (x, w, b), (x64, w64, b64) = _case(shape, f32, "cpu", bias)
            ran, out = _cpu_ops_run(lambda: tk.linear(x, w, b))
            assert ("mkldnn::_linear_pointwise" in ran) == (engine == "onednn"), ran
            assert_close(f"out[{engine} {shape} bias={bias}]", out, F.linear(x64, w64, b64), F.linear(x, w, b))
            dy64 = torch.randn(shape[0], shape[2], dtype=torch.float64)
            leaves = [None if t is None else t.clone().requires_grad_() for t in (x, w, b)]
            base_leaves = [None if t is None else t.clone().requires_grad_() for t in (x, w, b)]
            ours, g_ours = _grads(tk.linear, leaves, dy64.float())
            own = "linear" in type(ours.grad_fn).__name__.lower() or "view" in type(ours.grad_fn).__name__.lower()
            assert own == (engine == "onednn"), type(ours.grad_fn).__name__
            base, g_base = _grads(F.linear, base_leaves, dy64.float())
            ref, g_ref = _grads(F.linear, [None if t is None else t.clone().requires_grad_() for t in (x64, w64, b64)], dy64)
            for name, a, r, bb in zip(("dx", "dweight", "dbias"), g_ours, g_ref, g_base):
                if r is not None:
                    assert_close(f"{name}[{engine} {shape} bias={bias}]", a, r, bb)
    # strided operands: x with inner stride 2, weight a transposed view, grad a transposed view
    x = torch.randn(40, 96)[:, ::2]
    w = torch.randn(48, 30).t()
    gy = torch.randn(30, 40).t()
    dx, dw, db = torch.ops.truthgpt.linear_bwd(gy, x, w, True, True, True)
    x64, w64, g64 = x.double(), w.double(), gy.double()
    assert_close(f"strided out[{engine}]", tk.linear(x, w), F.linear(x64, w64), F.linear(x, w))
    assert_close(f"strided dx[{engine}]", dx, g64 @ w64, gy @ w)
    assert_close(f"strided dw[{engine}]", dw, g64.t() @ x64, gy.t() @ x)
    assert_close(f"strided db[{engine}]", db, g64.sum(0), gy.sum(0))
    # a strided and an expanded (stride-0) bias: oneDNN reads a bias as dense memory (it used to
    # get the view's storage: wrong values, and reads past a 1-element storage)
    x = torch.randn(40, 32)
    w = torch.randn(48, 32)
    for b in (torch.randn(48, 2)[:, 0], torch.tensor(0.5).expand(48)):
        assert not b.is_contiguous()
        torch.testing.assert_close(tk.linear(x, w, b), F.linear(x, w, b))
        torch.testing.assert_close(tk.linear(x.bfloat16(), w.bfloat16(), b.bfloat16()),
                                   F.linear(x.bfloat16(), w.bfloat16(), b.bfloat16()), rtol=2e-2, atol=5e-2)


def test_linear_exports_with_dynamic_rows():
    """torch.export / compile(dynamic=True) keep tk.linear's row count symbolic (torch.Size.numel
    specialised it: exporting a model with a dynamic sequence length failed)."""
    w = torch.randn(16, 8)

    class M(torch.nn.Module):
        def forward(self, x):
            return tk.linear(x, w)
    S = torch.export.Dim("S", min=2, max=64)
    ep = torch.export.export(M(), (torch.randn(2, 10, 8),), dynamic_shapes={"x": {1: S}})
    x = torch.randn(2, 23, 8)
    torch.testing.assert_close(ep.module()(x), F.linear(x, w))


def test_linear_gemm_engine_choice(monkeypatch):
    """TRUTHGPT_CPU_GEMM unset: the engine is the calibration's, biased towards the expected
    winner (Intel CPUs: oneDNN only where it measured at least 1.2x torch's BLAS; others, where
    MKL runs generic code: BLAS only where it measured at least 1.2x oneDNN); the attention
    kernel's auto GEMMs follow it on Intel CPUs and are ours elsewhere; tk.explain reports it;
    an unknown value is an error naming the variable."""
    if backends.unavailable_reason("cpu"):
        pytest.skip(backends.unavailable_reason("cpu"))
    import re
    monkeypatch.delenv("TRUTHGPT_CPU_GEMM", raising=False)
    monkeypatch.delenv("TRUTHGPT_CPU_ATTN", raising=False)
    info = torch.ops.truthgpt_info
    desc, onednn, intel = info.cpu_gemm(), info.cpu_gemm_onednn(), info.cpu_is_intel()
    assert desc.startswith("oneDNN") == onednn, desc
    nums = re.search(r"BLAS (\d+), oneDNN (\d+)", desc)
    if nums:  # (whole GFLOP/s printed: +-2 for the rounding)
        blas, dnn = int(nums.group(1)), int(nums.group(2))
        if intel:
            assert (dnn + 2 >= 1.2 * blas) if onednn else (dnn <= 1.2 * blas + 2), desc
        else:
            assert (blas <= 1.2 * dnn + 2) if onednn else (blas + 2 >= 1.2 * dnn), desc
    if nums and (onednn or not intel):
        assert "AVX-512 tile GEMMs" in info.cpu_path("attention", torch.float32)
    if nums and not intel and "avx512bf16" in info.cpu_path("rms_norm", torch.bfloat16):
        assert "AVX512-BF16 tile GEMMs" in info.cpu_path("attention", torch.bfloat16)
    assert desc in info.cpu_path("linear", torch.float32)
    monkeypatch.setenv("TRUTHGPT_CPU_ATTN", "mkl")
    path = info.cpu_path("attention", torch.float32)
    assert "MKL tile GEMMs" in path or "AVX-512" in path  # (a torch without MKL: ours)
    monkeypatch.setenv("TRUTHGPT_CPU_GEMM", "blas")
    assert not info.cpu_gemm_onednn() and info.cpu_gemm().startswith("torch BLAS")
    monkeypatch.setenv("TRUTHGPT_CPU_GEMM", "fastest")
    with pytest.raises(RuntimeError, match="TRUTHGPT_CPU_GEMM must be auto, blas or onednn"):
        tk.linear(torch.randn(20, 8), torch.randn(4, 8))


def _grads(fn, leaves, dy):
    out = fn(*leaves)
    out.backward(dy)
    return out, [None if t is None or t.grad is None else t.grad for t in leaves]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(1, 64, 50), (9, 64, 33), (33, 17, 11), (70, 513, 97)], ids=str)
@pytest.mark.parametrize("trainable", ["all", "weight_only", "x_only"])
def test_linear_gradients_match_reference(backend, shape, trainable):
    """Values and gradients in every dtype against float64 F.linear (bfloat16 / float16 on the
    CPU take tk.linear's own backward, float32 F.linear's); a frozen weight (x_only) or frozen
    input (weight_only) gets no gradient."""
    dev = device_for(backend)
    for dtype in DTYPES:
        for bias in (False, True):
            (x, w, b), (x64, w64, b64) = _case(shape, dtype, dev, bias)
            want = {"all": (True, True, True), "weight_only": (False, True, True),
                    "x_only": (True, False, False)}[trainable]
            mk = lambda ts: [None if t is None else t.clone().requires_grad_(r) for t, r in zip(ts, want)]  # noqa: E731
            dy64 = torch.randn(shape[0], shape[2], dtype=torch.float64, device=dev)
            ours, g_ours = _grads(lambda *a: tk.linear(*a, backend=backend), mk((x, w, b)), dy64.to(dtype))
            base, g_base = _grads(F.linear, mk((x, w, b)), dy64.to(dtype))
            ref, g_ref = _grads(F.linear, mk((x64, w64, b64)), dy64)
            assert_close(f"out[{dtype}]", ours, ref, base)
            for name, a, r, bb in zip(("dx", "dweight", "dbias"), g_ours, g_ref, g_base):
                assert (a is None) == (r is None), f"{name}[{dtype}, {trainable}]: gradient presence differs"
                if a is not None:
                    assert_close(f"{name}[{dtype}, bias={bias}]", a, r, bb)


@pytest.mark.parametrize("backend", [p for p in BACKENDS if p.values[0] in ("cpu", "reference")])
def test_linear_op_gradcheck(backend):
    """The op's own autograd (the path of bfloat16 / float16 on the CPU), to second order."""
    g = torch.Generator().manual_seed(3)
    args = [torch.randn(s, generator=g, dtype=torch.float64).requires_grad_() for s in ((7, 9), (5, 9), (5,))]
    fn = lambda x, w, b: torch.ops.truthgpt.linear(x, w, b, backend)  # noqa: E731
    assert torch.autograd.gradcheck(fn, args)
    assert torch.autograd.gradgradcheck(fn, args)
    # without a bias, and with only some inputs tracked
    assert torch.autograd.gradgradcheck(lambda x, w: torch.ops.truthgpt.linear(x, w, None, backend), args[:2])
    assert torch.autograd.gradcheck(lambda w: torch.ops.truthgpt.linear(args[0].detach(), w, None, backend), args[1:2])


def test_linear_low_precision_backward_is_own():
    """bfloat16 / float16 on the CPU: the gradients come from truthgpt::linear_backward, whose C++
    kernel computes in float32 where torch's GEMM for the dtype is slow; both kernels agree
    with the float64 reference as well as torch's own GEMM in that dtype does."""
    if backends.unavailable_reason("cpu"):
        pytest.skip(backends.unavailable_reason("cpu"))
    for dtype in (torch.bfloat16, torch.float16):
        (x, w, b), (x64, w64, b64) = _case((40, 96, 72), dtype, "cpu")
        out = tk.linear(x.requires_grad_(), w, b)
        names = []
        node = out.grad_fn
        while node is not None:
            names.append(type(node).__name__)
            node = node.next_functions[0][0] if node.next_functions else None
        assert any("linear" in n.lower() and "Addmm" not in n for n in names), names
        dy = torch.randn(40, 72, dtype=dtype)
        dx, dw, db = torch.ops.truthgpt.linear_bwd(dy, x.detach(), w, True, True, True)
        assert_close(f"dx[{dtype}]", dx, dy.double() @ w64, dy @ w)
        assert_close(f"dw[{dtype}]", dw, dy.double().t() @ x64, dy.t() @ x.detach())
        assert_close(f"db[{dtype}]", db, dy.double().sum(0), dy.sum(0))
        none = torch.ops.truthgpt.linear_bwd(dy, x.detach(), w, False, True, False)
        assert none[0].numel() == 0 and none[2].numel() == 0 and none[1].shape == w.shape


@pytest.mark.skipif(torch.ops.mkldnn._is_mkldnn_bf16_supported(),
                    reason="torch has a fast bfloat16 GEMM on this CPU: tk.linear uses it")
def test_linear_bf16_gemms_run_in_float32_under_autocast():
    """On a CPU where torch's bfloat16 GEMM is slow, every GEMM of a bf16-autocast Linear's
    forward and backward runs on float32 operands (autocast, still on around the kernel, must
    not cast them back)."""
    if backends.unavailable_reason("cpu"):
        pytest.skip(backends.unavailable_reason("cpu"))
    from torch.profiler import profile
    lin = tk.modules.Linear(64, 48)
    x = torch.randn(3, 20, 64, requires_grad=True)
    with profile(record_shapes=True) as prof:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = lin(x)
        out.float().sum().backward()
    assert out.dtype == torch.bfloat16 and x.grad is not None and lin.weight.grad is not None
    gemms = [(e.name(), e.dtypes()[:2]) for e in prof.profiler.kineto_results.events()
             if e.name() in ("aten::mm", "aten::addmm")]
    # forward addmm (bias), backward dx and dweight
    assert len(gemms) == 3 and all(d == ["float", "float"] for _, d in gemms), gemms


def test_linear_compiled_bf16_training_matches_eager():
    """torch.compile of a bfloat16 Linear's forward and backward (the op with its autograd in
    the graph) gives eager's values and gradients."""
    torch.manual_seed(0)
    lin = tk.modules.Linear(32, 24).to(torch.bfloat16)
    x = torch.randn(2, 5, 32, dtype=torch.bfloat16)
    grads = []
    for fn in (lin, torch.compile(lin, backend="aot_eager", fullgraph=True)):
        lin.zero_grad()
        xx = x.clone().requires_grad_()
        out = fn(xx)
        out.float().square().sum().backward()
        grads.append((out, xx.grad, lin.weight.grad, lin.bias.grad))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_linear_autocast_dtype_like_f_linear():
    (x, w, b), (x64, w64, b64) = _case((2, 32, 7), torch.float32, "cpu")
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out, base = tk.linear(x, w, b), F.linear(x, w, b)
    assert out.dtype == base.dtype == torch.bfloat16
    assert_close("out", out, F.linear(x64, w64, b64), base)


def test_linear_module_is_nn_linear():
    """tk.Linear keeps nn.Linear's parameters and state dict, and its output."""
    torch.manual_seed(0)
    ref = torch.nn.Linear(12, 6)
    ours = tk.modules.Linear(12, 6)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(1, 2, 12)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x))
    assert isinstance(ours, torch.nn.Linear) and list(ours.state_dict()) == list(ref.state_dict())


@pytest.mark.parametrize("backend", [p for p in BACKENDS if p.values[0] in ("cpu", "reference")])
def test_linear_opcheck(backend):
    (x, w, b), _ = _case((3, 8, 5), torch.float32, "cpu")
    torch.library.opcheck(torch.ops.truthgpt.linear.default, (x, w, b, backend))
    dy = torch.randn(3, 5)
    torch.library.opcheck(torch.ops.truthgpt.linear_backward.default, (dy, x, w, True, True, True, backend))
    torch.library.opcheck(torch.ops.truthgpt.linear_backward.default, (dy, x, w, False, True, False, backend))
    if backend == "cpu":
        torch.library.opcheck(torch.ops.truthgpt.linear_fwd.default, (x, w, b))
        torch.library.opcheck(torch.ops.truthgpt.linear_fwd.default, (x.view(3, 1, x.shape[-1]), w, b))
        torch.library.opcheck(torch.ops.truthgpt.linear_bwd.default, (dy, x, w, True, True, True))


BAD = [
    ("x rank", lambda x, w, b: (x[0, 0], w, b), ValueError, "x must have"),
    ("weight rank", lambda x, w, b: (x, w[0], b), ValueError, "weight must have 2 dimensions"),
    ("weight K", lambda x, w, b: (x, w[:, :-1], b), ValueError, r"weight must have shape \(\*, 8\)"),
    ("bias shape", lambda x, w, b: (x, w, b[:-1]), ValueError, r"bias must have shape \(5\)"),
    ("dtype", lambda x, w, b: (x, w.double(), b), TypeError, "weight must have the dtype of x"),
    ("int x", lambda x, w, b: (x.long(), w, b), TypeError, "x must have dtype"),
    ("weight type", lambda x, w, b: (x, w.tolist(), b), TypeError, "weight must be a torch.Tensor"),
    ("bias dtype", lambda x, w, b: (x, w, b.double()), TypeError, "bias must have the dtype of x"),
    ("bias type", lambda x, w, b: (x, w, b.tolist()), TypeError, "bias must be a torch.Tensor"),
    ("x rank 9", lambda x, w, b: (x.view(3, *[1] * 7, 8), w, b), ValueError, "x must have"),
]


@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
def test_linear_bad_input(case):
    _, change, exc, match = case
    (x, w, b), _ = _case((3, 8, 5), torch.float32, "cpu")
    with pytest.raises(exc, match=match):
        tk.linear(*change(x, w, b))
