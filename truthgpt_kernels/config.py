"""TransformerConfig: one dataclass describing a model, with validation and loading.

Sources, weakest first: the field defaults < a preset (`preset: small` in a file or dict) <
a YAML/JSON file (and the profile chosen in it) < environment variables `TRUTHGPT_<FIELD>` <
keyword overrides:

    cfg = TransformerConfig.load("configs/profiles.yaml", profile="testing", n_layers=4)
    cfg = TransformerConfig.preset("small", backend="cpu")

Every invalid value raises one ConfigError that lists every problem by field name, before
anything is allocated.
"""
import dataclasses
import difflib
import json
import math
import os
import typing
from dataclasses import dataclass, fields
from typing import Any, Dict, List, Optional, Tuple, Union

ENV_PREFIX = "TRUTHGPT_"

MODEL_TYPES = ("decoder", "encoder", "encoder_decoder")
ATTENTION_KINDS = ("full", "sliding_window", "sparse")
POSITION_KINDS = ("rope", "alibi", "sinusoidal", "learned", "none")
FFN_KINDS = ("swiglu", "mlp", "moe")
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

# TRUTHGPT_* variables that belong to other parts of the package, never config fields.
RESERVED_ENV = {"PROFILE", "CONFIG", "BUILD_CUDA", "CUDA_ARCHS", "DEBUG", "CPU_NATIVE", "LOG_LEVEL"}
RESERVED_ENV_PREFIXES = ("BUILD_", "BENCH_", "TEST_")


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


# ----------------------------------------------------------------------------- presets (data)
PRESETS: Dict[str, Dict[str, Any]] = {
    # tests, examples and the synthetic task: byte-level vocabulary, trains in seconds on a CPU
    "tiny": dict(vocab_size=256, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=192,
                 max_seq_len=128, tie_embeddings=True),
    # benchmarks: a 6-layer model with a 32k vocabulary (~36M parameters)
    "small": dict(vocab_size=32000, d_model=512, n_layers=6, n_heads=8, n_kv_heads=8,
                  d_ff=1408, max_seq_len=2048, tie_embeddings=True),
    # GPT-2-base-sized Llama-style model (~110M parameters)
    "base": dict(vocab_size=32000, d_model=768, n_layers=12, n_heads=12, n_kv_heads=12,
                 d_ff=2048, max_seq_len=2048, tie_embeddings=True),
    # Llama 2 7B (Touvron et al. 2023)
    "llama-7b": dict(vocab_size=32000, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=32,
                     d_ff=11008, max_seq_len=4096, norm_eps=1e-5, tie_embeddings=False,
                     rope_base=10000.0),
}


