"""The validation rules of TransformerConfig: the allowed values, the limits, and
`problems(cfg)`, which lists every problem of a config as (field, message). ConfigError
reports them all at once, before anything is allocated.

Order of the checks: each field's type (from the dataclass annotations), then ranges and
allowed choices, then the rules that tie fields together (heads, windows, sparsity, RoPE
scaling), then the total parameter count.
"""
import difflib
import math
import typing
from dataclasses import fields
from typing import Dict, List, Tuple, Union

MODEL_TYPES = ("decoder", "encoder", "encoder_decoder")
ATTENTION_KINDS = ("full", "sliding_window", "sparse")
POSITION_KINDS = ("rope", "alibi", "relative", "sinusoidal", "learned", "none")
FFN_KINDS = ("swiglu", "geglu", "mlp", "moe")
NORM_KINDS = ("rmsnorm", "layernorm")
DTYPES = ("float32", "bfloat16", "float16", "float64")
BACKENDS = ("auto", "cpu", "cuda", "triton", "reference")
SPARSE_LAYOUTS = ("local", "local_global", "bigbird", "strided")
ROPE_SCALINGS = ("linear", "ntk", "llama3")
MAX_HEAD_DIM = 256

# Upper bounds that catch typos (an extra zero or three) before anything is allocated.
LIMITS = {"vocab_size": 1 << 22, "d_model": 1 << 16, "n_layers": 1024, "n_encoder_layers": 1024,
          "n_heads": 1024, "n_kv_heads": 1024, "d_ff": 1 << 19, "max_seq_len": 1 << 21,
          "n_experts": 1024}
MAX_PARAMETERS = 2e12


class ConfigError(ValueError):
    """An invalid configuration. `problems` is a list of (field, message), every one found."""

    def __init__(self, problems: List[Tuple[str, str]]):
        self.problems = list(problems)
        lines = "\n".join(f"  - {name}: {msg}" for name, msg in self.problems)
        super().__init__(f"invalid TransformerConfig ({len(self.problems)} problem"
                         f"{'s' if len(self.problems) != 1 else ''}):\n{lines}")

    @property
    def fields(self) -> List[str]:
        return [name for name, _ in self.problems]


def did_you_mean(value, choices, prefix: str = "", upper: bool = False) -> str:
    """' (did you mean 'x'?)' for the closest of `choices`, or ''."""
    if not isinstance(value, str):
        return ""
    close = difflib.get_close_matches(value, list(choices), n=1, cutoff=0.6)
    if not close:
        return ""
    best = (prefix + close[0].upper()) if upper else close[0]
    return f" (did you mean {best!r}?)"


