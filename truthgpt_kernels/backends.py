"""Backend registry and selection: the only place that decides which kernel runs.

Names (DESIGN.md): "triton", "cuda" (CUDA C++ extension), "cpu" (C++ CPU extension),
"reference" (pure PyTorch) and "auto". Chosen by, strongest first: the `backend=` argument,
the `use_backend(name)` context manager, the `TRUTHGPT_BACKEND` env var, then "auto".

Every backend exposes, per op family F, the kernel functions `F_fwd` and `F_bwd` with the
signatures of csrc/registration.cpp: the reference in ops/reference.py, Triton in
triton/F.py, and the C++ extensions as `torch.ops.truthgpt.F_fwd` registered per device.
A backend implements F when it has `F_fwd`; nothing else needs listing.
"""
import contextlib
import contextvars
import functools
import importlib
import os
from typing import Callable, Dict, Optional, Tuple

import torch
from torch.autograd import forward_ad as _forward_ad

from . import _ext

BACKENDS = ("triton", "cuda", "cpu", "reference")
CHOICES = BACKENDS + ("auto",)
ENV_VAR = "TRUTHGPT_BACKEND"

# Element types each backend's kernels take (DESIGN.md: dtypes).
DTYPES = {
    "triton": (torch.float16, torch.bfloat16, torch.float32),
    "cuda": (torch.float16, torch.bfloat16, torch.float32),
    "cpu": (torch.float32, torch.bfloat16, torch.float16, torch.float64),
    "reference": (torch.float16, torch.bfloat16, torch.float32, torch.float64),
}

# "auto" on CUDA tensors tries these in order (fastest measured first; see BENCHMARKS.md),
# then falls back to "reference". On CPU tensors: "cpu", then "reference".
AUTO_ORDER = {"cuda": ("cuda", "triton"), "cpu": ("cpu",)}


class BackendError(RuntimeError):
    """A backend was asked for that is unknown, unavailable, or cannot run this call."""


_selected: contextvars.ContextVar = contextvars.ContextVar("truthgpt_backend", default=None)


def check_name(name: str) -> str:
    if name not in CHOICES:
        raise ValueError(f"backend must be one of {', '.join(CHOICES)}; got {name!r}")
    return name


@contextlib.contextmanager
def use_backend(name: str):
    """Within the block, ops without an explicit `backend=` use `name`."""
    token = _selected.set(check_name(name))
    try:
        yield
    finally:
        _selected.reset(token)


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def cuda_arch_reason(build_info: str, capability: Tuple[int, int]) -> str:
    """'' when the _cuda build (its build info holds "archs=8.0;9.0+PTX", TRUTHGPT_CUDA_ARCHS)
    has code for a GPU of compute `capability`, else why not: SASS for sm_XY runs on X.Y' with
    Y' >= Y (the same major), PTX ("+PTX") JIT-compiles on any newer GPU; the kernels need
    sm_80 (bf16 mma.sync) at least. Without this, "auto" picked _cuda on a B200, an RTX 50xx
    or a T4 and every launch failed with "no kernel image is available"."""
    cc = f"{capability[0]}.{capability[1]}"
    if capability < (8, 0):
        return f"the CUDA kernels need compute capability 8.0 or newer (this GPU: {cc})"
    archs = next((part[len("archs="):] for part in build_info.split() if part.startswith("archs=")), None)
    if not archs:
        return ""  # (a build that does not say: trust it)
    for arch in filter(None, (a.strip() for a in archs.split(";"))):
        try:
            major, minor = (int(v) for v in arch.replace("+PTX", "").split("."))
        except ValueError:
            continue
        if (major == capability[0] and minor <= capability[1]) or (
                arch.endswith("+PTX") and (major, minor) <= tuple(capability)):
            return ""
    return (f"_cuda was built for {archs} (TRUTHGPT_CUDA_ARCHS), which has no code for this GPU "
            f"(compute {cc}); rebuild with TRUTHGPT_CUDA_ARCHS including {cc} or an older arch + '+PTX'")