@dataclass
class TransformerConfig:
    # what model
    model_type: str = "decoder"              # decoder (causal LM) | encoder | encoder_decoder
    # sizes
    vocab_size: int = 32000
    d_model: int = 512
    n_layers: int = 6                        # decoder layers (encoder layers for "encoder")
    n_encoder_layers: Optional[int] = None   # encoder_decoder only; None = n_layers
    n_heads: int = 8
    n_kv_heads: Optional[int] = None         # GQA/MQA; None = n_heads
    d_ff: Optional[int] = None               # None: 8/3 d_model (swiglu, moe) or 4 d_model (mlp),
    ffn_multiple_of: int = 64                # ... rounded up to a multiple of this
    max_seq_len: int = 2048
    # attention
    attention: str = "full"                  # full | sliding_window | sparse
    window: Optional[Union[int, List[int]]] = None  # sliding_window: W or [left, right], -1 = unbounded
    sparsity: Optional[Dict[str, Any]] = None  # sparse: {"layout": "bigbird", "block_size": 64, ...}
    use_flash_attention: bool = True         # False: the dense PyTorch reference (for debugging)
    softcap: float = 0.0
    # positions
    position: str = "rope"                   # rope | alibi | sinusoidal | learned | none
    rope_base: float = 10000.0
    rope_scaling: Optional[Dict[str, Any]] = None  # {"type": "linear"|"ntk"|"llama3", "factor": f, ...}
    rotary_dim: Optional[int] = None         # partial rotary; None = head_dim
    # feed-forward
    ffn: str = "swiglu"                      # swiglu | mlp | moe
    n_experts: int = 8
    experts_top_k: int = 2
    capacity_factor: Optional[float] = None  # None: no token is ever dropped
    moe_aux_loss_weight: float = 0.01
    # norms, regularisation, init
    norm: str = "rmsnorm"                    # rmsnorm | layernorm
    norm_eps: float = 1e-5
    dropout: float = 0.0
    bias: bool = False
    tie_embeddings: bool = True
    init_std: float = 0.02
    # execution
    backend: str = "auto"                    # auto defers to use_backend() / TRUTHGPT_BACKEND
    dtype: str = "float32"
    gradient_checkpointing: bool = False

    def __post_init__(self):
        if isinstance(self.window, tuple):
            self.window = list(self.window)
        self.validate()

    # ------------------------------------------------------------------ derived values
    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def kv_heads(self) -> int:
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

    @property
    def ffn_dim(self) -> int:
        if self.d_ff is not None:
            return self.d_ff
        hidden = 4 * self.d_model if self.ffn == "mlp" else int(8 * self.d_model / 3)
        m = self.ffn_multiple_of
        return m * math.ceil(hidden / m)

    @property
    def encoder_layers(self) -> int:
        return self.n_layers if self.n_encoder_layers is None else self.n_encoder_layers

    @property
    def causal(self) -> bool:
        return self.model_type != "encoder"

    @property
    def window_tuple(self) -> Optional[Tuple[int, int]]:
        """(left, right) for tk.attention; an int W means the W previous tokens (and, for an
        encoder, the W following ones)."""
        if self.window is None:
            return None
        if isinstance(self.window, int):
            return (self.window, 0 if self.causal else self.window)
        return (int(self.window[0]), int(self.window[1]))

    @property
    def torch_dtype(self):
        import torch
        return getattr(torch, self.dtype)

    @property
    def attention_backend(self) -> Optional[str]:
        """The backend= for attention ops: None defers to use_backend() / env / auto."""
        if not self.use_flash_attention:
            return "reference"
        return None if self.backend == "auto" else self.backend

    @property
    def op_backend(self) -> Optional[str]:
        return None if self.backend == "auto" else self.backend

    def num_parameters(self) -> int:
        """Parameter count of the model this config builds (computed, nothing allocated)."""
        d, f, hd = self.d_model, self.ffn_dim, self.head_dim
        attn = d * (self.n_heads + 2 * self.kv_heads) * hd + self.n_heads * hd * d
        if self.bias:
            attn += (self.n_heads + 2 * self.kv_heads) * hd + d
        if self.ffn == "mlp":
            ffn = 2 * d * f + ((f + d) if self.bias else 0)
        elif self.ffn == "swiglu":
            ffn = 3 * d * f
        else:
            ffn = self.n_experts * 3 * d * f + d * self.n_experts
        norm = d if self.norm == "rmsnorm" else 2 * d
        block = attn + ffn + 2 * norm
        n = self.vocab_size * d + norm
        if self.model_type == "encoder_decoder":
            n += self.encoder_layers * block + norm
            n += self.n_layers * (block + attn + norm)
        else:
            n += self.n_layers * block
        if not self.tie_embeddings:
            n += self.vocab_size * d
        if self.position == "learned":
            n += self.max_seq_len * d
        return int(n)

    # ------------------------------------------------------------------ validation
    def problems(self) -> List[Tuple[str, str]]:
        """Every problem found, as (field, message); empty when the config is valid."""
        out: List[Tuple[str, str]] = []
        hints = typing.get_type_hints(type(self))
        bad = set()
        for f in fields(self):
            msg = _type_problem(getattr(self, f.name), hints[f.name])
            if msg:
                out.append((f.name, msg))
                bad.add(f.name)

        def ok(*names):
            return not any(n in bad for n in names)

        def positive(name, allow_none=False):
            v = getattr(self, name)
            if not ok(name) or (v is None and allow_none):
                return
            if v <= 0:
                out.append((name, f"must be positive, got {v}"))
                bad.add(name)
            elif name in LIMITS and v > LIMITS[name]:
                out.append((name, f"{v} is absurdly large (limit {LIMITS[name]}); a typo?"))
                bad.add(name)

        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "max_seq_len",
                     "ffn_multiple_of", "n_experts", "experts_top_k"):
            positive(name)
        for name in ("n_encoder_layers", "n_kv_heads", "d_ff", "rotary_dim"):
            positive(name, allow_none=True)
        if self.ffn == "moe":
            positive("capacity_factor", allow_none=True)

        for name, choices in (("model_type", MODEL_TYPES), ("attention", ATTENTION_KINDS),
                              ("position", POSITION_KINDS), ("ffn", FFN_KINDS),
                              ("norm", NORM_KINDS), ("dtype", DTYPES), ("backend", BACKENDS)):
            v = getattr(self, name)
            if ok(name) and v not in choices:
                out.append((name, f"unknown {name} {v!r}; allowed: {', '.join(choices)}"
                                  + _hint(v, choices)))
                bad.add(name)

        if ok("d_model", "n_heads"):
            if self.d_model % self.n_heads:
                out.append(("d_model", f"d_model ({self.d_model}) must be divisible by "
                                       f"n_heads ({self.n_heads})"))
            elif self.head_dim > MAX_HEAD_DIM:
                out.append(("n_heads", f"head dim d_model / n_heads = {self.head_dim} exceeds "
                                       f"{MAX_HEAD_DIM}; use more heads"))
            elif ok("rotary_dim") and self.rotary_dim is not None and (
                    self.rotary_dim > self.head_dim or self.rotary_dim % 2):
                out.append(("rotary_dim", f"must be even and <= head dim {self.head_dim}, "
                                          f"got {self.rotary_dim}"))
        if ok("n_heads", "n_kv_heads") and self.n_kv_heads is not None and \
                self.n_heads % self.n_kv_heads:
            out.append(("n_kv_heads", f"n_heads ({self.n_heads}) must be a multiple of "
                                      f"n_kv_heads ({self.n_kv_heads})"))
        if ok("experts_top_k", "n_experts") and self.experts_top_k > self.n_experts:
            out.append(("experts_top_k", f"experts_top_k ({self.experts_top_k}) exceeds "
                                         f"n_experts ({self.n_experts})"))
        if ok("dropout") and not 0.0 <= self.dropout < 1.0:
            out.append(("dropout", f"must lie in [0, 1), got {self.dropout}"))
        if ok("norm_eps") and not 0.0 < self.norm_eps < 1.0:
            out.append(("norm_eps", f"must lie in (0, 1), got {self.norm_eps}"))
        for name in ("softcap", "moe_aux_loss_weight"):
            if ok(name) and getattr(self, name) < 0:
                out.append((name, f"must be >= 0, got {getattr(self, name)}"))
        for name in ("rope_base", "init_std"):
            if ok(name) and getattr(self, name) <= 0:
                out.append((name, f"must be positive, got {getattr(self, name)}"))

        if ok("window"):
            out += [("window", m) for m in _window_problems(self.window)]
        if ok("window", "attention"):
            if self.attention == "sliding_window" and self.window is None:
                out.append(("window", "attention 'sliding_window' needs a window: W or [left, right]"))
            if self.attention != "sliding_window" and self.window is not None:
                out.append(("window", f"a window is set but attention is {self.attention!r}; "
                                      "set attention: sliding_window"))
        if ok("sparsity"):
            out += [("sparsity", m) for m in _sparsity_problems(self.sparsity)]
        if ok("sparsity", "attention"):
            if self.attention == "sparse" and self.sparsity is None:
                out.append(("sparsity", "attention 'sparse' needs sparsity: "
                                        "{layout: " + "|".join(SPARSE_LAYOUTS) + ", ...}"))
            if self.attention != "sparse" and self.sparsity is not None:
                out.append(("sparsity", f"sparsity is set but attention is {self.attention!r}; "
                                        "set attention: sparse"))
        if ok("rope_scaling"):
            out += [("rope_scaling", m) for m in _rope_scaling_problems(self.rope_scaling)]
        if not out and self.num_parameters() > MAX_PARAMETERS:
            out.append(("d_model", f"the model would have {self.num_parameters():.3g} parameters "
                                   f"(limit {MAX_PARAMETERS:.0e}); a typo in the sizes?"))
        return out

    def validate(self) -> "TransformerConfig":
        problems = self.problems()
        if problems:
            raise ConfigError(problems)
        return self

    # ------------------------------------------------------------------ construction
    @classmethod
    def field_names(cls) -> List[str]:
        return [f.name for f in fields(cls)]

    @classmethod
    def preset(cls, name: str, **overrides) -> "TransformerConfig":
        return cls.from_dict({"preset": name, **overrides})

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "TransformerConfig":
        """Fields from a dict; an optional `preset` key names the base values."""
        if not isinstance(d, dict):
            raise ConfigError([("<config>", f"expected a mapping of fields, got {type(d).__name__}")])
        return cls(**_resolve(d))

    @classmethod
    def from_json(cls, path_or_text: str) -> "TransformerConfig":
        return cls.from_dict(_read(path_or_text, "json"))

    @classmethod
    def from_yaml(cls, path_or_text: str, profile: Optional[str] = None) -> "TransformerConfig":
        return cls.from_dict(_select_profile(_read(path_or_text, "yaml"), profile, path_or_text))

    @classmethod
    def env_overrides(cls, prefix: str = ENV_PREFIX, environ=None) -> Dict[str, Any]:
        """The fields set by `<prefix><FIELD>` variables, parsed to the field types."""
        environ = os.environ if environ is None else environ
        hints = typing.get_type_hints(cls)
        names = cls.field_names()
        out, problems = {}, []
        for key, raw in sorted(environ.items()):
            if not key.startswith(prefix):
                continue
            rest = key[len(prefix):]
            if prefix == ENV_PREFIX and (rest in RESERVED_ENV or rest.startswith(RESERVED_ENV_PREFIXES)):
                continue
            name = rest.lower()
            if name == "preset":  # TRUTHGPT_PRESET=small: the base values
                out["preset"] = raw.strip()
                continue
            if name not in names:
                problems.append((key, f"unknown setting (no field {name!r})"
                                      + _hint(name, names, prefix=prefix, upper=True)))
                continue
            try:
                out[name] = _parse_env(raw, hints[name])
            except ValueError as e:
                problems.append((name, f"{key}={raw!r}: {e}"))
        if problems:
            raise ConfigError(problems)
        return out

    @classmethod
    def from_env(cls, prefix: str = ENV_PREFIX, environ=None, **base) -> "TransformerConfig":
        return cls.from_dict({**base, **cls.env_overrides(prefix, environ)})

    @classmethod
    def load(cls, path: Optional[str] = None, env: bool = True, profile: Optional[str] = None,
             **overrides) -> "TransformerConfig":
        """defaults < file (its preset, then its base, then the profile) < env < overrides.
        The profile comes from `profile=`, else TRUTHGPT_PROFILE, else the file's
        `default_profile`."""
        data: Dict[str, Any] = {}
        if path is not None:
            kind = "json" if str(path).endswith(".json") else "yaml"
            if profile is None and env:
                profile = os.environ.get(ENV_PREFIX + "PROFILE") or None
            data = _select_profile(_read(path, kind, must_be_file=True), profile, path)
        elif profile is not None:
            raise ConfigError([("profile", f"profile {profile!r} given without a config file")])
        if env:
            data.update(cls.env_overrides())
        data.update(overrides)
        return cls.from_dict(data)

    def replace(self, **changes) -> "TransformerConfig":
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------ output
    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self, path: Optional[str] = None) -> str:
        text = json.dumps(self.to_dict(), indent=2)
        if path is not None:
            with open(path, "w") as fh:
                fh.write(text + "\n")
        return text

    def to_yaml(self, path: Optional[str] = None) -> str:
        import yaml
        text = yaml.safe_dump(self.to_dict(), sort_keys=False)
        if path is not None:
            with open(path, "w") as fh:
                fh.write(text)
        return text


