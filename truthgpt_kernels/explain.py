"""tk.explain: which backend and kernel path each op would take, and why, without running a
kernel. For one op on given inputs (`tk.explain("attention", q, k, v, causal=True)`), or for
every op a model config would call (`tk.explain(config)`, `python -m truthgpt_kernels explain
--config FILE`). The decision is backends.decide (what the ops use); CPU kernel paths come
from the C++ extension (truthgpt_info ops, csrc/cpu/info.cpp): the same runtime choices the
kernels make (CPU features, TRUTHGPT_CPU_ISA, TRUTHGPT_CPU_ATTN, tile plan, key splits).
"""
import os
from dataclasses import asdict, dataclass
from typing import List, Optional

import torch
from torch import Tensor

from . import _ext, backends

FAMILIES = ("attention", "rotary", "rms_norm", "swiglu", "linear")
# public op name -> op family (tk.explain accepts either)
OPS = {"attention": "attention", "apply_rotary": "rotary", "apply_rotary_qk": "rotary",
       "rotary": "rotary", "rms_norm": "rms_norm", "swiglu": "swiglu", "linear": "linear"}


def _info_ops():
    if _ext.load("_C")[0] is None:
        return None
    try:
        return torch.ops.truthgpt_info
    except (AttributeError, RuntimeError):
        return None


def kernel_path(family: str, backend: str, device_type: str, dtype: torch.dtype) -> str:
    """A short description of the kernels `backend` runs for `family` on such inputs."""
    if backend == "cpu":
        info = _info_ops()
        detail = info.cpu_path(family, dtype) if info is not None and hasattr(info, "cpu_path") else "kernels"
        return f"C++ CPU {detail}"
    if backend == "cuda":
        return f"CUDA C++ kernels (csrc/cuda/{family})"
    if backend == "triton":
        interp = " under the Triton interpreter (slow)" if backends.triton_interpreted() else ""
        return f"Triton kernels (truthgpt_kernels/triton/{family}.py){interp}"
    if backend == "reference":
        dense = ", dense (Sq x Sk) scores" if family == "attention" else ""
        return f"PyTorch reference (ops/reference.py){dense}"
    return ""


@dataclass
class Decision:
    op: str          # what runs: "attention", "attention (decode)", "rms_norm", ...
    family: str      # the op family (backends.py)
    device: str
    dtype: str
    requested: str   # the backend name in force: argument > use_backend() > env var > "auto"
    backend: str     # the backend that runs, or "error" when the call would raise
    path: str        # kernel path
    reason: str      # why this backend


class Explanation(list):
    """A list of Decision; str() is a table."""

    @property
    def backends(self):
        return {d.op: d.backend for d in self}

    def to_dicts(self) -> List[dict]:
        return [asdict(d) for d in self]

    def __str__(self) -> str:
        rows = [(d.op, f"{d.device} {d.dtype}", d.backend, d.path, d.reason) for d in self]
        head = ("op", "inputs", "backend", "kernel path", "why")
        w = [max(len(r[i]) for r in rows + [head]) for i in range(3)]
        lines = []
        for r in [head] + rows:
            lines.append(f"{r[0]:<{w[0]}}  {r[1]:<{w[1]}}  {r[2]:<{w[2]}}  {r[3]}")
            if r[4] and r is not head:
                lines.append(f"{'':<{w[0]}}  {'':<{w[1]}}  {'':<{w[2]}}    why: {r[4]}")
        return "\n".join(lines)


def _source(arg: Optional[str], what: str = "backend= argument") -> str:
    if arg:
        return f"{what} ({arg!r})"
    if backends._selected.get():
        return f"use_backend({backends._selected.get()!r})"
    if os.environ.get(backends.ENV_VAR):
        return f"{backends.ENV_VAR}={os.environ[backends.ENV_VAR]}"
    return "auto"