def unavailable_reason(name: str) -> str:
    """'' when the backend can run here, else why not."""
    if name == "reference":
        return ""
    if name == "cpu":
        return "" if _ext.load("_C")[0] is not None else f"the C++ extension _C is {_ext.load('_C')[1]}"
    if name == "cuda":
        mod, why = _ext.load("_cuda")
        if mod is None:
            return f"the CUDA extension _cuda is {why}"
        if not torch.cuda.is_available():
            return "no CUDA device is visible to torch"
        return cuda_arch_reason(why, torch.cuda.get_device_capability())
    if name == "triton":
        try:
            import triton  # noqa: F401
        except ImportError:
            return "triton is not installed (pip install triton)"
        if torch.cuda.is_available() or triton_interpreted():
            return ""
        return "no CUDA device, and TRITON_INTERPRET=1 is not set"
    raise ValueError(f"unknown backend {name!r}")


def available_backends() -> Dict[str, dict]:
    """{name: {"available": bool, "reason": str}} for every backend."""
    return {b: {"available": not r, "reason": r or "ok"} for b in BACKENDS for r in [unavailable_reason(b)]}


def _triton_module(family: str):
    try:
        return importlib.import_module(f"truthgpt_kernels.triton.{family}")
    except ImportError:
        return None


def implements(family: str, name: str) -> bool:
    """Does backend `name` have kernels for op family `family` (e.g. "attention")?"""
    if name == "reference":
        return True
    if name in ("cpu", "cuda"):
        if _ext.load("_C" if name == "cpu" else "_cuda")[0] is None:
            return False
        key = "CPU" if name == "cpu" else "CUDA"
        try:
            return torch._C._dispatch_has_kernel_for_dispatch_key(f"truthgpt::{family}_fwd", key)
        except RuntimeError:  # no such schema: an extension built before this op family existed
            return False
    if name == "triton":
        return unavailable_reason("triton") == "" and hasattr(_triton_module(family) or (), f"{family}_fwd")
    return False


_CPP_KERNELS: Dict[Tuple[str, str], Callable] = {}


def kernel(family: str, name: str, which: str) -> Callable:
    """The `family_which` kernel ("fwd" or "bwd") of a concrete backend."""
    fn_name = f"{family}_{which}"
    if name in ("cpu", "cuda"):  # the same torch op object for the life of the process
        if torch.compiler.is_compiling():  # (no cache in a traced call: Dynamo would guard on the
            return getattr(torch.ops.truthgpt, fn_name).default  # cache filling and recompile)
        fn = _CPP_KERNELS.get((fn_name, name))
        if fn is None:
            fn = _CPP_KERNELS[(fn_name, name)] = getattr(torch.ops.truthgpt, fn_name).default
        return fn
    if name == "reference":
        if torch.compiler.is_compiling():
            return _reference_kernel(fn_name)
        fn = _CPP_KERNELS.get((fn_name, name))
        if fn is None:
            fn = _CPP_KERNELS[(fn_name, name)] = _reference_kernel(fn_name)
        return fn
    if name == "triton":
        if torch.compiler.is_compiling():
            return _on_tensor_device(getattr(_triton_module(family), fn_name))
        fn = _CPP_KERNELS.get((f"{family}.{fn_name}", name))
        if fn is None:
            fn = _CPP_KERNELS[(f"{family}.{fn_name}", name)] = _on_tensor_device(
                getattr(_triton_module(family), fn_name))
        return fn
    raise BackendError(f"no kernels for backend {name!r}")


def _on_tensor_device(fn: Callable) -> Callable:
    """A Triton launcher run with its first tensor argument's CUDA device current: Triton
    launches on the current device and its stream, so tensors on cuda:1 while cuda:0 is
    current (a model split over GPUs in one process) would run on the wrong GPU."""
    @functools.wraps(fn)
    def run(*args, **kwargs):
        t = next((a for a in args if isinstance(a, torch.Tensor)), None)
        if t is None or not t.is_cuda or t.device.index == torch.cuda.current_device():
            return fn(*args, **kwargs)
        with torch.cuda.device(t.device):
            return fn(*args, **kwargs)
    return run