# ============================================================================ helpers
def _hint(value, choices, prefix: str = "", upper: bool = False) -> str:
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
                + _hint(layout, SPARSE_LAYOUTS)]
    out = []
    allowed = _LAYOUT_PARAMS[layout] | {"layout", "block_size"}
    for key in sparsity:
        if key not in allowed:
            out.append(f"unknown parameter {key!r} for layout {layout!r}; allowed: "
                       f"{', '.join(sorted(allowed))}" + _hint(key, allowed))
    bs = sparsity.get("block_size", 64)
    if isinstance(bs, bool) or not isinstance(bs, int) or bs < 1:
        out.append(f"block_size must be a positive integer, got {bs!r}")
    return out


def _rope_scaling_problems(scaling) -> List[str]:
    if scaling is None:
        return []
    kind = scaling.get("type")
    if kind not in ROPE_SCALINGS:
        return [f"type must be one of {', '.join(ROPE_SCALINGS)}, got {kind!r}" + _hint(kind, ROPE_SCALINGS)]
    if kind != "llama3" and "factor" not in scaling:
        return [f"scaling type {kind!r} needs a 'factor'"]
    f = scaling.get("factor", 8.0)
    if isinstance(f, bool) or not isinstance(f, (int, float)) or f <= 0:
        return [f"factor must be a positive number, got {f!r}"]
    return []


