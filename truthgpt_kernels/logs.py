"""Logging: one logger hierarchy under "truthgpt_kernels" (truthgpt_kernels.backends,
truthgpt_kernels.train, ...), configured like any other with the standard `logging` module,
or by the environment variable TRUTHGPT_LOG_LEVEL (DEBUG, INFO, WARNING, ... or a number),
which sets the package logger's level and, when nothing else handles its records, adds a
stderr handler.

What is logged:
- INFO, once per distinct (op family, device, dtype, requested backend): the backend and the
  kernel path that run, and why "auto" skipped a backend. Logged where backends.py resolves a
  choice, which is cached: a call whose choice is cached does no logging work at all.
- WARNING, once per process and kind: a call that silently takes a slow path (the drop-in
  MultiheadAttention running torch's implementation, the Hugging Face attention function
  falling back to sdpa, Triton kernels under the interpreter, "auto" left with the PyTorch
  reference). At the default level (WARNING) only these appear.
"""
import logging
import os
from typing import Hashable, Tuple

import torch

ROOT = "truthgpt_kernels"
ENV_VAR = "TRUTHGPT_LOG_LEVEL"

_once: set = set()


def get_logger(name: str = "") -> logging.Logger:
    """The package logger, or its child `truthgpt_kernels.<name>`."""
    return logging.getLogger(f"{ROOT}.{name}" if name else ROOT)


def configure(level=None) -> None:
    """Applies `level` (or TRUTHGPT_LOG_LEVEL when None; nothing when neither is set) to the
    package logger, adding a stderr handler when no handler would show its records."""
    level = os.environ.get(ENV_VAR) if level is None else level
    if level is None or level == "":
        return
    if isinstance(level, str):
        name = level.strip().upper()
        level = int(name) if name.isdigit() else logging.getLevelName(name)
        if not isinstance(level, int):
            raise ValueError(f"{ENV_VAR} must be a logging level (DEBUG, INFO, WARNING, ERROR) "
                             f"or a number, got {os.environ.get(ENV_VAR)!r}")
    log = get_logger()
    log.setLevel(level)
    if not log.handlers and not logging.getLogger().handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(name)s %(levelname)s: %(message)s"))
        log.addHandler(handler)


def warn_once(key: Hashable, msg: str, *args, logger: str = "") -> None:
    """Logs WARNING `msg % args` the first time `key` is seen in this process. Skipped while
    torch.compile traces (so it never breaks a graph); the eager call warns."""
    if torch.compiler.is_compiling() or key in _once:
        return
    _once.add(key)
    get_logger(logger).warning(msg, *args)


def info_once(key: Hashable, msg: str, *args, logger: str = "") -> None:
    """Logs INFO `msg % args` the first time `key` is seen (when INFO is enabled then)."""
    if torch.compiler.is_compiling() or key in _once:
        return
    _once.add(key)
    get_logger(logger).info(msg, *args)


def reset_once() -> None:
    """Forgets which once-only messages were logged (tests)."""
    _once.clear()


def _dtype(dtype) -> str:
    return str(dtype).replace("torch.", "")


def backend_chosen(family: str, requested: str, device_type: str, dtype, chosen: str,
                   skipped: Tuple[Tuple[str, str], ...]) -> None:
    """Called by backends._resolve on a cache miss (once per distinct key)."""
    log = get_logger("backends")
    interpreted = chosen == "triton" and os.environ.get("TRITON_INTERPRET") == "1"
    if log.isEnabledFor(logging.INFO):
        from .explain import kernel_path
        why = "".join(f"; auto skipped {b}: {r}" for b, r in skipped)
        log.info("%s on %s %s (requested %s): backend %s, %s%s", family, device_type, _dtype(dtype),
                 requested, chosen, kernel_path(family, chosen, device_type, dtype), why)
    if interpreted:
        warn_once("triton-interpreter", "Triton kernels run under the interpreter (TRITON_INTERPRET=1): "
                  "correct but orders of magnitude slower than compiled kernels (first: %s on %s)",
                  family, device_type, logger="backends")
    if requested == "auto" and chosen == "reference" and skipped:
        warn_once(("auto-reference", family, device_type, dtype),
                  "%s on %s %s runs the PyTorch reference (slow): %s", family, device_type, _dtype(dtype),
                  "; ".join(f"{b} {r}" for b, r in skipped), logger="backends")


# Messages of the fallback warnings at the call sites (one-line calls there).
MULTIHEAD_FALLBACK = ("MultiheadAttention runs torch's implementation, not tk.attention, for calls "
                      "with need_weights=True, add_zero_attn, or a mask that is "
                      "neither key padding nor causal (this call: need_weights=%s, mask servable=%s); "
                      "pass need_weights=False to use the fused kernels")
HF_SDPA_FALLBACK = ("the truthgpt attention function fell back to the implementation it replaced "
                    "(transformers' sdpa or eager; eager when output_attentions asks for the weights) for a call it "
                    "cannot serve exactly (dropout, output_attentions, an additive bias, or a mask "
                    "that is not causal + window + key padding)")
