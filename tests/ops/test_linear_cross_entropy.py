"""tk.linear_cross_entropy on every backend against the float64 reference (logits materialised)
and against plain PyTorch in the same dtype: forward, gradients to x, weight and bias, every
reduction, label smoothing, z-loss, softcap, chunking, ignored rows; gradcheck, opcheck, bad
inputs.

Tolerances: DESIGN.md's rule (error against float64 <= 2x the same-dtype PyTorch error + atol).
The float64 reference is evaluated on the inputs rounded to the tested dtype, so the error
measures the computation only. bfloat16: the kernels compute the logits with float32
accumulation and keep them in float32 (PyTorch rounds them to bfloat16; so does the CPU kernel
where torch's bfloat16 GEMMs are fast), so their error is mostly the final rounding of each
output to bfloat16; atol is the ATOL of tests/helpers.py. Mixed precision (bfloat16 x, float32
weight) is checked against plain PyTorch under autocast."""
import math

import pytest
import torch
import torch.nn.functional as F

import truthgpt_kernels as tk
from truthgpt_kernels import backends
from truthgpt_kernels.ops import reference

from ..helpers import assert_close, backend_params, device_for, leaf
from .interpreter import bf16_rounding_known

FAMILY = "linear_cross_entropy"
BACKENDS = backend_params(FAMILY)


def _cpu_built():
    return not backends.unavailable_reason("cpu") and backends.implements(FAMILY, "cpu")


def _dtypes(backend):
    return [torch.float32, torch.bfloat16] + ([torch.float64] if backend in ("cpu", "reference") else [])


def _make(N, d, V, dev, *, bias=True, ignore_frac=0.25, scale=3.0):
    """float64 inputs: logits of a few units (so softmax is neither flat nor one-hot)."""
    x = torch.randn(N, d, dtype=torch.float64, device=dev)
    w = torch.randn(V, d, dtype=torch.float64, device=dev) * (scale / math.sqrt(d))
    b = torch.randn(V, dtype=torch.float64, device=dev) if bias else None
    t = torch.randint(0, V, (N,), device=dev)
    t[torch.rand(N, device=dev) < ignore_frac] = -100
    return x, w, b, t


def _torch_same_dtype(x, w, b, t, reduction, label_smoothing, z_loss, softcap):
    """What plain PyTorch computes in the inputs' dtype (Liger's test baseline for z-loss and
    softcap): materialised logits, F.cross_entropy, z_loss * logsumexp^2 per counted row."""
    logits = F.linear(x, w, b)
    if softcap > 0:
        logits = softcap * torch.tanh(logits / softcap)
    if z_loss == 0:
        return F.cross_entropy(logits, t, reduction=reduction, label_smoothing=label_smoothing)
    valid = t != -100
    rows = F.cross_entropy(logits, t, reduction="none", label_smoothing=label_smoothing)
    rows = rows + torch.where(valid, z_loss * torch.logsumexp(logits, -1) ** 2, 0.0)
    if reduction == "none":
        return rows
    return rows.sum() / (valid.sum() if reduction == "mean" else 1)


def _check(backend, dtype, inputs, *, reduction="mean", label_smoothing=0.0, z_loss=0.0,
           softcap=0.0, chunk_size=None, name=""):
    x64, w64, b64, t = (None if v is None else (v.to(dtype).double() if v.is_floating_point() else v)
                        for v in inputs)
    opts = dict(reduction=reduction, label_smoothing=label_smoothing, z_loss=z_loss)
    x, w = leaf(x64, dtype), leaf(w64, dtype)
    b = None if b64 is None else leaf(b64, dtype)
    loss = tk.linear_cross_entropy(x, w, t, bias=b, logit_softcap=softcap, chunk_size=chunk_size,
                                   backend=backend, **opts)
    gy64 = torch.randn(loss.shape, dtype=torch.float64, device=x.device) + 0.5
    rx, rw = leaf(x64), leaf(w64)
    rb = None if b64 is None else leaf(b64)
    ref = reference.linear_cross_entropy(rx, rw, t, rb, logit_softcap=softcap, **opts)
    bx, bw = leaf(x64, dtype), leaf(w64, dtype)
    bb = None if b64 is None else leaf(b64, dtype)
    base = _torch_same_dtype(bx, bw, bb, t, softcap=softcap, **opts)
    tag = f"{name}[{backend} {dtype} {reduction} ls={label_smoothing} z={z_loss} cap={softcap}]"
    assert_close("loss" + tag, loss, ref, base)
    if not ref.requires_grad or not torch.isfinite(ref).all():
        return
    for out, gy in ((loss, gy64.to(dtype)), (ref, gy64), (base, gy64.to(dtype))):
        out.backward(gy)
    assert_close("dx" + tag, x.grad, rx.grad, bx.grad)
    assert_close("dweight" + tag, w.grad, rw.grad, bw.grad)
    if b is not None:
        assert_close("dbias" + tag, b.grad, rb.grad, bb.grad)


