"""Build truthgpt_kernels._C (C++ CPU, always) and truthgpt_kernels._cuda (CUDA C++).

Install with the torch you will run against:  pip install --no-build-isolation -e .
"""
import glob
import os
import re
import shutil
import sys

# ---- build flags: each declared once, here (README lists them) --------------------
BUILD_CUDA = os.environ.get("TRUTHGPT_BUILD_CUDA", "auto").lower()  # auto | 0 | 1
CUDA_ARCHS = os.environ.get("TRUTHGPT_CUDA_ARCHS", "8.0;9.0+PTX")  # ';'-separated; +PTX: also PTX (newer GPUs JIT it)
DEBUG = os.environ.get("TRUTHGPT_DEBUG", "0") == "1"                # -O0 -g + ASan (CPU)
CPU_NATIVE = os.environ.get("TRUTHGPT_CPU_NATIVE", "0") == "1"      # opt-in -march=native
MAX_JOBS = os.environ.get("MAX_JOBS")                               # default: cores/memory
BUILD_TESTING = os.environ.get("TRUTHGPT_BUILD_TESTING", "0") == "1"  # test-only _C_testing
# ---------------------------------------------------------------------------------------

if BUILD_CUDA not in ("auto", "0", "1"):
    sys.exit(f"TRUTHGPT_BUILD_CUDA must be auto, 0 or 1, got {BUILD_CUDA!r}")

ROOT = os.path.dirname(os.path.abspath(__file__))


def _die_isolated():
    sys.exit(
        "truthgpt_kernels compiles C++/CUDA extensions against the torch you run with, and "
        "none is importable in this build environment (pip's build isolation hides it).\n"
        "Install torch first, then:  pip install --no-build-isolation .   "
        "(or -e . for development)"
    )


try:
    import torch  # noqa: F401
except ImportError:
    _die_isolated()


def find_cuda_home():
    """CUDA_HOME if set; else the root of the real nvcc (following wrapper scripts); else
    the standard toolkit locations. None when no toolkit is found."""
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    nvcc = shutil.which("nvcc")
    seen = set()
    while nvcc and nvcc not in seen:
        seen.add(nvcc)
        nvcc = os.path.realpath(nvcc)
        with open(nvcc, "rb") as f:
            head = f.read(4096)
        if not head.startswith(b"#!"):  # a real binary: <root>/bin/nvcc
            return os.path.dirname(os.path.dirname(nvcc))
        match = re.search(rb"(/[^\s\"']+/bin/nvcc)\b", head)  # a wrapper: follow what it execs
        nvcc = match.group(1).decode() if match and os.path.exists(match.group(1)) else None
    candidates = sorted(glob.glob("/usr/local/cuda-*"), reverse=True) + ["/usr/local/cuda", "/opt/cuda"]
    for root in candidates:
        if os.path.exists(os.path.join(root, "bin", "nvcc")):
            return root
    return None


CUDA_HOME = find_cuda_home()
if CUDA_HOME:
    os.environ["CUDA_HOME"] = CUDA_HOME  # torch reads it when cpp_extension is imported
os.environ["TORCH_CUDA_ARCH_LIST"] = CUDA_ARCHS
if MAX_JOBS is None:
    try:
        mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES") / 2**30
    except (ValueError, OSError):
        mem_gb = 8.0
    os.environ["MAX_JOBS"] = str(max(1, min(os.cpu_count() or 1, int(mem_gb // 3))))

import torch  # noqa: E402
from setuptools import setup  # noqa: E402
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402

if BUILD_CUDA == "auto":
    WITH_CUDA = torch.version.cuda is not None and CUDA_HOME is not None
elif BUILD_CUDA == "1":
    if torch.version.cuda is None or CUDA_HOME is None:
        sys.exit("TRUTHGPT_BUILD_CUDA=1 but "
                 + ("this torch has no CUDA" if torch.version.cuda is None else "no nvcc was found"))
    WITH_CUDA = True
else:
    WITH_CUDA = False


def rel(pattern):
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


opt = ["-O0", "-g", "-fno-omit-frame-pointer"] if DEBUG else ["-O3"]
# The C++ standard is named explicitly: torch's BuildExtension adds -std=c++17 when none is
# given (torch <= 2.8), and the CPU kernels use C++20 (std::bit_cast).
CXX_STD = "-std=c++20"
cxx_flags = opt + [CXX_STD, "-fdiagnostics-color=always"]
if CPU_NATIVE:
    cxx_flags.append("-march=native")
link_flags = []
# at::parallel_for is a `#pragma omp parallel` in torch's headers: without -fopenmp it is
# silently ignored and every CPU kernel runs on one thread. Links torch's own libgomp
# (same soname, already loaded by torch).
WITH_OPENMP = torch.backends.openmp.is_available() and sys.platform.startswith("linux")
if WITH_OPENMP:
    cxx_flags.append("-fopenmp")
    link_flags.append("-fopenmp")
if DEBUG:
    cxx_flags.append("-fsanitize=address")
    link_flags.append("-fsanitize=address")
build_info = f"opt={'debug+asan' if DEBUG else 'O3'};native={int(CPU_NATIVE)};openmp={int(WITH_OPENMP)}"
include_dirs = [os.path.join(ROOT, "csrc")]

ext_modules = [
    CppExtension(
        "truthgpt_kernels._C",
        ["csrc/module.cpp", "csrc/registration.cpp"] + rel("csrc/cpu/*.cpp"),
        include_dirs=include_dirs,
        extra_compile_args={"cxx": cxx_flags + [f'-DTRUTHGPT_BUILD_INFO="{build_info}"']},
        extra_link_args=link_flags,
    )
]
if BUILD_TESTING:  # host builds of the CUDA kernels' logic, for tests only (csrc/testing/)
    ext_modules.append(
        CppExtension(
            "truthgpt_kernels._C_testing",
            rel("csrc/testing/*.cpp"),
            include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx_flags + [f'-DTRUTHGPT_BUILD_INFO="{build_info}"']},
            extra_link_args=link_flags,
        )
    )
if WITH_CUDA:
    arch_flags = []
    for arch in filter(None, (a.strip() for a in CUDA_ARCHS.split(";"))):
        num = arch.replace(".", "").replace("+PTX", "")
        arch_flags.append(f"-gencode=arch=compute_{num},code=sm_{num}")
        if arch.endswith("+PTX"):
            arch_flags.append(f"-gencode=arch=compute_{num},code=compute_{num}")
    ext_modules.append(
        CUDAExtension(
            "truthgpt_kernels._cuda",
            rel("csrc/cuda/*.cpp") + rel("csrc/cuda/*.cu"),
            include_dirs=include_dirs,
            # some toolkits (e.g. pip-style layouts) keep libcudart in lib/, not lib64/
            library_dirs=[d for d in (os.path.join(CUDA_HOME, "lib"),) if os.path.isdir(d)],
            extra_compile_args={
                "cxx": opt + [CXX_STD, f'-DTRUTHGPT_BUILD_INFO="archs={CUDA_ARCHS}"'],
                "nvcc": (["-O0", "-g", "-G"] if DEBUG else ["-O3"])
                + [CXX_STD, "-lineinfo", "--use_fast_math", "--expt-relaxed-constexpr"]
                + arch_flags,
            },
        )
    )

setup(
    ext_modules=ext_modules,
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