def decision(op: str, family: str, device_type: str, dtype: torch.dtype, backend: Optional[str] = None,
             *, source: str = "backend= argument", plan=None) -> Decision:
    """The Decision for one call of `family` on `device_type` tensors of `dtype`. `plan`, if
    given, is called with the chosen backend and may return a more precise kernel path."""
    requested = backends.requested(backend)
    dt = str(dtype).replace("torch.", "")
    try:
        chosen, skipped = backends.decide(family, requested, device_type, dtype)
    except backends.BackendError as e:
        return Decision(op, family, device_type, dt, requested, "error", "", f"raises BackendError: {e}")
    if requested == "auto":
        cands = backends.AUTO_ORDER.get(device_type, ())
        if chosen != "reference":
            reason = f"auto: the first of {', '.join(cands)} that can serve it"
        elif cands:
            reason = "auto: no kernel backend can serve it"
        else:
            reason = f"auto: no kernel backend for {device_type} tensors"
        reason += "".join(f"; skipped {b}: {r}" for b, r in skipped)
    else:
        reason = f"requested by {_source(backend, source)}"
    path = (plan(chosen) if plan is not None else None) or kernel_path(family, chosen, device_type, dtype)
    return Decision(op, family, device_type, dt, requested, chosen, path, reason)


def _attention_plan(q: Tensor, k: Tensor, *, causal=False, scale=None, alibi_slopes=None, window=None,
                    block_mask=None, block_size=64, key_mask=None, softcap=0.0, **_):
    """The CPU attention kernel's plan for these inputs (tiles, key splits, backward schedule)."""
    def plan(chosen: str) -> Optional[str]:
        info = _info_ops()
        if chosen != "cpu" or q.device.type != "cpu" or info is None or not hasattr(info, "attention_plan"):
            return None
        from .validation import check_window
        left, right = check_window(bool(causal), window)
        B, Hq, Sq, _D = q.shape
        sc = q.shape[-1] ** -0.5 if scale is None else float(scale)
        alibi = None if alibi_slopes is None else alibi_slopes.expand(B, Hq)
        return "C++ CPU " + info.attention_plan(q, k, sc, left, right, alibi, block_mask, block_size,
                                                 key_mask, float(softcap))
    return plan


def explain_op(op: str, *tensors: Tensor, backend: Optional[str] = None, **options) -> Explanation:
    """One Decision for public op `op` (a name in OPS) called on `tensors` with `options`."""
    if op not in OPS:
        raise ValueError(f"op must be one of {', '.join(OPS)}, got {op!r}")
    if not tensors or not all(isinstance(t, Tensor) for t in tensors):
        raise ValueError(f"explain({op!r}, ...) needs the op's input tensors")
    family, x = OPS[op], tensors[0]
    plan = None
    if family == "attention":
        if len(tensors) < 2 or x.dim() != 4 or tensors[1].dim() != 4:
            raise ValueError("explain('attention', q, k, v) needs 4-d q and k (B, H, S, D)")
        plan = _attention_plan(x, tensors[1], **options)
    return Explanation([decision(op, family, x.device.type, x.dtype, backend, plan=plan)])