def _reference_kernel(fn_name: str) -> Callable:
    """The reference backend's kernel `fn_name`, run with autocast off: like the C++ and Triton
    kernels it computes in its own accumulation dtype (autocast would run its float32 products
    in bfloat16; the ops' Python side applies autocast to their inputs first)."""
    from .ops import reference
    raw = getattr(reference, fn_name)

    @functools.wraps(raw)
    def run(*args, **kwargs):
        from .validation import autocast_dtype
        dev = next((a.device.type for a in args if isinstance(a, torch.Tensor)), "cpu")
        if autocast_dtype(dev) is None:
            return raw(*args, **kwargs)
        with torch.autocast(dev, enabled=False):
            return raw(*args, **kwargs)
    return run


def packed_gated_bwd(family: str, name: str, grad: torch.Tensor, gate_up: torch.Tensor, *extra):
    """The (..., 2n) gradient of the packed [gate | up] input of gated activation `family`
    (swiglu, geglu): the C++ CPU kernel `family_bwd_packed` writes it as one tensor; the other
    backends' `family_bwd` halves are concatenated."""
    if name == "cpu":
        return getattr(torch.ops.truthgpt, f"{family}_bwd_packed").default(grad, gate_up, *extra)
    halves = kernel(family, name, "bwd")(grad, *gate_up.chunk(2, dim=-1), *extra)
    return torch.cat(halves, dim=-1)


def _runs_on(name: str, device: torch.device) -> bool:
    if name == "cpu":
        return device.type == "cpu"
    if name == "cuda":
        return device.type == "cuda"
    if name == "triton":
        return device.type == "cuda" or (device.type == "cpu" and triton_interpreted())
    return True


def requested(backend: Optional[str] = None) -> str:
    """The backend name in force for a call: argument > use_backend() > env var > "auto"."""
    return check_name(backend or _selected.get() or os.environ.get(ENV_VAR) or "auto")


def composite_needed() -> bool:
    """True while, in eager mode, a functorch transform (torch.func.grad / vjp / jvp / jacrev /
    jacfwd / hessian / vmap) or a forward-mode AD level (torch.autograd.forward_ad.dual_level)
    is active. The custom ops carry reverse-mode formulas only, which those cannot use
    (torch.library's autograd raises under transforms, and a C++ kernel would drop tangents
    without a word), so then every op runs the "reference" backend as plain PyTorch code,
    which the transforms batch and differentiate themselves (select / call / apply)."""
    if _forward_ad._current_level < 0 and not torch._C._are_functorch_transforms_active():
        return False  # (the common case first: this runs on every op call)
    return not torch.compiler.is_compiling()


def select(family: str, backend: Optional[str], x: torch.Tensor) -> str:
    """Resolves the backend for one call of op family `family` on tensors like `x`; raises
    BackendError naming what is missing when the requested backend cannot serve it. Under
    torch.compile the choice is made once, at trace time, and baked into the graph. Under a
    functorch transform or forward-mode AD (composite_needed) the answer is "reference"."""
    name = _select(family, backend, x.device.type, x.dtype)
    return "reference" if composite_needed() else name


# The CUDA attention kernels' tiles for head dims above 128 need up to 160 KiB of shared memory
# per block (csrc/cuda/attention_kernel.cuh), which sm_80 / sm_90 (and sm_100) give and sm_86 /
# sm_89 / sm_120 (99 KiB) do not.
CUDA_ATTENTION_BIG_HEAD_SMEM = 160 * 1024


def cuda_attention_fits(head_dim: int, smem_optin: int) -> bool:
    """Whether the CUDA attention kernels launch for `head_dim` on a GPU allowing `smem_optin`
    bytes of shared memory per block."""
    return head_dim <= 128 or smem_optin >= CUDA_ATTENTION_BIG_HEAD_SMEM


def _smem_optin(device: torch.device) -> int:
    props = torch.cuda.get_device_properties(device)
    optin = getattr(props, "shared_memory_per_block_optin", None)
    if optin is None:  # older torch: by compute capability
        return 227 * 1024 if props.major in (9, 10) or (props.major, props.minor) == (8, 0) else 99 * 1024
    return int(optin)


