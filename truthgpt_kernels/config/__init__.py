"""TransformerConfig: one dataclass describing a model, with validation and loading.

Sources, weakest first: the field defaults < a preset (`preset: small` in a file or dict) <
a YAML/JSON file (and the profile chosen in it) < environment variables `TRUTHGPT_<FIELD>` <
keyword overrides:

    cfg = TransformerConfig.load("configs/profiles.yaml", profile="testing", n_layers=4)
    cfg = TransformerConfig.preset("small", backend="cpu")

Every invalid value raises one ConfigError that lists every problem by field name, before
anything is allocated.

The parts, one file each:
    transformer_config.py  the dataclass: fields, defaults, derived values (head_dim, ...)
    presets.py             PRESETS, plain data
    rules.py               what is valid: allowed values, limits, problems(cfg), ConfigError
    loading.py             where fields come from: files, profiles, TRUTHGPT_* variables
"""
from .loading import ENV_PREFIX, RESERVED_ENV, RESERVED_ENV_PREFIXES
from .presets import PRESETS
from .rules import (ATTENTION_KINDS, BACKENDS, DTYPES, FFN_KINDS, LIMITS, MAX_HEAD_DIM, MAX_PARAMETERS,
                    MODEL_TYPES, NORM_KINDS, POSITION_KINDS, ROPE_SCALINGS, SPARSE_LAYOUTS, ConfigError)
from .transformer_config import TransformerConfig

__all__ = [
    "TransformerConfig", "ConfigError", "PRESETS", "ENV_PREFIX", "RESERVED_ENV", "RESERVED_ENV_PREFIXES",
    "MODEL_TYPES", "ATTENTION_KINDS", "POSITION_KINDS", "FFN_KINDS", "NORM_KINDS", "DTYPES", "BACKENDS",
    "SPARSE_LAYOUTS", "ROPE_SCALINGS", "MAX_HEAD_DIM", "LIMITS", "MAX_PARAMETERS",
]