def _type_problem(value, hint) -> str:
    """'' if value fits the annotation, else a message."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin is Union:
        if value is None and type(None) in args:
            return ""
        inner = [a for a in args if a is not type(None)]
        if all(_type_problem(value, a) for a in inner):
            want = " or ".join(_type_name(a) for a in inner)
            return f"must be {want}{' or null' if type(None) in args else ''}, got {value!r}"
        return ""
    if value is None:
        return f"must be {_type_name(hint)}, got null"
    if hint is bool:
        return "" if isinstance(value, bool) else f"must be true or false, got {value!r}"
    if hint is int:
        return "" if isinstance(value, int) and not isinstance(value, bool) else \
            f"must be an integer, got {value!r}"
    if hint is float:
        return "" if isinstance(value, (int, float)) and not isinstance(value, bool) else \
            f"must be a number, got {value!r}"
    if hint is str:
        return "" if isinstance(value, str) else f"must be a string, got {value!r}"
    if origin in (list, List):
        return "" if isinstance(value, (list, tuple)) else f"must be a list, got {value!r}"
    if origin in (dict, Dict):
        return "" if isinstance(value, dict) else f"must be a mapping, got {value!r}"
    return ""


def _type_name(hint) -> str:
    origin = typing.get_origin(hint)
    if origin in (list, List):
        return "a list"
    if origin in (dict, Dict):
        return "a mapping"
    return {int: "an integer", float: "a number", bool: "true/false", str: "a string"}.get(hint, str(hint))


def _window_problems(window) -> List[str]:
    if window is None:
        return []
    if isinstance(window, int):
        return [] if window >= 1 else [f"an integer window must be >= 1, got {window}"]
    if len(window) != 2 or any(isinstance(w, bool) or not isinstance(w, int) for w in window):
        return [f"must be an integer W or a pair [left, right] of integers, got {window!r}"]
    if any(w < -1 for w in window):
        return [f"left and right must be >= -1 (-1 = unbounded), got {list(window)}"]
    return []


_LAYOUT_PARAMS = {
    "local": {"num_local_blocks"},
    "local_global": {"num_local_blocks", "global_blocks"},
    "bigbird": {"num_local_blocks", "num_global_blocks", "num_random_blocks", "seed"},
    "strided": {"stride"},
}


def _sparsity_problems(sparsity) -> List[str]:
    if sparsity is None:
        return []
    layout = sparsity.get("layout")
    if layout not in SPARSE_LAYOUTS:
        return [f"layout must be one of {', '.join(SPARSE_LAYOUTS)}, got {layout!r}"
                + did_you_mean(layout, SPARSE_LAYOUTS)]
    out = []
    allowed = _LAYOUT_PARAMS[layout] | {"layout", "block_size"}
    for key in sparsity:
        if key not in allowed:
            out.append(f"unknown parameter {key!r} for layout {layout!r}; allowed: "
                       f"{', '.join(sorted(allowed))}" + did_you_mean(key, allowed))
    bs = sparsity.get("block_size", 64)
    if isinstance(bs, bool) or not isinstance(bs, int) or bs < 1:
        out.append(f"block_size must be a positive integer, got {bs!r}")
    return out


def _rope_scaling_problems(scaling) -> List[str]:
    if scaling is None:
        return []
    kind = scaling.get("type")
    if kind not in ROPE_SCALINGS:
        return [f"type must be one of {', '.join(ROPE_SCALINGS)}, got {kind!r}" + did_you_mean(kind, ROPE_SCALINGS)]
    if kind != "llama3" and "factor" not in scaling:
        return [f"scaling type {kind!r} needs a 'factor'"]
    f = scaling.get("factor", 8.0)
    if isinstance(f, bool) or not isinstance(f, (int, float)) or f <= 0:
        return [f"factor must be a positive number, got {f!r}"]
    return []


# ----------------------------------------------------------------------------- the rules
def problems(cfg) -> List[Tuple[str, str]]:
    """Every problem of a TransformerConfig, as (field, message); empty when it is valid.
    A field whose type is wrong is not checked further (one message per cause)."""
    out: List[Tuple[str, str]] = []
    hints = typing.get_type_hints(type(cfg))
    bad = set()
    for f in fields(cfg):
        msg = _type_problem(getattr(cfg, f.name), hints[f.name])
        if msg:
            out.append((f.name, msg))
            bad.add(f.name)

    def ok(*names):
        return not any(n in bad for n in names)

    def positive(name, allow_none=False):
        v = getattr(cfg, name)
        if not ok(name) or (v is None and allow_none):
            return
        if v <= 0:
            out.append((name, f"must be positive, got {v}"))
            bad.add(name)
        elif name in LIMITS and v > LIMITS[name]:
            out.append((name, f"{v} is absurdly large (limit {LIMITS[name]}); a typo?"))
            bad.add(name)

    for name in ("vocab_size", "d_model", "n_layers", "n_heads", "max_seq_len",
                 "ffn_multiple_of", "n_experts", "experts_top_k", "relative_buckets",
                 "relative_max_distance"):
        positive(name)
    for name in ("n_encoder_layers", "n_kv_heads", "d_ff", "rotary_dim"):
        positive(name, allow_none=True)
    if cfg.ffn == "moe":
        positive("capacity_factor", allow_none=True)

    for name, choices in (("model_type", MODEL_TYPES), ("attention", ATTENTION_KINDS),
                          ("position", POSITION_KINDS), ("ffn", FFN_KINDS),
                          ("norm", NORM_KINDS), ("dtype", DTYPES), ("backend", BACKENDS)):
        v = getattr(cfg, name)
        if ok(name) and v not in choices:
            out.append((name, f"unknown {name} {v!r}; allowed: {', '.join(choices)}"
                              + did_you_mean(v, choices)))
            bad.add(name)

    if ok("d_model", "n_heads"):
        if cfg.d_model % cfg.n_heads:
            out.append(("d_model", f"d_model ({cfg.d_model}) must be divisible by "
                                   f"n_heads ({cfg.n_heads})"))
        elif cfg.head_dim > MAX_HEAD_DIM:
            out.append(("n_heads", f"head dim d_model / n_heads = {cfg.head_dim} exceeds "
                                   f"{MAX_HEAD_DIM}; use more heads"))
        elif ok("rotary_dim") and cfg.rotary_dim is not None and (
                cfg.rotary_dim > cfg.head_dim or cfg.rotary_dim % 2):
            out.append(("rotary_dim", f"must be even and <= head dim {cfg.head_dim}, "
                                      f"got {cfg.rotary_dim}"))
    if ok("n_heads", "n_kv_heads") and cfg.n_kv_heads is not None and \
            cfg.n_heads % cfg.n_kv_heads:
        out.append(("n_kv_heads", f"n_heads ({cfg.n_heads}) must be a multiple of "
                                  f"n_kv_heads ({cfg.n_kv_heads})"))
    if ok("experts_top_k", "n_experts") and cfg.experts_top_k > cfg.n_experts:
        out.append(("experts_top_k", f"experts_top_k ({cfg.experts_top_k}) exceeds "
                                     f"n_experts ({cfg.n_experts})"))
    for name in ("dropout", "attn_dropout"):
        if ok(name) and not 0.0 <= getattr(cfg, name) < 1.0:
            out.append((name, f"must lie in [0, 1), got {getattr(cfg, name)}"))
    if cfg.position == "relative" and ok("relative_buckets", "relative_max_distance"):
        if cfg.relative_buckets < 4 or cfg.relative_buckets % 2:
            out.append(("relative_buckets", f"must be an even number >= 4 (half the buckets per "
                                            f"direction in encoders), got {cfg.relative_buckets}"))
        elif cfg.relative_max_distance <= cfg.relative_buckets // 2:
            out.append(("relative_max_distance", f"must exceed relative_buckets / 2 "
                                                 f"({cfg.relative_buckets // 2}), got "
                                                 f"{cfg.relative_max_distance}"))
    if ok("norm_eps") and not 0.0 < cfg.norm_eps < 1.0:
        out.append(("norm_eps", f"must lie in (0, 1), got {cfg.norm_eps}"))
    for name in ("softcap", "moe_aux_loss_weight"):  # (not x >= 0: NaN fails too)
        if ok(name) and not 0 <= getattr(cfg, name) < math.inf:
            out.append((name, f"must be finite and >= 0, got {getattr(cfg, name)}"))
    for name in ("rope_base", "init_std"):
        if ok(name) and not 0 < getattr(cfg, name) < math.inf:
            out.append((name, f"must be finite and positive, got {getattr(cfg, name)}"))

    if ok("window"):
        out += [("window", m) for m in _window_problems(cfg.window)]
    if ok("window", "attention"):
        if cfg.attention == "sliding_window" and cfg.window is None:
            out.append(("window", "attention 'sliding_window' needs a window: W or [left, right]"))
        if cfg.attention != "sliding_window" and cfg.window is not None:
            out.append(("window", f"a window is set but attention is {cfg.attention!r}; "
                                  "set attention: sliding_window"))
    if ok("sparsity"):
        out += [("sparsity", m) for m in _sparsity_problems(cfg.sparsity)]
    if ok("sparsity", "attention"):
        if cfg.attention == "sparse" and cfg.sparsity is None:
            out.append(("sparsity", "attention 'sparse' needs sparsity: "
                                    "{layout: " + "|".join(SPARSE_LAYOUTS) + ", ...}"))
        if cfg.attention != "sparse" and cfg.sparsity is not None:
            out.append(("sparsity", f"sparsity is set but attention is {cfg.attention!r}; "
                                    "set attention: sparse"))
    if ok("rope_scaling"):
        out += [("rope_scaling", m) for m in _rope_scaling_problems(cfg.rope_scaling)]
    if not out and cfg.num_parameters() > MAX_PARAMETERS:
        out.append(("d_model", f"the model would have {cfg.num_parameters():.3g} parameters "
                               f"(limit {MAX_PARAMETERS:.0e}); a typo in the sizes?"))
    return out
