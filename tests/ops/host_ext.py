"""The test-only extension `_C_testing` (csrc/testing/): host builds of the CUDA kernels'
shared logic, exposed as `torch.ops.truthgpt_test`. `make test` builds it
(TRUTHGPT_BUILD_TESTING=1) and then a missing build is an error, not a silent skip."""
import os

import pytest
import torch

from truthgpt_kernels import _ext

_mod, _why = _ext.load("_C_testing")
REQUIRED = os.environ.get("TRUTHGPT_BUILD_TESTING") == "1"
if _mod is None and REQUIRED:
    raise RuntimeError(f"TRUTHGPT_BUILD_TESTING=1 but the test-only extension _C_testing is "
                       f"unavailable ({_why}): rebuild with `make setup`")
skip_unless_built = pytest.mark.skipif(
    _mod is None, reason=f"test-only extension _C_testing not built ({_why}); "
                         "build with TRUTHGPT_BUILD_TESTING=1")
T = torch.ops.truthgpt_test if _mod is not None else None