def _resolve(d: Dict[str, Any]) -> Dict[str, Any]:
    """Expands an optional `preset` key and checks for unknown keys (with close-match hints)."""
    d = dict(d)
    preset = d.pop("preset", None)
    problems = []
    names = TransformerConfig.field_names()
    for key in d:
        if key not in names:
            problems.append((key, "unknown field" + _hint(key, names + ["preset"])))
    base: Dict[str, Any] = {}
    if preset is not None:
        if preset not in PRESETS:
            problems.append(("preset", f"unknown preset {preset!r}; allowed: {', '.join(PRESETS)}"
                                       + _hint(preset, PRESETS)))
        else:
            base = dict(PRESETS[preset])
    if problems:
        raise ConfigError(problems)
    base.update(d)
    return base


def _read(path_or_text: str, kind: str, must_be_file: bool = False):
    """Parses a file (or, when it is not a path to a file, the text itself)."""
    text = str(path_or_text)
    is_file = os.path.isfile(text)
    if must_be_file and not is_file:
        raise ConfigError([("<file>", f"config file {text!r} does not exist")])
    if is_file:
        with open(text) as fh:
            text = fh.read()
    try:
        if kind == "json":
            data = json.loads(text)
        else:
            import yaml
            data = yaml.safe_load(text)
    except Exception as e:  # yaml.YAMLError, json.JSONDecodeError
        raise ConfigError([("<file>", f"cannot parse {kind.upper()} from "
                                      f"{path_or_text if is_file else 'text'}: {e}")]) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError([("<file>", f"the top level must be a mapping of fields, got {type(data).__name__}")])
    return data


