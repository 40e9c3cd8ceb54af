"""Property-based tests (hypothesis): random shapes, strides, dtypes and flags for every op and
every backend available here, values and gradients against the float64 reference."""
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import truthgpt_kernels as tk
from truthgpt_kernels import backends
from truthgpt_kernels.ops import reference

from .helpers import device_for

EXAMPLES = 200
PROFILE = dict(deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
# fp32: accumulated rounding of short reductions; bf16: a few ulps of 2^-8 at unit scale;
# fp64: the saved statistics (attention lse, rms_norm rstd) are float32 by contract
TOL = {torch.float32: (2e-4, 2e-4), torch.bfloat16: (5e-2, 5e-2), torch.float16: (1e-2, 1e-2),
       torch.float64: (1e-5, 1e-6)}


def _backends(family):
    return [b for b in backends.BACKENDS
            if device_for(b) == "cpu" and not backends.unavailable_reason(b) and backends.implements(family, b)]


def _dtypes(backend):
    return [d for d in (torch.float32, torch.bfloat16, torch.float16, torch.float64) if d in backends.DTYPES[backend]
            and not (backend == "triton" and d != torch.float32)]


def _layout(t: torch.Tensor, transposed: bool) -> torch.Tensor:
    """The same values, optionally as a non-contiguous view (dims 1 and 2 swapped in memory)."""
    if not transposed or t.dim() < 3:
        return t
    return t.transpose(1, 2).contiguous().transpose(1, 2)


def _check(name, ours, expected, dtype):
    rtol, atol = TOL[dtype]
    scale = expected.abs().max().item() if expected.numel() else 1.0
    torch.testing.assert_close(ours.double(), expected, rtol=rtol, atol=atol * max(1.0, scale),
                               msg=lambda m: f"{name}: {m}")


def _grads(fn, inputs, grad):
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*leaves)
    out.backward(grad.to(out.dtype))
    return out, [t.grad for t in leaves]


@st.composite
def attention_case(draw):
    Hkv = draw(st.sampled_from([1, 2]))
    return dict(
        B=draw(st.integers(1, 2)), Hkv=Hkv, Hq=Hkv * draw(st.sampled_from([1, 2, 4])),
        Sq=draw(st.integers(1, 40)), Sk=draw(st.integers(1, 40)), D=draw(st.sampled_from([8, 16, 24, 32, 64])),
        causal=draw(st.booleans()),
        window=draw(st.one_of(st.none(), st.tuples(st.integers(-1, 20), st.integers(-1, 20)))),
        alibi=draw(st.sampled_from([None, "h", "bh"])), softcap=draw(st.sampled_from([0.0, 0.0, 3.0])),
        key_mask=draw(st.booleans()), block=draw(st.sampled_from([None, 4, 16])),
        transposed=draw(st.booleans()), seed=draw(st.integers(0, 2 ** 16)))


@pytest.mark.parametrize("backend", _backends("attention"))
@settings(max_examples=EXAMPLES, **PROFILE)
@given(case=attention_case(), pick=st.integers(0, 2))
def test_attention_property(backend, case, pick):
    if backend == "triton" and pick:  # interpreter time: Triton checks a third of the examples
        return
    dtypes = _dtypes(backend)
    dtype = dtypes[pick % len(dtypes)]
    c = case
    g = torch.Generator().manual_seed(c["seed"])
    q = torch.randn(c["B"], c["Hq"], c["Sq"], c["D"], generator=g, dtype=torch.float64)
    k = torch.randn(c["B"], c["Hkv"], c["Sk"], c["D"], generator=g, dtype=torch.float64)
    v = torch.randn(c["B"], c["Hkv"], c["Sk"], c["D"], generator=g, dtype=torch.float64)
    do = torch.randn(c["B"], c["Hq"], c["Sq"], c["D"], generator=g, dtype=torch.float64)
    kw = dict(causal=c["causal"], window=c["window"], softcap=c["softcap"])
    if c["alibi"] == "h":
        kw["alibi_slopes"] = tk.alibi_slopes(c["Hq"])
    elif c["alibi"] == "bh":
        kw["alibi_slopes"] = torch.rand(c["B"], c["Hq"], generator=g)
    if c["key_mask"]:
        kw["key_mask"] = torch.rand(c["B"], c["Sk"], generator=g) > 0.3
    if c["block"]:
        bs = c["block"]
        kw["block_mask"] = torch.rand(1, c["Hq"], math.ceil(c["Sq"] / bs), math.ceil(c["Sk"] / bs), generator=g) > 0.3
        kw["block_size"] = bs
    ins = [_layout(t.to(dtype), c["transposed"]) for t in (q, k, v)]
    out, grads = _grads(lambda *a: tk.attention(*a, backend=backend, **kw), ins, do)
    ref, ref_grads = _grads(lambda *a: reference.attention(*a, **kw), [q, k, v], do)
    _check("out", out, ref, dtype)
    for n, a, b in zip("qkv", grads, ref_grads):
        _check(f"d{n}", a, b, dtype)


