"""Loading a TransformerConfig's fields from files, profiles and the environment.

Sources, weakest first: the field defaults < a preset (`preset: small`) < a YAML/JSON file
(its top level, then the chosen profile) < environment variables `TRUTHGPT_<FIELD>` < keyword
overrides. These functions only gather and parse a dict of fields; the rules in rules.py then
check the values when the dataclass is built. They take the field names (and type hints) as
arguments, so this module does not import the dataclass.
"""
import json
import os
import typing
from typing import Any, Dict, List, Optional, Union

from .presets import PRESETS
from .rules import ConfigError, did_you_mean

ENV_PREFIX = "TRUTHGPT_"

# TRUTHGPT_* variables that belong to other parts of the package, never config fields.
RESERVED_ENV = {"PROFILE", "CONFIG", "BUILD_CUDA", "CUDA_ARCHS", "DEBUG", "CPU_NATIVE", "LOG_LEVEL", "BACKEND"}
RESERVED_ENV_PREFIXES = ("BUILD_", "BENCH_", "TEST_", "CPU_", "ATTN_")


def resolve(d: Dict[str, Any], names: List[str]) -> Dict[str, Any]:
    """Expands an optional `preset` key and checks for unknown keys (with close-match hints)."""
    d = dict(d)
    preset = d.pop("preset", None)
    problems = []
    for key in d:
        if key not in names:
            problems.append((key, "unknown field" + did_you_mean(key, names + ["preset"])))
    base: Dict[str, Any] = {}
    if preset is not None:
        if preset not in PRESETS:
            problems.append(("preset", f"unknown preset {preset!r}; allowed: {', '.join(PRESETS)}"
                                       + did_you_mean(preset, PRESETS)))
        else:
            base = dict(PRESETS[preset])
    if problems:
        raise ConfigError(problems)
    base.update(d)
    return base


def read(path_or_text: str, kind: str, must_be_file: bool = False):
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


def select_profile(data: Dict[str, Any], profile: Optional[str], source) -> Dict[str, Any]:
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
                                       f"{', '.join(profiles)}" + did_you_mean(name, profiles))])
    data.update(profiles[name])
    return data


def file_fields(path: Optional[str], profile: Optional[str] = None, env: bool = True) -> Dict[str, Any]:
    """The fields a config file sets (its preset key, its top level, then the profile), {}
    without a file. The profile comes from `profile=`, else TRUTHGPT_PROFILE (when env), else
    the file's `default_profile`."""
    if path is None:
        if profile is not None:
            raise ConfigError([("profile", f"profile {profile!r} given without a config file")])
        return {}
    kind = "json" if str(path).endswith(".json") else "yaml"
    if profile is None and env:
        profile = os.environ.get(ENV_PREFIX + "PROFILE") or None
    return select_profile(read(path, kind, must_be_file=True), profile, path)


def env_overrides(names: List[str], hints: Dict[str, Any], prefix: str = ENV_PREFIX,
                  environ=None) -> Dict[str, Any]:
    """The fields set by `<prefix><FIELD>` variables, parsed to the field types (`hints`)."""
    environ = os.environ if environ is None else environ
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
                                  + did_you_mean(name, names, prefix=prefix, upper=True)))
            continue
        try:
            out[name] = parse_env(raw, hints[name])
        except ValueError as e:
            problems.append((name, f"{key}={raw!r}: {e}"))
    if problems:
        raise ConfigError(problems)
    return out


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def parse_env(raw: str, hint):
    """Parses an environment string into the annotated field type."""
    s = raw.strip()
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Union:
        if type(None) in args and s.lower() in ("", "none", "null"):
            return None
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1:
            return parse_env(s, inner[0])
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
