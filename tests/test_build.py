"""The compiled extensions: built, loadable, and registering their kernels."""
import os
import shutil
import subprocess
import sys

import pytest
import torch

from truthgpt_kernels import _ext, backends

KERNEL_OPS = ["swiglu_fwd", "swiglu_bwd", "rms_norm_fwd", "rms_norm_bwd", "rotary_fwd",
              "rotary_qk_fwd", "attention_fwd", "attention_bwd"]  # every kernel op, CPU


def test_cpu_extension_loads_and_registers():
    mod, info = _ext.load("_C")
    assert mod is not None, info
    for op in KERNEL_OPS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"truthgpt::{op}", "CPU"), op


CUDA_KERNEL_OPS = ["swiglu_fwd", "swiglu_bwd", "rotary_fwd", "rotary_qk_fwd", "rms_norm_fwd",
                   "rms_norm_bwd", "attention_fwd", "attention_bwd"]  # from csrc/cuda/*_binding.cpp


@pytest.mark.skipif(not (torch.backends.openmp.is_available() and sys.platform.startswith("linux")),
                    reason="torch without OpenMP (or not Linux): at::parallel_for does not use it")
def test_cpu_extension_is_built_with_openmp():
    """at::parallel_for is a `#pragma omp parallel` in torch's headers: an extension built
    without -fopenmp silently runs every CPU kernel on one thread."""
    mod, info = _ext.load("_C")
    assert mod is not None, info
    assert "openmp=1" in mod.build_info(), mod.build_info()


@pytest.mark.skipif(torch.version.cuda is None or shutil.which("nvcc") is None
                    or os.environ.get("TRUTHGPT_BUILD_CUDA") == "0",
                    reason="no CUDA toolkit or torch without CUDA: _cuda is not built")
def test_cuda_extension_builds_imports_and_registers():
    mod, info = _ext.load("_cuda")
    assert mod is not None, info
    assert "archs=" in mod.build_info()
    for op in CUDA_KERNEL_OPS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"truthgpt::{op}", "CUDA"), op
    for family in ("attention", "rotary", "swiglu", "rms_norm"):
        assert backends.implements(family, "cuda"), family


def test_every_public_op_is_a_truthgpt_op():
    for name in ["attention", "attention_backward", "apply_rotary", "apply_rotary_qk", "swiglu",
                 "swiglu_backward", "rms_norm", "rms_norm_backward"]:
        assert hasattr(torch.ops.truthgpt, name), name


def test_shipped_extension_holds_no_test_code():
    """The host builds of the CUDA logic live in the test-only _C_testing (csrc/testing/):
    neither the shipped _C library nor its op registrations contain `truthgpt_test`."""
    mod, info = _ext.load("_C")
    assert mod is not None, info
    with open(mod.__file__, "rb") as f:
        assert b"truthgpt_test" not in f.read()
    code = ("import torch, truthgpt_kernels._C; "
            "print(hasattr(torch.ops.truthgpt_test, 'attention_host_fwd'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False", out.stdout + out.stderr


def test_sdist_holds_every_source_and_header(tmp_path):
    """An sdist made without CUDA (TRUTHGPT_BUILD_CUDA=0) still holds every C++/CUDA source and
    header, so that it builds elsewhere (before MANIFEST.in it held no header at all)."""
    import glob
    import tarfile
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, TRUTHGPT_BUILD_CUDA="0")
    subprocess.run([sys.executable, "setup.py", "-q", "sdist", "-d", str(tmp_path)], cwd=root, env=env,
                   capture_output=True, check=True, timeout=600)
    (tarball,) = tmp_path.glob("*.tar.gz")
    with tarfile.open(tarball) as tf:
        names = {n.split("/", 1)[1] for n in tf.getnames() if "/" in n}
    sources = {os.path.relpath(p, root) for ext in ("h", "cuh", "cu", "cpp")
               for p in glob.glob(os.path.join(root, "csrc", "**", f"*.{ext}"), recursive=True)}
    assert sources and not sources - names, sorted(sources - names)
    assert {"README.md", "DESIGN.md", "setup.py", "pyproject.toml"} <= names