def select_attention(family: str, backend: Optional[str], q: torch.Tensor) -> str:
    """select() for the attention families, whose CUDA kernels are the dense ones: where "auto"
    picked "cuda" for a head dim the GPU's shared memory cannot hold (above 128 on sm_86 / sm_89 /
    sm_120), the Triton kernels (their tiles are pruned to the GPU) serve the call instead,
    when available; an explicit backend="cuda" is kept (its launch then says why it fails)."""
    name = select(family, backend, q)
    if name == "cuda" and requested(backend) == "auto" and q.shape[-1] > 128 \
            and not cuda_attention_fits(q.shape[-1], _smem_optin(q.device)) \
            and not unavailable_reason("triton") and implements(family, "triton"):
        return "triton"
    return name


@torch.compiler.assume_constant_result
def _select(family: str, backend: Optional[str], device_type: str, dtype: torch.dtype) -> str:
    name = requested(backend)
    # TRITON_INTERPRET changes the answer only for CPU tensors asked for "triton" ("auto" on the
    # CPU never tries Triton): elsewhere the env var is not read, which keeps a call cheap.
    interpreted = device_type == "cpu" and name == "triton" and triton_interpreted()
    return _resolve(family, name, device_type, dtype, interpreted)


@functools.lru_cache(maxsize=None)
def _resolve(family: str, name: str, device_type: str, dtype: torch.dtype, interpreted: bool) -> str:
    """Cached: what is built and visible does not change within a process (failures, which
    raise, are not cached). A cache miss is the one place that logs the choice (INFO, once per
    distinct key), so a call whose choice is cached pays nothing for logging."""
    chosen, skipped = decide(family, name, device_type, dtype)
    from . import logs
    logs.backend_chosen(family, name, device_type, dtype, chosen, skipped)
    return chosen


def decide(family: str, name: str, device_type: str, dtype: torch.dtype) -> Tuple[str, Tuple[Tuple[str, str], ...]]:
    """(backend, ((candidate, why "auto" skipped it), ...)) for op family `family` asked for
    backend `name` on `device_type` tensors of `dtype`; raises BackendError when `name` cannot
    serve the call. Uncached and silent (tk.explain uses it too)."""
    device = torch.device(device_type)
    if name == "auto":
        skipped = []
        for cand in AUTO_ORDER.get(device.type, ()):
            why = unavailable_reason(cand)
            if not why and not implements(family, cand):
                why = f"has no {family} kernel"
            if not why and dtype not in DTYPES[cand]:
                why = f"does not take {str(dtype).replace('torch.', '')}"
            if not why:
                return cand, tuple(skipped)
            skipped.append((cand, why))
        return "reference", tuple(skipped)
    def servers():  # the backends that could serve this call instead
        return [b for b in BACKENDS if b != name and not unavailable_reason(b) and _runs_on(b, device)
                and implements(family, b) and dtype in DTYPES[b]]

    reason = unavailable_reason(name)
    if reason:
        raise BackendError(f"backend {name!r} is unavailable: {reason}; backends that can serve "
                           f"this call: {servers()}")
    if not _runs_on(name, device):
        need = {"cpu": "CPU tensors", "cuda": "CUDA tensors",
                "triton": "CUDA tensors (or CPU tensors with TRITON_INTERPRET=1)"}[name]
        raise BackendError(f"backend {name!r} needs {need}, but the inputs are on {device}; "
                           f"backends that can serve this call: {servers()}")
    if not implements(family, name):
        raise BackendError(f"backend {name!r} has no {family} kernel; backends that can serve "
                           f"this call: {servers()}")
    if dtype not in DTYPES[name]:
        takes = [str(d).replace("torch.", "") for d in DTYPES[name]]
        raise BackendError(f"backend {name!r} takes {takes}, got {dtype}; backends that can serve "
                           f"this call: {servers()}")
    return name, ()


