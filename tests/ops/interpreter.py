"""A known limitation of Triton's CPU interpreter, shared by the elementwise op tests."""
import contextlib

import pytest
import torch

from truthgpt_kernels import backends


@contextlib.contextmanager
def bf16_rounding_known(backend, dtype):
    """Triton's interpreter converts float32 to bfloat16 by truncation (GPUs round to nearest
    even), so a kernel's bf16 outputs may be off by one ulp instead of half an ulp. Inside
    this block a failed bf16 comparison of the interpreted Triton backend is an expected
    failure (reported as xfail, with the reason), and stays a failure everywhere else."""
    try:
        yield
    except AssertionError:
        if backend == "triton" and dtype == torch.bfloat16 and backends.triton_interpreted():
            pytest.xfail("Triton's interpreter truncates float32 -> bfloat16 (GPUs round to nearest)")
        raise
