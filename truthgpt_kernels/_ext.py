"""Loads the compiled extensions once, remembering why one is missing."""
import importlib
from typing import Optional, Tuple

_cache = {}


def load(name: str) -> Tuple[Optional[object], str]:
    """Returns (module or None, build info or the reason it could not be loaded)."""
    if name not in _cache:
        if name == "_cuda":
            C, why = load("_C")  # _cuda registers kernels for the schemas _C defines
            if C is None:
                _cache[name] = (None, f"needs _C, which is unavailable ({why})")
                return _cache[name]
        try:
            mod = importlib.import_module(f"truthgpt_kernels.{name}")
            _cache[name] = (mod, mod.build_info())
        except ImportError as e:
            hint = ("not built: run `make setup` or `pip install --no-build-isolation -e .`"
                    if "No module named" in str(e) else f"failed to load: {e}")
            _cache[name] = (None, hint)
    return _cache[name]