def register_fake(op, family: str, which: str):
    """Decorator: fn becomes the fake (shape-only) kernel of custom op `op`, whose arguments are
    those of the kernel `family_which` plus the backend name, and also of the C++ kernel
    truthgpt::family_which (the same arguments without the name) when the extension defines it,
    so that a compiled graph can hold that kernel itself (see call)."""
    def register(fn):
        op.register_fake(fn)
        if _ext.load("_C")[0] is not None and hasattr(torch.ops.truthgpt, f"{family}_{which}"):
            torch.library.register_fake(f"truthgpt::{family}_{which}", lambda *args: fn(*args, None))
        return fn
    return register


def empty_bhsd(like: torch.Tensor, shape, backend: Optional[str], dtype=None) -> torch.Tensor:
    """A fake (B, H, S, D) output laid out as the kernel of `backend` lays it (backend None: the
    C++ kernel of like's device): the CPU kernels put it in like's memory order when like, a
    (B, H', S, D) input, is a view of a (B, S, H' * D) projection (stride(1) < stride(2)), so
    that flattening it back to (B, S, H * D) is free (cpu::new_output_bhsd); the others return
    it contiguous."""
    cpu = backend == "cpu" or (backend is None and like.device.type == "cpu")
    if cpu and like.dim() == 4 and like.shape[1] > 1 and like.shape[2] > 1 and like.stride(1) < like.stride(2):
        b, h, s, d = shape
        return like.new_empty((b, s, h, d), dtype=dtype).transpose(1, 2)
    return like.new_empty(shape, dtype=dtype)


# ============================================================================ eager fast path
class _Formulas:
    """What the eager fast path needs of a custom op: its implementation and the autograd
    formulas registered with it (register_autograd)."""
    __slots__ = ("op", "impl", "n_args", "setup_context", "backward", "function")

    def __init__(self, op, impl, setup_context, backward):
        import inspect
        self.op, self.impl, self.setup_context, self.backward = op, impl, setup_context, backward
        self.n_args = len(inspect.signature(impl).parameters)
        # named as torch.library names the op's own autograd.Function, so that grad_fn names
        # (e.g. GeneratedBackwardFor_truthgpt_linear_defaultBackward) do not depend on the path
        name = str(getattr(op, "_opoverload", f"truthgpt.{getattr(op, '_name', 'op')}.default"))
        self.function = type("GeneratedBackwardFor_" + name.replace(".", "_"), (_EagerAutograd,), {})


_FORMULAS: Dict[object, object] = {}  # custom op -> _Formulas, or False: no fast path


def _mode_checks():
    """The torch._C queries of _plain_eager, each true when something must see the op itself
    (a dispatch mode, a torch function mode, a functorch transform, the profiler, whose trace
    names each op); None (no fast path) on a torch that lacks one of them."""
    C = torch._C
    names = ("_len_torch_dispatch_stack", "_is_torch_function_mode_enabled", "_are_functorch_transforms_active")
    checks = [getattr(C, n, None) for n in names] + [getattr(getattr(C, "_autograd", None), "_profiler_enabled", None)]
    return None if any(c is None for c in checks) or not hasattr(C, "_get_tracing_state") else tuple(checks)


_MODE_CHECKS = _mode_checks()
_PLAIN_TENSORS = (torch.Tensor, torch.nn.Parameter)


def _formulas(op):
    """The op's _Formulas, made on first use: only where torch's CustomOpDef exposes the
    implementation function (`_init_fn`, torch 2.4-2.14); without it every call runs the op."""
    f = _FORMULAS.get(op)
    if f is None:
        impl = getattr(op, "_init_fn", None)
        f = _FORMULAS[op] = _Formulas(op, impl, None, None) if callable(impl) else False
    return f


def saveable(*tensors):
    """The tensors, for ctx.save_for_backward: an inference-mode tensor (made under
    torch.inference_mode, e.g. a batch from an inference-mode data pipeline) is cloned, since
    autograd cannot save it, while torch's own composite ops (F.rms_norm, F.silu(g) * u) save
    tensors derived from it and work. The common case costs one flag check per tensor."""
    return tuple(t.clone() if t is not None and t.is_inference() else t for t in tensors)