CASES = {  # name: ((N, d, V), bias, options)
    "chunked": ((17, 32, 203), True, dict(chunk_size=4)),
    "one_row_d1": ((1, 1, 37), False, {}),
    "smoothing": ((9, 16, 50), True, dict(label_smoothing=0.1, chunk_size=2)),
    "z_loss": ((12, 24, 96), False, dict(z_loss=0.05, chunk_size=5)),
    "softcap": ((11, 20, 77), True, dict(logit_softcap=4.0, chunk_size=3)),
    "all_options": ((13, 24, 130), True, dict(label_smoothing=0.2, z_loss=0.01, logit_softcap=5.0,
                                              chunk_size=6)),
    "one_chunk_wide": ((6, 40, 1000), True, dict(label_smoothing=0.05)),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_matches_reference(backend, case, reduction):
    (N, d, V), bias, opts = CASES[case]
    opts = dict(opts)
    softcap = opts.pop("logit_softcap", 0.0)
    inputs = _make(N, d, V, device_for(backend), bias=bias)
    for dtype in _dtypes(backend):
        _check(backend, dtype, inputs, reduction=reduction, softcap=softcap, name=case, **opts)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_rows_ignored(backend, reduction):
    """As F.cross_entropy: mean over no rows is nan, sum is 0, gradients are 0."""
    dev = device_for(backend)
    x = torch.randn(5, 8, device=dev, requires_grad=True)
    w = torch.randn(20, 8, device=dev, requires_grad=True)
    t = torch.full((5,), -100, device=dev)
    loss = tk.linear_cross_entropy(x, w, t, reduction=reduction, label_smoothing=0.1, z_loss=0.1,
                                   backend=backend)
    expected = F.cross_entropy(F.linear(x, w), t, reduction=reduction, label_smoothing=0.1)
    torch.testing.assert_close(loss, expected, equal_nan=True)
    loss.sum().backward()
    assert torch.equal(x.grad, torch.zeros_like(x)) and torch.equal(w.grad, torch.zeros_like(w))


@pytest.mark.parametrize("backend", BACKENDS)
def test_custom_ignore_index_and_no_rows(backend):
    dev = device_for(backend)
    x64, w64, b64, t = _make(10, 12, 30, dev)
    t = torch.where(t == -100, 7, t)  # 7 is the ignored class here
    ours = tk.linear_cross_entropy(x64.float(), w64.float(), t, ignore_index=7, backend=backend)
    ref = reference.linear_cross_entropy(x64, w64, t, ignore_index=7)
    assert_close("loss", ours, ref, F.cross_entropy(F.linear(x64.float(), w64.float()), t, ignore_index=7))
    empty = tk.linear_cross_entropy(x64.float()[:0], w64.float(), t[:0], reduction="sum", backend=backend)
    assert empty.item() == 0.0
    # an empty batch still gets its (0, d) gradient and a zero dweight, as in PyTorch
    x, w = leaf(x64[:0], torch.float32), leaf(w64, torch.float32)
    tk.linear_cross_entropy(x, w, t[:0], reduction="sum", backend=backend).backward()
    assert x.grad is not None and x.grad.shape == (0, 12)
    assert torch.equal(w.grad, torch.zeros_like(w))


@pytest.mark.parametrize("backend", BACKENDS)
def test_z_loss_term_returned(backend):
    """return_z_loss=True: (loss, z_loss_term) as Liger, the term reduced like the loss and
    already part of the loss (no gradient flows through it)."""
    dev = device_for(backend)
    x64, w64, b64, t = _make(14, 16, 60, dev)
    for reduction in ("mean", "sum", "none"):
        x = leaf(x64, torch.float32)
        loss, z = tk.linear_cross_entropy(x, w64.float(), t, bias=b64.float(), z_loss=0.02,
                                          reduction=reduction, return_z_loss=True, backend=backend)
        rl, rz = reference.linear_cross_entropy(x64, w64, t, b64, z_loss=0.02, reduction=reduction,
                                                return_z_loss=True)
        assert_close(f"loss[{reduction}]", loss, rl, rl.float())
        assert_close(f"z[{reduction}]", z, rz, rz.float())
        assert not z.requires_grad
        valid = t != -100
        lse = torch.logsumexp(F.linear(x64, w64, b64), -1)
        expected = torch.where(valid, 0.02 * lse ** 2, 0.0)
        expected = {"none": expected, "sum": expected.sum(), "mean": expected.sum() / valid.sum()}[reduction]
        torch.testing.assert_close(rz, expected)


@pytest.mark.parametrize("backend", BACKENDS)
def test_chunking_is_invisible_and_deterministic(backend):
    """Every chunk size gives the same result up to float32 rounding; a given one is bitwise
    reproducible."""
    dev = device_for(backend)
    x64, w64, b64, t = _make(23, 16, 90, dev)
    outs = {}
    for chunk in (1, 4, 7, 23, None):
        x, w, b = leaf(x64, torch.float32), leaf(w64, torch.float32), leaf(b64, torch.float32)
        runs = []
        for _ in range(2):
            loss = tk.linear_cross_entropy(x, w, t, bias=b, chunk_size=chunk, label_smoothing=0.1,
                                           backend=backend)
            runs.append((loss.detach(),) + torch.autograd.grad(loss, (x, w, b)))
        assert all(torch.equal(p, q) for p, q in zip(*runs)), f"chunk {chunk}: not deterministic"
        outs[chunk] = runs[0]
    for chunk, out in outs.items():
        for name, p, q in zip(("loss", "dx", "dw", "db"), out, outs[None]):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=f"{name} chunk {chunk}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_grad_output_scaling_and_retain_graph(backend):
    """Backward scales the saved gradients by grad_output; with grad_output 1 (returned
    without a copy) a retained graph's second backward still adds the same gradient."""
    dev = device_for(backend)
    x64, w64, b64, t = _make(9, 8, 40, dev)
    x, w = leaf(x64, torch.float32), leaf(w64, torch.float32)
    loss = tk.linear_cross_entropy(x, w, t, backend=backend)
    loss.backward(retain_graph=True)
    first = (x.grad.clone(), w.grad.clone())
    loss.backward(retain_graph=True)
    torch.testing.assert_close(x.grad, 2 * first[0])
    torch.testing.assert_close(w.grad, 2 * first[1])
    gx, gw = torch.autograd.grad(3 * loss, (x, w))
    torch.testing.assert_close(gx, 3 * first[0])
    torch.testing.assert_close(gw, 3 * first[1])


@pytest.mark.parametrize("backend", BACKENDS)
def test_frozen_weight_and_no_grad(backend):
    """Only x requires grad (a frozen LM head): dx right, no weight gradient; under no_grad
    the loss alone."""
    dev = device_for(backend)
    x64, w64, b64, t = _make(10, 8, 33, dev)
    x = leaf(x64, torch.float32)
    w = w64.float()
    loss = tk.linear_cross_entropy(x, w, t, bias=b64.float(), backend=backend)
    loss.backward()
    rx = leaf(x64)
    reference.linear_cross_entropy(rx, w64.float().double(), t, b64.float().double()).backward()
    torch.testing.assert_close(x.grad.double(), rx.grad, rtol=1e-4, atol=1e-6)
    with torch.no_grad():
        again = tk.linear_cross_entropy(x, w, t, bias=b64.float(), backend=backend)
    assert torch.equal(again, loss.detach())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_mixed_precision_master_weight(backend, reduction, dtype):
    """bfloat16 / float16 x with a float32 weight and bias (autocast's master weights): GEMMs in
    x's dtype, loss, dweight and dbias in float32, against plain PyTorch under autocast (F.linear
    in x's dtype, F.cross_entropy in float32) and the float64 reference on the weight and bias
    rounded to x's dtype (as F.linear under autocast rounds them)."""
    dev = device_for(backend)
    x64, w64, b64, t = _make(29, 40, 333, dev)
    x64, w64, b64 = x64.to(dtype).double(), w64.float().double(), b64.float().double()
    opts = dict(reduction=reduction, label_smoothing=0.1, z_loss=0.01)
    x, w, b = leaf(x64, dtype), leaf(w64, torch.float32), leaf(b64, torch.float32)
    loss = tk.linear_cross_entropy(x, w, t, bias=b, chunk_size=7, backend=backend, **opts)
    assert loss.dtype == torch.float32
    rx, rw, rb = leaf(x64), leaf(w64.to(dtype).double()), leaf(b64.to(dtype).double())
    ref = reference.linear_cross_entropy(rx, rw, t, rb, **opts)
    bx, bw, bb = leaf(x64, dtype), leaf(w64, torch.float32), leaf(b64, torch.float32)
    with torch.autocast(dev, dtype=dtype):
        base = _torch_same_dtype(bx, bw, bb, t, softcap=0.0, **opts)
    assert_close(f"loss[{backend} mixed]", loss, ref, base)
    gy64 = torch.randn(loss.shape, dtype=torch.float64, device=x.device) + 0.5
    for out, gy in ((loss, gy64.float()), (ref, gy64), (base, gy64.float())):
        out.backward(gy)
    assert w.grad.dtype == b.grad.dtype == torch.float32 and x.grad.dtype == dtype
    assert_close(f"dx[{backend} mixed]", x.grad, rx.grad, bx.grad)
    assert_close(f"dweight[{backend} mixed]", w.grad, rw.grad, bw.grad)
    assert_close(f"dbias[{backend} mixed]", b.grad, rb.grad, bb.grad)


@pytest.mark.parametrize("backend", BACKENDS)
def test_autocast_converts_x(backend):
    """Under autocast, float32 x and weight run as bfloat16 x with the float32 weight."""
    dev = device_for(backend)
    x64, w64, _, t = _make(10, 16, 50, dev, bias=False)
    results = []
    for auto in (True, False):
        x, w = leaf(x64, torch.float32), leaf(w64, torch.float32)
        with torch.autocast(dev, dtype=torch.bfloat16, enabled=auto):
            xin = x if auto else x.bfloat16()
            loss = tk.linear_cross_entropy(xin, w, t, chunk_size=3, backend=backend)
        loss.backward()
        results.append((loss, x.grad, w.grad))
    for p, q in zip(*results):
        assert p.dtype == q.dtype == torch.float32
        torch.testing.assert_close(p, q, rtol=0, atol=0)


def test_cpu_weight_blocks_upcast():
    """bfloat16 on the CPU: W is converted to float32 in blocks of 16 MiB (a V x d weight of
    more than that takes several blocks, the last one partial)."""
    if not _cpu_built():
        pytest.skip("C++ CPU extension not built")
    inputs = _make(5, 64, 70001, "cpu", ignore_frac=0.0)
    _check("cpu", torch.bfloat16, inputs, label_smoothing=0.1, z_loss=0.01, name="blocks")


@pytest.mark.parametrize("isa", ["portable", "avx2", "avx512"])
def test_cpu_instruction_sets(isa, monkeypatch):
    if not _cpu_built():
        pytest.skip("C++ CPU extension not built")
    monkeypatch.setenv("TRUTHGPT_CPU_ISA", isa)
    inputs = _make(7, 12, 45, "cpu")
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        _check("cpu", dtype, inputs, label_smoothing=0.1, z_loss=0.01, softcap=3.0, chunk_size=3,
               name=isa)


@pytest.mark.parametrize("engine", ["blas", "onednn"])
def test_cpu_gemm_engines(engine, monkeypatch):
    """The chunk GEMMs through each float32 engine of csrc/cpu/gemm_engine.h (TRUTHGPT_CPU_GEMM):
    torch's BLAS (mm_out / addmm_ in place) or oneDNN (results copied / added in)."""
    if not _cpu_built():
        pytest.skip("C++ CPU extension not built")
    if engine == "onednn" and not torch.backends.mkldnn.is_available():
        pytest.skip("torch built without oneDNN")
    monkeypatch.setenv("TRUTHGPT_CPU_GEMM", engine)
    inputs = _make(37, 48, 300, "cpu")
    for dtype in (torch.float32, torch.bfloat16):
        _check("cpu", dtype, inputs, label_smoothing=0.1, z_loss=0.01, chunk_size=8, name=engine)
    from torch.profiler import profile
    x, w, _, t = (None if v is None else (v.float() if v.is_floating_point() else v) for v in inputs)
    with profile() as prof:
        tk.linear_cross_entropy(x.requires_grad_(), w.requires_grad_(), t, backend="cpu").backward()
    ran = {e.key for e in prof.key_averages()}
    assert ("mkldnn::_linear_pointwise" in ran) == (engine == "onednn"), ran


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_gradcheck_cpu(reduction):
    if not _cpu_built():
        pytest.skip("C++ CPU extension not built")
    x64, w64, b64, t = _make(6, 5, 11, "cpu")
    x, w, b = leaf(x64), leaf(w64), leaf(b64)

    def fn(x, w, b):
        return tk.linear_cross_entropy(x, w, t, bias=b, reduction=reduction, label_smoothing=0.1,
                                       z_loss=0.05, logit_softcap=2.0, chunk_size=4, backend="cpu")
    assert torch.autograd.gradcheck(fn, (x, w, b))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", [1, 0])  # mean, none
def test_opcheck(backend, reduction):
    dev = device_for(backend)
    x64, w64, b64, t = _make(6, 8, 20, dev)
    x, w, b = leaf(x64, torch.float32), leaf(w64, torch.float32), leaf(b64, torch.float32)
    for fp32_loss in (False, True):
        args = (x, w, b, t, -100, reduction, 0.1, 0.01, 3.0, True, True, 4, backend, fp32_loss)
        torch.library.opcheck(torch.ops.truthgpt.linear_cross_entropy.default, args)


@pytest.mark.parametrize("backend", [b for b in ("cpu", "reference") if not backends.unavailable_reason(b)])
@pytest.mark.parametrize("autocast", [False, True])
def test_compile_fullgraph(backend, autocast):
    """Compiled == eager, also under bf16 autocast (the mixed-precision path: x converted)."""
    torch._dynamo.reset()
    x64, w64, b64, t = _make(8, 8, 30, "cpu")

    def fn(x, w, b):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            return tk.linear_cross_entropy(x, w, t, bias=b, label_smoothing=0.1, z_loss=0.01,
                                           backend=backend)
    results = []
    for f in (fn, torch.compile(fn, fullgraph=True)):
        x, w, b = leaf(x64, torch.float32), leaf(w64, torch.float32), leaf(b64, torch.float32)
        loss = f(x, w, b)
        results.append((loss,) + torch.autograd.grad(2 * loss, (x, w, b)))
    for p, q in zip(*results):
        torch.testing.assert_close(p, q)


def test_bad_inputs():
    x, w, t = torch.randn(4, 8), torch.randn(10, 8), torch.randint(0, 10, (4,))
    lce = tk.linear_cross_entropy
    with pytest.raises(ValueError, match="x must have 2 dimensions"):
        lce(x[None], w, t)
    with pytest.raises(ValueError, match=r"weight must have shape \(V, 8\)"):
        lce(x, torch.randn(10, 7), t)
    with pytest.raises(TypeError, match="weight must have the dtype of x"):
        lce(x, w.double(), t)
    with pytest.raises(TypeError, match="target must have dtype int64"):
        lce(x, w, t.int())
    with pytest.raises(ValueError, match=r"target must have shape \(4,\)"):
        lce(x, w, t[:3])
    with pytest.raises(ValueError, match=r"bias must have shape \(10\)"):
        lce(x, w, t, bias=torch.randn(9))
    with pytest.raises(TypeError, match="bias must have the dtype of weight"):
        lce(x, w, t, bias=torch.randn(10, dtype=torch.float64))
    with pytest.raises(TypeError, match="weight must have the dtype of x"):  # only float32 mixes
        lce(x.bfloat16(), w.double(), t)
    with pytest.raises(TypeError, match="weight must have the dtype of x"):
        lce(x, w.bfloat16(), t)
    with pytest.raises(TypeError, match="bias must have the dtype of weight"):
        lce(x.bfloat16(), w, t, bias=torch.randn(10, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="reduction must be one of"):
        lce(x, w, t, reduction="avg")
    with pytest.raises(ValueError, match="label_smoothing must be"):
        lce(x, w, t, label_smoothing=-0.1)
    with pytest.raises(ValueError, match="label_smoothing must be in"):
        lce(x, w, t, label_smoothing=1.5)
    with pytest.raises(ValueError, match="z_loss must be >= 0"):
        lce(x, w, t, z_loss=-1.0)
    with pytest.raises(ValueError, match="logit_softcap must be finite"):
        lce(x, w, t, logit_softcap=float("inf"))
    with pytest.raises(ValueError, match="chunk_size must be >= 1"):
        lce(x, w, t, chunk_size=0)
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        lce(x.tolist(), w, t)
    with pytest.raises(ValueError, match="x must have at least one feature"):
        lce(x[:, :0], w[:, :0], t)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_float32_loss_of_low_precision_x(backend, dtype):
    """loss_dtype=torch.float32 (what the HF patch asks for, as ForCausalLMLoss upcasts the
    logits): the float32 row losses reduced in float32, never rounded to x's dtype; the
    gradients are those of the default call, bit for bit."""
    if dtype == torch.float16 and backend == "triton":
        pytest.skip("triton runs bfloat16 and float32")
    dev = device_for(backend)
    x64, w64, _, t = _make(40, 16, 90, dev, bias=False)
    results = {}
    for loss_dtype in (None, torch.float32):
        x, w = leaf(x64, dtype), leaf(w64, dtype)
        for reduction in ("none", "sum", "mean"):
            loss = tk.linear_cross_entropy(x, w, t, reduction=reduction, z_loss=0.01,
                                           loss_dtype=loss_dtype, backend=backend)
            results[loss_dtype, reduction] = loss
        loss.backward()
        results[loss_dtype, "grads"] = (x.grad, w.grad)
    rows, valid = results[torch.float32, "none"], t != -100
    for reduction in ("none", "sum", "mean"):
        low, high = results[None, reduction], results[torch.float32, reduction]
        assert low.dtype == dtype and high.dtype == torch.float32, (low.dtype, high.dtype)
        torch.testing.assert_close(high.to(dtype), low, rtol=0, atol=0)  # low = high rounded once
    # the reductions of the float32 rows in float32 (a bfloat16 sum would be ~0.4% off)
    torch.testing.assert_close(results[torch.float32, "sum"], rows.sum(), rtol=1e-6, atol=0)
    torch.testing.assert_close(results[torch.float32, "mean"], rows.sum() / valid.sum(), rtol=1e-6, atol=0)
    for g_low, g_high in zip(results[None, "grads"], results[torch.float32, "grads"]):
        torch.testing.assert_close(g_high, g_low, rtol=0, atol=0)
    with pytest.raises(TypeError, match="loss_dtype must be None"):
        tk.linear_cross_entropy(x, w, t, loss_dtype=torch.float16, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_target_out_of_range(backend):
    """Checked inside the op (a data-dependent check torch.compile does not trace), before
    any kernel runs; the message names target, the value and its position."""
    dev = device_for(backend)
    x, w = torch.randn(4, 8, device=dev), torch.randn(10, 8, device=dev)
    for bad in (10, -1, -101):
        t = torch.tensor([1, 2, bad, 3], device=dev)
        with pytest.raises(ValueError, match=rf"target must hold class indices in \[0, 10\).*got {bad} at position 2"):
            tk.linear_cross_entropy(x, w, t, backend=backend)
        with pytest.raises(ValueError, match="target must hold class indices"):
            tk.linear_cross_entropy(x.requires_grad_(), w, t, reduction="none", backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_finite_inputs_like_pytorch(backend):
    """A NaN in x, the weight or the bias: NaN in the loss and in exactly the gradients where
    PyTorch has them (the CPU kernel's vector exp turned a NaN logit into 0, so its gradients
    stayed finite); a -inf bias on a class (a class masked out of the softmax): a finite loss
    equal to PyTorch's (0 * -inf in the unused label-smoothing term made it NaN)."""
    dev = device_for(backend)
    g = torch.Generator().manual_seed(0)
    N, d, V = 5, 67, 50
    x = torch.randn(N, d, generator=g, dtype=torch.float64).to(dev)
    w = torch.randn(V, d, generator=g, dtype=torch.float64).to(dev)
    b = torch.randn(V, generator=g, dtype=torch.float64).to(dev)
    t = torch.tensor([32, 18, 49, 41, 22], device=dev)

    def run(fn, xs, dtype, **kw):
        ls = [leaf(v, dtype) for v in xs]
        loss = fn(*ls, **kw)
        loss.sum().backward()
        return loss.detach(), [v.grad for v in ls]

    def ours(x, w, b, **kw):
        return tk.linear_cross_entropy(x, w, t, bias=b, backend=backend, **kw)

    def theirs(x, w, b, **kw):
        return F.cross_entropy(F.linear(x, w, b), t, **kw)

    nan, ninf = float("nan"), float("-inf")
    cases = {"x": (0, (0, 3), nan), "weight": (1, (0, 0), nan), "bias": (2, (0,), nan),
             "bias -inf": (2, (26,), ninf)}
    for dtype in _dtypes(backend):
        for name, (which, idx, val) in cases.items():
            xs = [x.clone(), w.clone(), b.clone()]
            xs[which][idx] = val
            for kw in ({}, {"reduction": "none"}, {"label_smoothing": 0.1}):
                got_loss, got = run(ours, xs, dtype, **kw)
                ref_loss, ref = run(theirs, [v.to(dtype) for v in xs], torch.float64, **kw)
                where = f"[{dtype} {name} {kw}]"
                # (bfloat16: the logits and their gradient rounded to bfloat16 on the way; the
                # point here is which values are NaN, and the finite ones staying right)
                tol = dict(rtol=5e-2, atol=8e-2) if dtype == torch.bfloat16 else dict(rtol=1e-4, atol=1e-5)
                torch.testing.assert_close(got_loss.double(), ref_loss, **tol,
                                           equal_nan=True, msg=lambda m: where + " loss: " + m)
                for gname, a, r in zip(("dx", "dweight", "dbias"), got, ref):
                    assert torch.equal(a.isnan(), r.isnan()), (where, gname, a.isnan().sum(), r.isnan().sum())
                    fin = r.isfinite()
                    torch.testing.assert_close(a.double()[fin], r[fin], **tol,
                                               msg=lambda m: f"{where} {gname}: {m}")


def _check_against_torch(torch_loss, ours, inputs64, dtype, backend, tag):
    """ours = (loss, x, weight, bias) (leaves of dtype, loss not yet backpropagated): loss and the
    three gradients against torch_loss(x, weight, bias, dt) run in float64 (the reference) and in
    dtype (the baseline of the tolerance rule), all from the same random grad_output."""
    loss, x, w, b = ours
    gy = torch.randn(loss.shape, dtype=torch.float64, device=loss.device) + 0.5
    ins = {}
    for name, dt in (("ref", torch.float64), ("base", dtype)):
        rx, rw, rb = (leaf(v.to(dtype).to(dt)) for v in inputs64)
        out = torch_loss(rx, rw, rb, dt)
        out.backward(gy.to(dt))
        ins[name] = (out, rx.grad, rw.grad, rb.grad)
    loss.backward(gy.to(dtype))
    with bf16_rounding_known(backend, dtype):
        for i, (name, got) in enumerate((("loss", loss), ("dx", x.grad), ("dweight", w.grad), ("dbias", b.grad))):
            assert_close(name + tag, got, ins["ref"][i], ins["base"][i])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_class_weights_like_torch(backend, reduction):
    """ce_weight = F.cross_entropy's weight (Liger's ce_weight): rows scaled by the target's
    weight, "mean" over the sum of the counted rows' weights; loss and every gradient against
    torch's weighted cross-entropy in float64 (the DESIGN rule in the tested dtype), with
    ignored rows, a bias and a softcap; the module takes it as a buffer."""
    dev = device_for(backend)
    x64, w64, b64, t = _make(13, 24, 40, dev)
    cw64 = torch.rand(40, dtype=torch.float64, device=dev) * 2 + 0.1
    for dtype in _dtypes(backend):
        for softcap in (0.0, 5.0):
            x, w, b = (leaf(v, dtype) for v in (x64, w64, b64))
            loss = tk.linear_cross_entropy(x, w, t, bias=b, reduction=reduction, logit_softcap=softcap,
                                           ce_weight=cw64.to(dtype), chunk_size=4, backend=backend)
            def torch_loss(rx, rw, rb, dt):
                z = F.linear(rx, rw, rb)
                if softcap:
                    z = softcap * torch.tanh(z / softcap)
                return F.cross_entropy(z, t, weight=cw64.to(dtype).to(dt), reduction=reduction)
            _check_against_torch(torch_loss, (loss, x, w, b), (x64, w64, b64), dtype, backend,
                                 f"[{backend} {dtype} {reduction} cap={softcap}]")
    module = tk.modules.FusedLinearCrossEntropyLoss(reduction=reduction, ce_weight=cw64.float(), backend=backend)
    assert "ce_weight" in dict(module.named_buffers())
    torch.testing.assert_close(module(x64.float(), w64.float(), t, b64.float()),
                               F.cross_entropy(F.linear(x64, w64, b64), t, weight=cw64, reduction=reduction).float(),
                               rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="ce_weight.*label_smoothing.*logit_softcap"):
        tk.linear_cross_entropy(x64, w64, t, ce_weight=cw64, label_smoothing=0.1, logit_softcap=3.0,
                                backend=backend)
    with pytest.raises(ValueError, match="ce_weight"):
        tk.linear_cross_entropy(x64, w64, t, ce_weight=cw64[:5], backend=backend)


def _weighted_torch(x, w, b, t, cw, reduction, label_smoothing, z_loss=0.0):
    """Plain PyTorch with the logits materialised, in the inputs' dtype: F.cross_entropy with
    weight=cw and label_smoothing=, plus cw[target] * z_loss * logsumexp^2 per counted row
    ("mean" over the counted rows' weights). Returns (loss, z-loss term reduced like it)."""
    logits = F.linear(x, w, b)
    valid = t != -100
    wy = torch.where(valid, cw[torch.where(valid, t, 0)], 0.0)
    zrows = wy * z_loss * torch.logsumexp(logits, -1) ** 2
    if z_loss == 0:
        loss = F.cross_entropy(logits, t, weight=cw, reduction=reduction, label_smoothing=label_smoothing)
        rows = None
    else:
        rows = F.cross_entropy(logits, t, weight=cw, reduction="none", label_smoothing=label_smoothing)
        rows = rows + zrows
    if reduction == "none":
        return (rows if rows is not None else loss), zrows
    div = wy.sum() if reduction == "mean" else 1
    return (rows.sum() / div if rows is not None else loss), zrows.sum() / div


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_class_weights_with_smoothing_like_torch(backend, reduction):
    """ce_weight with label_smoothing (torch's weighted smoothing term (eps / V) sum_c
    ce_weight[c] (-log p_c), from the fused rows' logsumexp and the linear sum_c ce_weight[c]
    logit_c): loss and the gradients to x, weight and bias against torch's F.cross_entropy in
    float64 (the DESIGN rule in the tested dtype, against torch in that dtype), with ignored
    rows, a bias, chunks, eps 0.1 and 1 (smoothing only), and negative class weights (torch
    allows them); loss_dtype=float32 is the same loss unrounded; the module takes both."""
    dev = device_for(backend)
    x64, w64, b64, t = _make(15, 24, 50, dev)
    t[[0, 6]] = -100
    cw_pos = torch.rand(50, dtype=torch.float64, device=dev) * 2 + 0.1
    cw_neg = cw_pos.clone()
    cw_neg[::3] *= -1
    runs = [(dtype, cw_pos, eps) for dtype in _dtypes(backend) for eps in (0.1, 1.0)]
    runs.append((_dtypes(backend)[-1], cw_neg, 0.3))  # float64 (float32 on Triton)
    for dtype, cw64, eps in runs:
        x, w, b = (leaf(v, dtype) for v in (x64, w64, b64))
        cw = cw64.to(dtype)
        loss = tk.linear_cross_entropy(x, w, t, bias=b, reduction=reduction, label_smoothing=eps,
                                       ce_weight=cw, chunk_size=4, backend=backend)
        _check_against_torch(lambda rx, rw, rb, dt: _weighted_torch(rx, rw, rb, t, cw.to(dt), reduction, eps)[0],
                             (loss, x, w, b), (x64, w64, b64), dtype, backend,
                             f"[{backend} {dtype} {reduction} eps={eps} negative={bool((cw64 < 0).any())}]")
        if dtype == torch.bfloat16:
            high = tk.linear_cross_entropy(x, w, t, bias=b, reduction=reduction, label_smoothing=eps,
                                           ce_weight=cw, chunk_size=4, loss_dtype=torch.float32,
                                           backend=backend)
            assert high.dtype == torch.float32
            torch.testing.assert_close(high.to(dtype), loss, rtol=0, atol=0)
    module = tk.modules.FusedLinearCrossEntropyLoss(reduction=reduction, ce_weight=cw_pos.float(),
                                                    label_smoothing=0.1, backend=backend)
    expected, _ = _weighted_torch(x64, w64, b64, t, cw_pos, reduction, 0.1)
    torch.testing.assert_close(module(x64.float(), w64.float(), t, b64.float()), expected.float(),
                               rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_class_weights_with_smoothing_mixed_precision(backend, reduction):
    """bfloat16 x with a float32 weight and bias: the gather-dot x . W[y] + b[y] and W^T ce_weight
    use the weight and bias rounded to bfloat16, as the kernels' logits do (so lse is theirs);
    loss, dweight and dbias in float32, against the float64 reference on the rounded weight and
    plain PyTorch under autocast; float32 x under autocast gives what bfloat16 x gives."""
    dev, dtype = device_for(backend), torch.bfloat16
    x64, w64, b64, t = _make(21, 40, 333, dev)
    t[0] = -100
    x64, w64, b64 = x64.to(dtype).double(), w64.float().double(), b64.float().double()
    cw = torch.rand(333, device=dev) * 2 + 0.1
    opts = dict(reduction=reduction, label_smoothing=0.1, ce_weight=cw)
    x, w, b = leaf(x64, dtype), leaf(w64, torch.float32), leaf(b64, torch.float32)
    loss = tk.linear_cross_entropy(x, w, t, bias=b, chunk_size=7, backend=backend, **opts)
    assert loss.dtype == torch.float32
    rx, rw, rb = leaf(x64), leaf(w64.to(dtype).double()), leaf(b64.to(dtype).double())
    ref, _ = _weighted_torch(rx, rw, rb, t, cw.double(), reduction, 0.1)
    bx, bw, bb = leaf(x64, dtype), leaf(w64, torch.float32), leaf(b64, torch.float32)
    with torch.autocast(dev, dtype=dtype):
        base, _ = _weighted_torch(bx, bw, bb, t, cw, reduction, 0.1)
    gy64 = torch.randn(loss.shape, dtype=torch.float64, device=dev) + 0.5
    for out, gy in ((loss, gy64.float()), (ref, gy64), (base, gy64.float())):
        out.backward(gy)
    assert w.grad.dtype == b.grad.dtype == torch.float32 and x.grad.dtype == dtype
    with bf16_rounding_known(backend, dtype):
        assert_close(f"loss[{backend} mixed]", loss, ref, base.float())
        assert_close(f"dx[{backend} mixed]", x.grad, rx.grad, bx.grad)
        assert_close(f"dweight[{backend} mixed]", w.grad, rw.grad, bw.grad)
        assert_close(f"dbias[{backend} mixed]", b.grad, rb.grad, bb.grad)
    results = []
    for auto in (True, False):
        x, w = leaf(x64, torch.float32), leaf(w64, torch.float32)
        with torch.autocast(dev, dtype=dtype, enabled=auto):
            xin = x if auto else x.to(dtype)
            loss = tk.linear_cross_entropy(xin, w, t, chunk_size=7, backend=backend, **opts)
        loss.backward(gy64.float())
        results.append((loss, x.grad, w.grad))
    for p, q in zip(*results):
        assert p.dtype == q.dtype == torch.float32
        torch.testing.assert_close(p, q, rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_class_weights_with_smoothing_z_loss(backend):
    """z_loss with ce_weight and label smoothing: each counted row's z_loss * lse^2 scaled by
    ce_weight[target] (as without smoothing), "mean" over the weights, with its gradient;
    return_z_loss gives that term reduced like the loss, without gradient (zeros for
    z_loss=0); logit_softcap as well is refused, naming the three arguments."""
    dev = device_for(backend)
    dtype = _dtypes(backend)[-1]  # float64 (float32 on Triton)
    x64, w64, b64, t = _make(14, 16, 60, dev)
    t[3] = -100
    cw64 = torch.rand(60, dtype=torch.float64, device=dev) * 2 + 0.1
    for reduction in ("mean", "sum", "none"):
        x, w, b = (leaf(v, dtype) for v in (x64, w64, b64))
        loss, z = tk.linear_cross_entropy(x, w, t, bias=b, reduction=reduction, label_smoothing=0.2,
                                          z_loss=0.02, return_z_loss=True, ce_weight=cw64.to(dtype),
                                          chunk_size=5, backend=backend)
        assert not z.requires_grad and z.dtype == loss.dtype == dtype
        gy = torch.randn(loss.shape, dtype=torch.float64, device=dev) + 0.5
        ins = {}
        for name, dt in (("ref", torch.float64), ("base", dtype)):
            rx, rw, rb = (leaf(v.to(dtype).to(dt)) for v in (x64, w64, b64))
            out, rz = _weighted_torch(rx, rw, rb, t, cw64.to(dtype).to(dt), reduction, 0.2, z_loss=0.02)
            out.backward(gy.to(dt))
            ins[name] = (out, rz.detach(), rx.grad, rw.grad, rb.grad)
        loss.backward(gy.to(dtype))
        tag = f"[{backend} {dtype} {reduction}]"
        for i, (name, got) in enumerate((("loss", loss), ("z", z), ("dx", x.grad), ("dweight", w.grad),
                                         ("dbias", b.grad))):
            assert_close(name + tag, got, ins["ref"][i], ins["base"][i])
        _, z0 = tk.linear_cross_entropy(x, w, t, bias=b, reduction=reduction, label_smoothing=0.2,
                                        return_z_loss=True, ce_weight=cw64.to(dtype), backend=backend)
        assert torch.equal(z0, torch.zeros_like(z0)) and z0.shape == z.shape
    with pytest.raises(ValueError, match="ce_weight.*label_smoothing.*logit_softcap"):
        tk.linear_cross_entropy(x, w, t, ce_weight=cw64.to(dtype), label_smoothing=0.1,
                                logit_softcap=3.0, backend=backend)


@pytest.mark.parametrize("backend", [b for b in ("cpu", "reference") if not backends.unavailable_reason(b)])
@pytest.mark.parametrize("autocast", [False, True])
def test_class_weights_with_smoothing_compile_fullgraph(backend, autocast):
    """The ce_weight + label_smoothing path compiles without graph breaks. Compiled == eager in
    float32; under bf16 autocast up to bfloat16 rounding: Inductor skips the float32 -> bfloat16
    -> float32 round trips of x and the weight (emulate_precision_casts off), which the kernels'
    logits do have, so the gather-dot is then that of the unrounded values."""
    torch._dynamo.reset()
    x64, w64, b64, t = _make(8, 8, 30, "cpu")
    t[0] = -100
    cw = torch.rand(30) + 0.1

    def fn(x, w, b):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            return tk.linear_cross_entropy(x, w, t, bias=b, label_smoothing=0.1, z_loss=0.01,
                                           ce_weight=cw, backend=backend)
    results = []
    for f in (fn, torch.compile(fn, fullgraph=True)):
        x, w, b = leaf(x64, torch.float32), leaf(w64, torch.float32), leaf(b64, torch.float32)
        loss = f(x, w, b)
        results.append((loss,) + torch.autograd.grad(2 * loss, (x, w, b)))
    tol = dict(rtol=8e-3, atol=8e-3) if autocast else {}
    for p, q in zip(*results):
        torch.testing.assert_close(p, q, **tol)
