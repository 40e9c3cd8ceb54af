"""tk.cross_entropy (fused cross-entropy on given logits) on every backend against PyTorch in
float64 (F.cross_entropy, with z-loss and softcap written out) and against plain PyTorch in the
same dtype: loss and gradient of the logits, every reduction, ignored rows, label smoothing,
z-loss, softcap, class weights, return_z_loss, loss_dtype; gradcheck, opcheck (the custom op
and the C++ kernel), torch.compile, bad inputs, and the CrossEntropyLoss module against
torch.nn.CrossEntropyLoss.

Tolerances: DESIGN.md's rule (error against float64 <= 2x the same-dtype PyTorch error + atol),
the float64 computation run on the logits rounded to the tested dtype."""
import pytest
import torch
import torch.nn.functional as F

import truthgpt_kernels as tk
from truthgpt_kernels import backends
from truthgpt_kernels.ops import reference

from ..helpers import assert_close, backend_params, device_for, leaf
from .interpreter import bf16_rounding_known

FAMILY = "cross_entropy"
BACKENDS = backend_params(FAMILY)


def _cpu_built():
    return not backends.unavailable_reason("cpu") and backends.implements(FAMILY, "cpu")


def _dtypes(backend):
    if backend in ("cpu", "reference"):
        return [torch.float32, torch.bfloat16, torch.float16, torch.float64]
    return [torch.float32, torch.bfloat16]


def _make(shape, dev, *, ignore_frac=0.25, scale=3.0):
    """float64 logits of a few units (softmax neither flat nor one-hot), targets with ignored rows."""
    logits = torch.randn(*shape, dtype=torch.float64, device=dev) * scale
    t = torch.randint(0, shape[-1], shape[:-1], device=dev)
    t[torch.rand(shape[:-1], device=dev) < ignore_frac] = -100
    return logits, t


def _torch(logits, t, reduction="mean", label_smoothing=0.0, z_loss=0.0, softcap=0.0, weight=None):
    """Plain PyTorch in logits' dtype: F.cross_entropy on (N, V) (softcapped) logits, plus
    z_loss * logsumexp^2 per counted row (times weight[target] with a weight)."""
    z = logits.reshape(-1, logits.shape[-1])
    t = t.reshape(-1)
    if softcap > 0:
        z = softcap * torch.tanh(z / softcap)
    rows = F.cross_entropy(z, t, weight=weight, reduction="none", label_smoothing=label_smoothing)
    valid = t != -100
    wy = torch.ones_like(rows) if weight is None else torch.where(valid, weight[torch.where(valid, t, 0)], 0)
    if z_loss:
        rows = rows + wy * torch.where(valid, z_loss * torch.logsumexp(z, -1) ** 2, 0.0)
    if reduction == "none":
        return rows.reshape(logits.shape[:-1])
    if reduction == "sum":
        return rows.sum()
    if weight is None:  # (as torch: mean of a weighted loss divides by the weights' sum)
        return rows.sum() / valid.sum()
    return rows.sum() / wy.sum()


def _check(backend, dtype, inputs, *, reduction="mean", name="", weight=None, **opts):
    l64, t = inputs
    l64 = l64.to(dtype).double()
    kw = dict(reduction=reduction, label_smoothing=opts.get("label_smoothing", 0.0),
              z_loss=opts.get("z_loss", 0.0), softcap=opts.get("logit_softcap", 0.0))
    x = leaf(l64.clone(), dtype)  # (its own storage: inplace_backward writes the gradient there)
    ours = tk.cross_entropy(x, t, reduction=reduction, backend=backend,
                            ce_weight=None if weight is None else weight.to(dtype), **opts)
    rx, bx = leaf(l64), leaf(l64, dtype)
    ref = _torch(rx, t, weight=None if weight is None else weight.to(dtype).double(), **kw)
    base = _torch(bx, t, weight=None if weight is None else weight.to(dtype), **kw)
    tag = f"{name}[{backend} {dtype} {reduction} {opts} w={weight is not None}]"
    with bf16_rounding_known(backend, dtype):
        assert_close("loss" + tag, ours, ref, base)
        if not torch.isfinite(ref).all():
            return
        gy64 = torch.randn(ours.shape, dtype=torch.float64, device=x.device) + 0.5
        for out, gy in ((ours, gy64.to(dtype)), (ref, gy64), (base, gy64.to(dtype))):
            out.backward(gy)
        assert x.grad.dtype == dtype
        assert_close("dlogits" + tag, x.grad, rx.grad, bx.grad)