def register_autograd(op, backward: Callable, setup_context: Callable) -> None:
    """op.register_autograd(backward, setup_context=setup_context), and the same formulas for
    the eager fast path of `apply`."""
    op.register_autograd(backward, setup_context=setup_context)
    f = _formulas(op)
    if f:
        f.setup_context, f.backward = setup_context, backward


class _EagerAutograd(torch.autograd.Function):
    """A custom op's implementation and autograd formulas as one autograd.Function, what
    torch.library builds for it (torch/_library/autograd.py) minus the dispatcher round trip:
    the last forward argument is the op's _Formulas, hidden from setup_context and backward
    (ctx.needs_input_grad is trimmed to the op's inputs while backward runs)."""

    @staticmethod
    def forward(ctx, *args):
        f = args[-1]
        inputs = args[:-1]
        out = f.impl(*inputs)
        f.setup_context(ctx=ctx, inputs=inputs, output=out)
        ctx._truthgpt_formulas = f
        return out

    @staticmethod
    def backward(ctx, *grads):
        needs = ctx.needs_input_grad
        ctx.needs_input_grad = needs[:-1]
        try:
            result = ctx._truthgpt_formulas.backward(ctx, *grads)
        finally:
            ctx.needs_input_grad = needs
        return (*result, None) if isinstance(result, tuple) else (result, None)


def _plain_eager(args) -> bool:
    """True when nothing but plain eager execution is in force: no torch.compile / export
    tracing, no TorchScript tracing, no torch function or dispatch mode (FakeTensorMode,
    FlopCounterMode, ...), no functorch transform, no profiler (whose trace names each op),
    and every tensor argument a plain tensor (not a subclass such as FakeTensor or DTensor).
    Only then may a custom op's dispatcher be bypassed: everything else must see the op."""
    # (apply has ruled out torch.compile: Dynamo must not trace these calls)
    m = _MODE_CHECKS
    if m is None or m[0]() or m[1]() or m[2]() or m[3]() or torch._C._get_tracing_state() is not None:
        return False
    for a in args:
        if isinstance(a, torch.Tensor) and type(a) not in _PLAIN_TENSORS:
            return False
    return True


def apply(op, *args):
    """op(*args) for a custom op of this package. In plain eager mode (see _plain_eager) the
    op's own implementation runs without the custom-op dispatcher: wrapped in _EagerAutograd
    with the op's registered formulas when a gradient may flow, else called directly. That
    dispatcher costs ~10 us a call forward and ~80 us forward + backward in Python (a training
    step of the small preset makes ~120 such calls); results and gradients are the same
    computation. Under torch.compile, tracing, modes or transforms the op itself runs."""
    if torch.compiler.is_compiling():
        return op(*args)
    f = _formulas(op)
    if f and composite_needed() and any(type(a) is str and a == "reference" for a in args):
        return f.impl(*args)  # plain PyTorch, differentiated by the transform / forward AD
    if not f or len(args) != f.n_args or not _plain_eager(args):
        return op(*args)
    if torch.is_grad_enabled() and any(isinstance(a, torch.Tensor) and a.requires_grad for a in args):
        return op(*args) if f.backward is None else f.function.apply(*args, f)
    return f.impl(*args)


def call(op, family: str, which: str, name: str, *args):
    """Runs custom op `op` (whose implementation is kernel(family, name, which)) on args.
    Calls that need no autograd skip the custom op and run the same kernel directly: in eager
    mode the custom-op dispatcher costs tens of microseconds a call, which dominates decoding;
    under torch.compile the C++ kernels (backends "cpu" and "cuda", which have fake kernels, see
    register_fake) go into the graph themselves, so a compiled decoding step runs no Python per
    op. Whenever a gradient may flow, and for the Python backends under torch.compile, the op
    itself runs (through `apply`: in plain eager mode, its implementation and formulas without
    the dispatcher)."""
    if name == "reference" and composite_needed():
        return kernel(family, name, which)(*args)
    if (torch.is_grad_enabled() and any(isinstance(a, torch.Tensor) and a.requires_grad for a in args)) or (
            torch.compiler.is_compiling() and name not in ("cpu", "cuda")):
        return apply(op, *args, name)
    return kernel(family, name, which)(*args)