def _select_profile(data: Dict[str, Any], profile: Optional[str], source) -> Dict[str, Any]:
    """A file may hold `profiles: {name: {...}}` (and `default_profile`); the chosen profile's
    fields override the file's top-level fields."""
    data = dict(data)
    profiles = data.pop("profiles", None)
    default = data.pop("default_profile", None)
    if profiles is None:
        if profile is not None:
            raise ConfigError([("profile", f"profile {profile!r} requested, but {source} has no "
                                           "'profiles' section")])
        return data
    if not isinstance(profiles, dict) or not all(isinstance(v, dict) for v in profiles.values()):
        raise ConfigError([("profiles", "must map profile names to mappings of fields")])
    name = profile or default
    if name is None:
        return data
    if name not in profiles:
        raise ConfigError([("profile", f"unknown profile {name!r}; {source} defines: "
                                       f"{', '.join(profiles)}" + _hint(name, profiles))])
    data.update(profiles[name])
    return data


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _parse_env(raw: str, hint):
    """Parses an environment string into the annotated field type."""
    s = raw.strip()
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Union:
        if type(None) in args and s.lower() in ("", "none", "null"):
            return None
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1:
            return _parse_env(s, inner[0])
        # window: "256", "256,0" or "[256, 0]"
        if s.lstrip("-").isdigit():
            return int(s)
        parts = [p.strip() for p in s.strip("[]()").split(",")]
        try:
            return [int(p) for p in parts]
        except ValueError:
            raise ValueError("expected an integer or a pair 'left,right'") from None
    if hint is bool:
        if s.lower() in _TRUE:
            return True
        if s.lower() in _FALSE:
            return False
        raise ValueError("expected true/false (or 1/0, yes/no, on/off)")
    if hint is int:
        try:
            return int(s)
        except ValueError:
            raise ValueError("expected an integer") from None
    if hint is float:
        try:
            return float(s)
        except ValueError:
            raise ValueError("expected a number") from None
    if hint is str:
        return s
    import yaml  # mappings and lists: JSON or YAML flow syntax
    try:
        return yaml.safe_load(s)
    except yaml.YAMLError as e:
        raise ValueError(f"cannot parse: {e}") from None
