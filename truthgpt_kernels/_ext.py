"""Loads the compiled extensions once, remembering why one is missing."""
import importlib
from typing import Optional, Tuple

_cache = {}

# Why an extension module is missing, and how to get it (a pip user has no Makefile).
_REINSTALL = "reinstall with `pip install --no-build-isolation .` (in a checkout: `make setup`)"
_NOT_BUILT = {
    "_C": f"not built: {_REINSTALL}",
    "_C_testing": f"not built (TRUTHGPT_BUILD_TESTING=1 builds it): {_REINSTALL}",
    "_cuda": ("not built: it is built when torch has CUDA and nvcc is found (TRUTHGPT_BUILD_CUDA=auto), "
              f"or always with TRUTHGPT_BUILD_CUDA=1; {_REINSTALL}"),
}


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
            hint = (_NOT_BUILT.get(name, f"not built: {_REINSTALL}") if "No module named" in str(e) else f"failed to load: {e}")
            _cache[name] = (None, hint)
    return _cache[name]