CASES = {  # name: (logits shape, options)
    "plain": ((17, 203), {}),
    "one_row": ((1, 37), {}),
    "smoothing": ((9, 50), dict(label_smoothing=0.1)),
    "z_loss": ((12, 96), dict(z_loss=0.05)),
    "softcap": ((11, 77), dict(logit_softcap=4.0)),
    "all_options": ((13, 130), dict(label_smoothing=0.2, z_loss=0.01, logit_softcap=5.0)),
    "wide": ((6, 5000), dict(label_smoothing=0.05)),
    "batch_seq": ((3, 5, 64), dict(z_loss=0.01)),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_matches_torch(backend, case, reduction):
    shape, opts = CASES[case]
    inputs = _make(shape, device_for(backend))
    for dtype in _dtypes(backend):
        _check(backend, dtype, inputs, reduction=reduction, name=case, **opts)


@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_reference_module(backend):
    """ops/reference.py's cross_entropy (the spec) agrees with the kernels, return_z_loss too."""
    l64, t = _make((14, 60), device_for(backend))
    for reduction in ("mean", "sum", "none"):
        opts = dict(reduction=reduction, label_smoothing=0.1, z_loss=0.02, logit_softcap=6.0,
                    return_z_loss=True)
        loss, z = tk.cross_entropy(l64.float(), t, backend=backend, **opts)
        rl, rz = reference.cross_entropy(l64, t, **opts)
        assert_close(f"loss[{reduction}]", loss, rl, rl.float())
        assert_close(f"z[{reduction}]", z, rz, rz.float())
        assert not z.requires_grad


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_rows_ignored(backend, reduction):
    """As F.cross_entropy: mean over no rows is nan, sum is 0; gradients are 0."""
    dev = device_for(backend)
    x = torch.randn(5, 20, device=dev, requires_grad=True)
    t = torch.full((5,), -100, device=dev)
    loss = tk.cross_entropy(x, t, reduction=reduction, label_smoothing=0.1, z_loss=0.1, backend=backend)
    expected = F.cross_entropy(x, t, reduction=reduction, label_smoothing=0.1)
    torch.testing.assert_close(loss, expected, equal_nan=True)
    loss.sum().backward()
    assert torch.equal(x.grad, torch.zeros_like(x))


@pytest.mark.parametrize("backend", BACKENDS)
def test_custom_ignore_index_and_empty_batch(backend):
    dev = device_for(backend)
    l64, t = _make((10, 30), dev)
    t = torch.where(t == -100, 7, t)  # 7 is the ignored class here
    ours = tk.cross_entropy(l64.float(), t, ignore_index=7, backend=backend)
    ref = F.cross_entropy(l64, t, ignore_index=7)
    assert_close("loss", ours, ref, F.cross_entropy(l64.float(), t, ignore_index=7))
    x = leaf(l64[:0], torch.float32)
    empty = tk.cross_entropy(x, t[:0], reduction="sum", backend=backend)
    assert empty.item() == 0.0
    empty.backward()
    assert x.grad is not None and x.grad.shape == (0, 30)


@pytest.mark.parametrize("backend", BACKENDS)
def test_z_loss_term_returned(backend):
    """return_z_loss=True: (loss, term) as Liger, the term reduced like the loss, already part of
    the loss, no gradient through it."""
    dev = device_for(backend)
    l64, t = _make((4, 5, 60), dev)
    valid = t != -100
    zr = torch.where(valid, 0.02 * torch.logsumexp(l64, -1) ** 2, 0.0)
    for reduction in ("mean", "sum", "none"):
        x = leaf(l64, torch.float32)
        loss, z = tk.cross_entropy(x, t, z_loss=0.02, reduction=reduction, return_z_loss=True,
                                   backend=backend)
        expected = {"none": zr, "sum": zr.sum(), "mean": zr.sum() / valid.sum()}[reduction]
        assert_close(f"z[{reduction}]", z, expected, expected.float())
        assert not z.requires_grad and z.shape == loss.shape
    loss, z = tk.cross_entropy(l64.float(), t, return_z_loss=True, backend=backend)
    assert z.item() == 0.0


@pytest.mark.parametrize("backend", BACKENDS)
def test_grad_output_scaling_retain_graph_and_no_mutation(backend):
    """The backward scales the forward's gradient by grad_output (per row for "none"); a second
    backward (retain_graph) gives the same; the user's logits are never written."""
    dev = device_for(backend)
    l64, t = _make((9, 40), dev)
    for reduction in ("mean", "none"):
        x = leaf(l64, torch.float32)
        before = x.detach().clone()
        loss = tk.cross_entropy(x, t, reduction=reduction, z_loss=0.01, backend=backend)
        assert torch.equal(x.detach(), before)
        gy = torch.randn(loss.shape, device=dev)
        loss.backward(gy, retain_graph=True)
        g1 = x.grad.clone()
        loss.backward(3 * gy)
        torch.testing.assert_close(x.grad, 4 * g1)
        rx = leaf(l64)
        _torch(rx, t, reduction=reduction, z_loss=0.01).backward(gy.double())
        torch.testing.assert_close(g1, rx.grad.float(), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_grad(backend):
    dev = device_for(backend)
    l64, t = _make((8, 33), dev)
    x = l64.float().requires_grad_()
    with torch.no_grad():
        loss = tk.cross_entropy(x, t, logit_softcap=3.0, backend=backend)
    assert not loss.requires_grad
    torch.testing.assert_close(loss, _torch(l64, t, softcap=3.0).float())
    loss = tk.cross_entropy(l64.float(), t, backend=backend)  # logits need no gradient
    assert not loss.requires_grad


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_loss_dtype_float32(backend, dtype):
    """loss_dtype=torch.float32: float32 row losses reduced in float32 (never rounded to the
    logits' dtype); the default is them rounded once; the gradients are identical."""
    if dtype == torch.float16 and backend == "triton":
        pytest.skip("the Triton tests run bfloat16 and float32")
    dev = device_for(backend)
    l64, t = _make((40, 90), dev)
    results = {}
    for loss_dtype in (None, torch.float32):
        x = leaf(l64, dtype)
        for reduction in ("none", "sum", "mean"):
            results[loss_dtype, reduction] = tk.cross_entropy(
                x, t, reduction=reduction, z_loss=0.01, loss_dtype=loss_dtype, backend=backend)
        results[loss_dtype, "mean"].backward()
        results[loss_dtype, "grad"] = x.grad
    rows, valid = results[torch.float32, "none"], t != -100
    for reduction in ("none", "sum", "mean"):
        low, high = results[None, reduction], results[torch.float32, reduction]
        assert low.dtype == dtype and high.dtype == torch.float32
        torch.testing.assert_close(high.to(dtype), low, rtol=0, atol=0)
    torch.testing.assert_close(results[torch.float32, "sum"], rows.sum(), rtol=1e-6, atol=0)
    torch.testing.assert_close(results[torch.float32, "mean"], rows.sum() / valid.sum(), rtol=1e-6, atol=0)
    torch.testing.assert_close(results[torch.float32, "grad"], results[None, "grad"], rtol=0, atol=0)
    with pytest.raises(TypeError, match="loss_dtype must be None"):
        tk.cross_entropy(l64.to(dtype), t, loss_dtype=torch.float16, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_class_weights_like_torch(backend, reduction):
    """ce_weight = F.cross_entropy's weight, with and without label smoothing (torch's weighted
    smoothing), with softcap and z-loss (the term weighted like the row)."""
    dev = device_for(backend)
    inputs = _make((13, 40), dev)
    cw = torch.rand(40, dtype=torch.float64, device=dev) * 2 + 0.1
    for dtype in _dtypes(backend):
        for opts in ({}, dict(label_smoothing=0.1), dict(logit_softcap=5.0, z_loss=0.01),
                     dict(label_smoothing=0.2, logit_softcap=4.0, z_loss=0.02)):
            _check(backend, dtype, inputs, reduction=reduction, weight=cw, name="weighted", **opts)
    loss, z = tk.cross_entropy(inputs[0].float(), inputs[1], ce_weight=cw.float(), z_loss=0.01, label_smoothing=0.1,
                               return_z_loss=True, reduction=reduction, backend=backend)
    assert not z.requires_grad and z.shape == loss.shape
    with pytest.raises(ValueError, match="ce_weight must have shape"):
        tk.cross_entropy(inputs[0].float(), inputs[1], ce_weight=cw[:5].float(), backend=backend)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_gradcheck_cpu(reduction):
    if not _cpu_built():
        pytest.skip("C++ CPU extension not built")
    l64, t = _make((6, 11), "cpu")
    x = leaf(l64)

    def fn(x):
        return tk.cross_entropy(x, t, reduction=reduction, label_smoothing=0.1, z_loss=0.05,
                                logit_softcap=2.0, backend="cpu")
    assert torch.autograd.gradcheck(fn, (x,))


@pytest.mark.parametrize("isa", ["portable", "avx2", "avx512"])
def test_cpu_instruction_sets(isa, monkeypatch):
    if not _cpu_built():
        pytest.skip("C++ CPU extension not built")
    monkeypatch.setenv("TRUTHGPT_CPU_ISA", isa)
    inputs = _make((7, 45), "cpu")
    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        _check("cpu", dtype, inputs, label_smoothing=0.1, z_loss=0.01, logit_softcap=3.0, name=isa)


def test_cpu_strided_logits():
    """Logits with a non-unit inner stride (copied) or a row stride > V (read in place)."""
    if not _cpu_built():
        pytest.skip("C++ CPU extension not built")
    l64, t = _make((8, 100), "cpu")
    t = torch.where(t >= 0, t % 50, t)
    for view in (lambda v: v[:, :50], lambda v: v.t().contiguous().t()[:, :50]):
        _check("cpu", torch.float32, (view(l64), t), label_smoothing=0.1, z_loss=0.01, name="strided")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", [1, 0])  # mean, none
def test_opcheck(backend, reduction):
    dev = device_for(backend)
    l64, t = _make((6, 20), dev)
    x = leaf(l64, torch.float32)
    rw = torch.where(t != -100, torch.rand(6, device=dev) + 0.5, 0.0)
    for fp32_loss, row_weight in ((False, None), (True, None), (False, rw)):
        for need_grad in (True, False):
            for inplace in (False, True):
                args = (x, t, row_weight, -100, reduction, 0.1, 0.01, 3.0, need_grad, backend, fp32_loss,
                        inplace)
                torch.library.opcheck(torch.ops.truthgpt.cross_entropy.default, args)


def test_opcheck_cpp_kernel():
    if not _cpu_built():
        pytest.skip("C++ CPU extension not built")
    l64, t = _make((6, 20), "cpu")
    for dtype in (torch.float32, torch.bfloat16):
        for scale in (torch.full((6,), 0.25), None):
            torch.library.opcheck(torch.ops.truthgpt.cross_entropy_fwd.default,
                                  (l64.to(dtype), t, scale, -100, 0.1, 0.01, 3.0))
        torch.library.opcheck(torch.ops.truthgpt.cross_entropy_grad_.default,
                              (l64.to(dtype), t, torch.full((6,), 0.25), -100, 0.1, 0.01, 3.0))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", ["plain", "all_options", "batch_seq"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_inplace_backward_matches_torch(backend, case, reduction):
    """inplace_backward=True (flash-attn's option): the same loss and gradient as PyTorch (the
    tolerance rule), every dtype, with class weights too; the gradient is written over the
    logits (it aliases their storage)."""
    shape, opts = CASES[case]
    inputs = _make(shape, device_for(backend))
    for dtype in _dtypes(backend):
        _check(backend, dtype, inputs, reduction=reduction, name=case, inplace_backward=True, **opts)
        w = torch.rand(shape[-1], dtype=torch.float64, device=inputs[0].device) + 0.5
        _check(backend, dtype, inputs, reduction=reduction, name=case + " weighted", weight=w,
               inplace_backward=True, **{k: v for k, v in opts.items() if k != "label_smoothing"})
    x = leaf(inputs[0], torch.float32)
    tk.cross_entropy(x, inputs[1], reduction=reduction, inplace_backward=True, backend=backend,
                     **opts).sum().backward()
    assert x.grad.data_ptr() == x.data_ptr() and torch.equal(x.grad, x.detach())


@pytest.mark.parametrize("backend", BACKENDS)
def test_inplace_backward_keeps_no_logits_sized_buffer(backend):
    """The forward saves the logits themselves (no new (N, V) tensor: the default path saves
    its gradient buffer), and the backward allocates none either: its gradient is the logits."""
    dev = device_for(backend)
    l64, t = _make((64, 512), dev)
    for inplace in (False, True):
        x = leaf(l64, torch.float32)
        saved = []

        def pack(s):
            saved.append(s)
            return s
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda s: s):
            loss = tk.cross_entropy(x, t, inplace_backward=inplace, backend=backend)
        big = [s for s in saved if s.numel() == x.numel()]
        assert len(big) == 1
        assert (big[0].data_ptr() == x.data_ptr()) == inplace
        loss.backward()
        assert (x.grad.data_ptr() == x.data_ptr()) == inplace


def test_inplace_backward_strided_logits_and_bad_input():
    l64, t = _make((9, 40), "cpu")
    base = leaf(l64.t().contiguous(), torch.float32)  # (40, 9): its transpose has no unit inner stride
    x = base.t()
    ref = leaf(l64, torch.float32)
    tk.cross_entropy(x, t, inplace_backward=True, backend="reference").backward()
    tk.cross_entropy(ref, t, backend="reference").backward()
    torch.testing.assert_close(base.grad.t(), ref.grad)  # the default path, not in place
    assert not torch.equal(base.detach().t(), ref.grad)
    with pytest.raises(TypeError, match="inplace_backward must be True or False"):
        tk.cross_entropy(ref, t, inplace_backward=1)


@pytest.mark.parametrize("backend", [b for b in ("cpu", "reference") if not backends.unavailable_reason(b)])
def test_inplace_backward_compiles(backend):
    torch._dynamo.reset()
    l64, t = _make((8, 30), "cpu")

    def fn(x):
        return tk.cross_entropy(x * 1.0, t, z_loss=0.01, inplace_backward=True, backend=backend)
    _assert_compiled_like_eager(fn, l64)


def _assert_compiled_like_eager(fn, l64):
    """fn and torch.compile(fn, fullgraph=True): the same loss and d(2 loss)/dx."""
    results = []
    for f in (fn, torch.compile(fn, fullgraph=True)):
        x = leaf(l64, torch.float32)
        loss = f(x)
        results.append((loss,) + torch.autograd.grad(2 * loss, (x,)))
    for p, q in zip(*results):
        torch.testing.assert_close(p, q)


@pytest.mark.parametrize("backend", [b for b in ("cpu", "reference") if not backends.unavailable_reason(b)])
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("weighted", [False, True])
def test_compile_fullgraph(backend, reduction, weighted):
    torch._dynamo.reset()
    l64, t = _make((8, 30), "cpu")
    cw = torch.rand(30) + 0.5 if weighted else None
    ls = 0.0 if weighted and reduction == "none" else 0.1  # (weighted: both paths)

    def fn(x):
        return tk.cross_entropy(x, t, label_smoothing=ls, z_loss=0.01, reduction=reduction,
                                ce_weight=cw, backend=backend).sum()
    _assert_compiled_like_eager(fn, l64)


@pytest.mark.parametrize("backend", BACKENDS)
def test_target_out_of_range(backend):
    """Checked inside the op before any kernel runs; the message names target, value, position."""
    dev = device_for(backend)
    x = torch.randn(4, 10, device=dev)
    for bad in (10, -1, -101):
        t = torch.tensor([1, 2, bad, 3], device=dev)
        with pytest.raises(ValueError, match=rf"target must hold class indices in \[0, 10\).*got {bad} at position 2"):
            tk.cross_entropy(x, t, backend=backend)
        with pytest.raises(ValueError, match="target must hold class indices"):
            tk.cross_entropy(x.clone().requires_grad_(), t, reduction="none", backend=backend)


def test_bad_inputs():
    x, t = torch.randn(4, 10), torch.randint(0, 10, (4,))
    ce = tk.cross_entropy
    with pytest.raises(TypeError, match="logits must be a torch.Tensor"):
        ce(x.tolist(), t)
    with pytest.raises(TypeError, match="logits must have dtype"):
        ce(x.long(), t)
    with pytest.raises(TypeError, match="target must have dtype int64"):
        ce(x, t.int())
    with pytest.raises(ValueError, match=r"target must have shape \(4,\)"):
        ce(x, t[:3])
    with pytest.raises(TypeError, match="target must have dtype int64"):
        ce(x, x)  # class probabilities: not taken
    with pytest.raises(ValueError, match="logits must have at least one class"):
        ce(x[:, :0], t)
    with pytest.raises(ValueError, match="reduction must be one of"):
        ce(x, t, reduction="avg")
    with pytest.raises(ValueError, match="label_smoothing must be in"):
        ce(x, t, label_smoothing=1.5)
    with pytest.raises(ValueError, match="z_loss must be >= 0"):
        ce(x, t, z_loss=-1.0)
    with pytest.raises(ValueError, match="logit_softcap must be finite"):
        ce(x, t, logit_softcap=float("inf"))
    with pytest.raises(TypeError, match="ignore_index must be an int"):
        ce(x, t, ignore_index=1.5)
    with pytest.raises(TypeError, match="ce_weight must have dtype"):
        ce(x, t, ce_weight=torch.ones(10, dtype=torch.long))


@pytest.mark.parametrize("backend", BACKENDS)
def test_module_like_torch(backend):
    """CrossEntropyLoss against torch.nn.CrossEntropyLoss: (N, C), unbatched (C,), torch's
    (N, C, d1) layout, class weights with smoothing; (B, S, V) class-last with z-loss extras."""
    dev = device_for(backend)
    cw = torch.rand(12, device=dev) + 0.5
    cases = [((20, 12), (20,)), ((12,), ()), ((3, 12, 5), (3, 5))]
    for (shape, tshape) in cases:
        x64 = torch.randn(*shape, dtype=torch.float64, device=dev) * 2
        t = torch.randint(0, 12, tshape, device=dev)
        if t.dim():
            t.view(-1)[::4] = -100
        for kwargs in (dict(), dict(reduction="none"), dict(weight=cw, label_smoothing=0.1),
                       dict(reduction="sum", ignore_index=3, label_smoothing=0.2)):
            ours_m = tk.CrossEntropyLoss(backend=backend, **kwargs)
            theirs_m = torch.nn.CrossEntropyLoss(**kwargs)
            x, rx = leaf(x64, torch.float32), leaf(x64, torch.float32)
            tt = torch.where(t == -100, kwargs.get("ignore_index", -100), t)
            ours, theirs = ours_m(x, tt), theirs_m(rx, tt)
            torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
            ours.sum().backward()
            theirs.sum().backward()
            torch.testing.assert_close(x.grad, rx.grad, rtol=1e-5, atol=1e-6)
    # (B, S, V) classes last, with the extras
    x64 = torch.randn(2, 3, 12, dtype=torch.float64, device=dev)
    t = torch.randint(0, 12, (2, 3), device=dev)
    m = tk.CrossEntropyLoss(z_loss=0.01, logit_softcap=5.0, return_z_loss=True, backend=backend)
    loss, z = m(x64.float(), t)
    expected = _torch(x64, t, z_loss=0.01, softcap=5.0)
    torch.testing.assert_close(loss, expected.float(), rtol=1e-5, atol=1e-6)
    assert "weight" in dict(tk.CrossEntropyLoss(weight=cw).named_buffers())
    with pytest.raises(ValueError, match="class-probability"):
        tk.CrossEntropyLoss()(x64, torch.softmax(x64, -1))
    with pytest.raises(ValueError, match="target must have shape"):
        tk.CrossEntropyLoss()(x64, t[:, :2])


def test_func_transforms_run_the_reference():
    """Under torch.func.grad (a functorch transform) the op runs the reference backend as plain
    PyTorch, which the transform differentiates."""
    l64, t = _make((6, 10), "cpu")
    g = torch.func.grad(lambda x: tk.cross_entropy(x, t, label_smoothing=0.1, z_loss=0.01))(l64)
    rx = leaf(l64)
    _torch(rx, t, label_smoothing=0.1, z_loss=0.01).backward()
    torch.testing.assert_close(g, rx.grad)


@pytest.mark.parametrize("op", ["cross_entropy", "linear_cross_entropy"])
def test_backward_fills_no_logits_sized_zeros(op):
    """The gradient outputs of the forward are non-differentiable: the backward must not get
    (and fill) a zero gradient of their size (for cross_entropy a logits-sized one: it made the
    fwd+bwd 4x slower)."""
    from torch.profiler import profile, ProfilerActivity
    N, V, d = 64, 512, 32
    logits = torch.randn(N, V, requires_grad=True)
    x, w = torch.randn(N, d, requires_grad=True), torch.randn(V, d, requires_grad=True)
    t = torch.randint(0, V, (N,))
    big = {(N, V), (V, d), (N, d)}
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        loss = tk.cross_entropy(logits, t) if op == "cross_entropy" else tk.linear_cross_entropy(x, w, t)
        loss.backward()
    fills = [e for e in prof.events() if e.name in ("aten::fill_", "aten::zero_", "aten::zeros")
             and any(tuple(s) in big for s in e.input_shapes if s)]
    assert not fills, [(e.name, e.input_shapes) for e in fills]