@st.composite
def rows_case(draw):
    lead = draw(st.lists(st.integers(1, 5), min_size=0, max_size=2))
    return dict(lead=lead, n=draw(st.integers(1, 300)), transposed=draw(st.booleans()),
                seed=draw(st.integers(0, 2 ** 16)))


@pytest.mark.parametrize("backend", _backends("swiglu"))
@settings(max_examples=EXAMPLES, **PROFILE)
@given(case=rows_case(), packed=st.booleans(), pick=st.integers(0, 2))
def test_swiglu_property(backend, case, packed, pick):
    dtypes = _dtypes(backend)
    dtype = dtypes[pick % len(dtypes)]
    g = torch.Generator().manual_seed(case["seed"])
    shape = (*case["lead"], case["n"])
    x = torch.randn(*shape[:-1], 2 * case["n"], generator=g, dtype=torch.float64) * 3
    dy = torch.randn(shape, generator=g, dtype=torch.float64)
    if packed:
        fn, ref_fn, ins, ref_ins = (lambda a: tk.swiglu(a, backend=backend)), reference.swiglu, [x.to(dtype)], [x]
    else:
        a, b = x.chunk(2, -1)
        fn = lambda a, b: tk.swiglu(a, b, backend=backend)  # noqa: E731
        ref_fn, ins, ref_ins = reference.swiglu, [_layout(t.to(dtype), case["transposed"]) for t in (a, b)], [a, b]
    out, grads = _grads(fn, ins, dy)
    ref, ref_grads = _grads(ref_fn, ref_ins, dy)
    _check("out", out, ref, dtype)
    for a, b in zip(grads, ref_grads):
        _check("grad", a, b, dtype)


@pytest.mark.parametrize("backend", _backends("rms_norm"))
@settings(max_examples=EXAMPLES, **PROFILE)
@given(case=rows_case(), weight=st.sampled_from([None, "same", "float32"]), pick=st.integers(0, 2))
def test_rms_norm_property(backend, case, weight, pick):
    dtypes = _dtypes(backend)
    dtype = dtypes[pick % len(dtypes)]
    g = torch.Generator().manual_seed(case["seed"])
    shape = (*case["lead"], case["n"])
    x = torch.randn(shape, generator=g, dtype=torch.float64) * 2
    dy = torch.randn(shape, generator=g, dtype=torch.float64)
    w = None if weight is None else torch.randn(case["n"], generator=g, dtype=torch.float64)
    w_dtype = torch.float32 if weight == "float32" else dtype
    ins = [_layout(x.to(dtype), case["transposed"])] + ([] if w is None else [w.to(w_dtype)])
    out, grads = _grads(lambda *a: tk.rms_norm(a[0], a[1] if len(a) > 1 else None, 1e-5, backend=backend), ins, dy)
    ref, ref_grads = _grads(lambda *a: reference.rms_norm(a[0], a[1] if len(a) > 1 else None, 1e-5),
                            [x] + ([] if w is None else [w]), dy)
    _check("out", out, ref, dtype)
    for a, b in zip(grads, ref_grads):
        _check("grad", a, b, dtype)


@pytest.mark.parametrize("backend", _backends("rotary"))
@settings(max_examples=EXAMPLES, **PROFILE)
@given(B=st.integers(1, 3), H=st.integers(1, 4), S=st.integers(1, 20), half=st.integers(1, 16),
       extra=st.sampled_from([0, 0, 2, 8]), interleaved=st.booleans(), pos=st.sampled_from(["offset", "1d", "2d"]),
       transposed=st.booleans(), seed=st.integers(0, 2 ** 16), pick=st.integers(0, 2))
def test_rotary_property(backend, B, H, S, half, extra, interleaved, pos, transposed, seed, pick):
    if backend == "triton" and pick:  # interpreter time: Triton checks a third of the examples
        return
    dtypes = _dtypes(backend)
    dtype = dtypes[pick % len(dtypes)]
    g = torch.Generator().manual_seed(seed)
    D = 2 * half + extra
    P = S + 7
    cos, sin = tk.rotary_cos_sin(P, 2 * half, dtype=torch.float64)
    x = torch.randn(B, H, S, D, generator=g, dtype=torch.float64)
    dy = torch.randn(B, H, S, D, generator=g, dtype=torch.float64)
    kw = dict(interleaved=interleaved)
    if pos == "offset":
        kw["offset"] = 7
    elif pos == "1d":
        kw["position_ids"] = torch.randint(0, P, (S,), generator=g)
    else:
        kw["position_ids"] = torch.randint(0, P, (B, S), generator=g)
    c32, s32 = cos.float(), sin.float()
    out, grads = _grads(lambda a: tk.apply_rotary(a, c32, s32, backend=backend, **kw), [_layout(x.to(dtype), transposed)], dy)
    ref, ref_grads = _grads(lambda a: reference.apply_rotary(a, cos, sin, **kw), [x], dy)
    _check("out", out, ref, dtype)
    _check("grad", grads[0], ref_grads[0], dtype)