def explain_config(config, *, device: str = "cpu", dtype=None, batch_size: int = 1,
                   seq_len: Optional[int] = None) -> Explanation:
    """The Decisions for every op a model built from `config` would call: attention over a
    batch of `batch_size` x `seq_len` tokens (default min(max_seq_len, 512)), one decoding step
    against that many cached keys (decoders), rotary, RMSNorm and SwiGLU as configured.
    `dtype` overrides the config's (e.g. torch.bfloat16 for autocast)."""
    from .config import TransformerConfig
    from .modules.attention import Attention
    if isinstance(config, str):
        config = TransformerConfig.load(config, env=False)
    elif isinstance(config, dict):
        config = TransformerConfig.from_dict(config)
    elif isinstance(config, torch.nn.Module) and isinstance(getattr(config, "config", None), TransformerConfig):
        p = next(config.parameters())
        device, dtype, config = str(p.device), dtype or p.dtype, config.config
    if not isinstance(config, TransformerConfig):
        raise TypeError(f"explain() takes a TransformerConfig, a dict, a config file path or a "
                        f"Transformer; got {type(config).__name__}")
    dev = torch.device(device)
    dtype = dtype or config.torch_dtype
    S = seq_len or min(config.max_seq_len, 512)
    B, Hq, Hkv, D = batch_size, config.n_heads, config.kv_heads, config.head_dim
    src = "config backend"
    att_src = "config use_flash_attention=False" if not config.use_flash_attention else src
    out = Explanation()
    causal = config.model_type != "encoder"
    # the attention module's own window and block-sparse layout, built on the meta device
    attn = Attention(config.d_model, Hq, Hkv, causal=causal, position="none", window=config.window,
                     sparsity=config.sparsity, max_seq_len=config.max_seq_len, softcap=config.softcap,
                     device="meta")
    alibi = None
    if config.position == "alibi":
        from .ops import alibi_slopes
        alibi = alibi_slopes(Hq)
    shapes = [("attention", S, S)] + ([("attention (decode)", 1, S)] if config.model_type != "encoder" else [])
    for op, Sq, Sk in shapes:
        plan = None
        if dev.type == "cpu":
            q = torch.empty(1, 1, 1, D, dtype=dtype).expand(B, Hq, Sq, D)
            k = torch.empty(1, 1, 1, D, dtype=dtype).expand(B, Hkv, Sk, D)
            bm = attn._block_mask(Sq, Sk, dev) if attn.sparsity else None
            plan = _attention_plan(q, k, causal=causal, window=attn.window, alibi_slopes=alibi, block_mask=bm,
                                   block_size=attn.sparsity["block_size"] if attn.sparsity else 64,
                                   softcap=config.softcap)
        out.append(decision(op, "attention", dev.type, dtype, config.attention_backend, source=att_src, plan=plan))
    if config.position == "rope":  # the attention module's rotary embedding: attention's backend
        out.append(decision("rotary", "rotary", dev.type, dtype, config.attention_backend, source=att_src))
    norm = "rms_norm" if config.norm == "rmsnorm" else "layer_norm"
    out.append(decision(norm, norm, dev.type, dtype, config.op_backend, source=src))
    if norm == "rms_norm" and out[-1].backend == "cpu" and backends.implements("add_rms_norm", "cpu"):
        # the blocks' residual add + norm before the feed-forward (modules.norm.add_norm)
        out.append(decision("add_rms_norm (residual add)", "add_rms_norm", dev.type, dtype, "cpu",
                            source="the C++ CPU rms_norm"))
    if config.ffn in ("swiglu", "moe", "geglu"):
        ffn = "geglu" if config.ffn == "geglu" else "swiglu"
        out.append(decision(ffn, ffn, dev.type, dtype, config.op_backend, source=src))
    # the projections and lm_head (tk.modules.Linear) always choose automatically
    out.append(decision("linear (projections)", "linear", dev.type, dtype, "auto", source="tk.modules.Linear"))
    return out


def explain(target, *tensors: Tensor, backend: Optional[str] = None, device: str = "cpu", dtype=None,
            batch_size: int = 1, seq_len: Optional[int] = None, **options) -> Explanation:
    """Which backend and kernel path each op would take, and why; runs no kernel.

    - `explain("attention", q, k, v, causal=True, ...)` (or "rms_norm", "swiglu",
      "apply_rotary", "apply_rotary_qk" with their inputs and options): that one call.
    - `explain(config)` with a TransformerConfig, a dict, a YAML/JSON file path or a
      Transformer: every op the model would call, on `device` in `dtype` (default: the
      config's), for a batch of `batch_size` x `seq_len` tokens.
    Returns an Explanation (a list of Decision; print it for a table)."""
    if isinstance(target, str) and target in OPS:
        return explain_op(target, *tensors, backend=backend, **options)
    if isinstance(target, str) and not os.path.isfile(target):
        raise ValueError(f"explain: {target!r} is neither an op name ({', '.join(OPS)}) nor a config file")
    if tensors or options or backend is not None:
        raise ValueError("explain(config, ...) takes device=, dtype=, batch_size= and seq_len= only; "
                         f"op names for single calls are {', '.join(OPS)}")
    return explain_config(target, device=device, dtype=dtype, batch_size=batch_size, seq_len=seq_len)
