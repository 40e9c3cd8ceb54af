"""TransformerConfig: the one dataclass describing a model (its fields, with defaults, and the
values derived from them). Building one validates it (rules.py) and raises one ConfigError
listing every problem; the classmethods load the fields from presets, files, profiles and
the environment (loading.py).
"""
import dataclasses
import json
import math
import typing
from dataclasses import dataclass, fields
from typing import Any, Dict, List, Optional, Tuple, Union

from . import loading, rules
from .loading import ENV_PREFIX
from .rules import ConfigError


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
    d_ff: Optional[int] = None               # None: 8/3 d_model (swiglu, geglu, moe) or 4 d_model (mlp),
    ffn_multiple_of: int = 64                # ... rounded up to a multiple of this
    max_seq_len: int = 2048
    # attention
    attention: str = "full"                  # full | sliding_window | sparse
    window: Optional[Union[int, List[int]]] = None  # sliding_window: W or [left, right], -1 = unbounded
    sparsity: Optional[Dict[str, Any]] = None  # sparse: {"layout": "bigbird", "block_size": 64, ...}
    use_flash_attention: bool = True         # False: the dense PyTorch reference (for debugging)
    softcap: float = 0.0
    # positions
    position: str = "rope"                   # rope | alibi | relative (T5 bias) | sinusoidal | learned | none
    relative_buckets: int = 32               # relative: T5's num_buckets ...
    relative_max_distance: int = 128         # ... and max_distance (bidirectional in encoders)
    rope_base: float = 10000.0
    rope_scaling: Optional[Dict[str, Any]] = None  # {"type": "linear"|"ntk"|"llama3", "factor": f, ...}
    rotary_dim: Optional[int] = None         # partial rotary; None = head_dim
    # feed-forward
    ffn: str = "swiglu"                      # swiglu | geglu (tanh GELU gate, Gemma) | mlp | moe
    n_experts: int = 8
    experts_top_k: int = 2
    capacity_factor: Optional[float] = None  # None: no token is ever dropped
    moe_aux_loss_weight: float = 0.01
    # norms, regularisation, init
    norm: str = "rmsnorm"                    # rmsnorm | layernorm (with bias); both fused ops
    norm_eps: float = 1e-5
    dropout: float = 0.0                     # embeddings, residual branches
    attn_dropout: float = 0.0                # attention probabilities, in the kernel (Philox)
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
        else:  # gated: gate_up d -> 2f and down f -> d (biases 2f + d)
            ffn = 3 * d * f + ((2 * f + d) if self.bias else 0)
            if self.ffn == "moe":
                ffn = self.n_experts * ffn + d * self.n_experts
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

    # ------------------------------------------------------------------ validation (rules.py)
    def problems(self) -> List[Tuple[str, str]]:
        """Every problem found, as (field, message); empty when the config is valid."""
        return rules.problems(self)

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
        names = cls.field_names()
        try:
            return cls(**loading.resolve(d, names))
        except ConfigError as e:
            found = e.problems  # unknown keys (or preset): the known ones' values too, at once
        try:
            cls(**loading.resolve({k: v for k, v in d.items() if k in names or k == "preset"}, names))
        except ConfigError as e:
            found = found + [p for p in e.problems if p not in found]
        raise ConfigError(found)

    @classmethod
    def from_json(cls, path_or_text: str) -> "TransformerConfig":
        return cls.from_dict(loading.read(path_or_text, "json"))

    @classmethod
    def from_yaml(cls, path_or_text: str, profile: Optional[str] = None) -> "TransformerConfig":
        return cls.from_dict(loading.select_profile(loading.read(path_or_text, "yaml"), profile, path_or_text))

    @classmethod
    def env_overrides(cls, prefix: str = ENV_PREFIX, environ=None) -> Dict[str, Any]:
        """The fields set by `<prefix><FIELD>` variables, parsed to the field types."""
        return loading.env_overrides(cls.field_names(), typing.get_type_hints(cls), prefix, environ)

    @classmethod
    def from_env(cls, prefix: str = ENV_PREFIX, environ=None, **base) -> "TransformerConfig":
        return cls.from_dict({**base, **cls.env_overrides(prefix, environ)})

    @classmethod
    def load(cls, path: Optional[str] = None, env: bool = True, profile: Optional[str] = None,
             **overrides) -> "TransformerConfig":
        """defaults < file (its preset, then its base, then the profile) < env < overrides.
        The profile comes from `profile=`, else TRUTHGPT_PROFILE, else the file's
        `default_profile`."""
        data = loading.file_fields(path, profile, env)
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
