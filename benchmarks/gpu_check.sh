#!/usr/bin/env bash
# benchmarks/gpu_check.sh: the one prepared check for a lent GPU machine (NVIDIA H200).
# Builds the package from the copied tree (_cuda for sm_90 only), runs `pytest -m cuda -x -q`,
# then `python -m truthgpt_kernels bench --device cuda --quick`, and prints a short table last.
# The whole script stays under 8 minutes (GPU_CHECK_BUDGET, default 450 s).
#
# Run it through the device tool, from the repository root, as ONE call:
#     bash benchmarks/gpu_check.sh                      command; timeout_s=540
# Knobs (environment variables, all optional):
#     GPU_CHECK_PYTEST_ARGS  extra pytest arguments, e.g. "tests/ops/test_attention.py -k fwd"
#     GPU_CHECK_MARKERS      pytest -m expression (default "cuda"; "cuda or triton" also runs the
#                            Triton tests compiled for the GPU instead of the CPU interpreter)
#     GPU_CHECK_BENCH_ARGS   extra bench arguments, e.g. "--ops attention,swiglu --dtype bf16"
#     GPU_CHECK_INSTALL      inplace (default: setup.py build_ext --inplace, incremental when the
#                            machine is still warm from an earlier call) or pip (pip install -e)
#     GPU_CHECK_BUDGET       seconds for the whole script (default 450)
#     GPU_CHECK_SKIP_BUILD=1 reuse the extensions already built in this tree (warm machine)
#     PYTHON                 default python3 (the image's /opt/torch/.venv python with torch)
# Everything is logged under $OUT (what comes back from the machine; default
# bench-results/gpu-check/ here): env.txt, build.log, pytest.log, bench.log, gpu.json, gpu.png,
# summary.txt. Seven files: the tool brings back at most 8.
#
# What matters about that machine (/work/.library/device/README.md, METHOD.md, H200.md, KINDS.md):
# - Device time is short: 15 minutes per task for every try together, a fresh machine costs a
#   minute or more to start, one command may run 10 minutes at most, and the machine stays warm
#   only ~30 s after a call. So: everything in one call, a timeout_s (540) that leaves time for a
#   rerun, and give the machine back unless rerunning at once.
# - A fresh machine is bare; nothing persists between machines. No network: nothing can be
#   installed from a registry. Its image has python3 3.12 with torch 2.11 (CUDA 13.0), triton
#   3.6, nvcc 13.0, ninja, pytest, pytest-benchmark, tqdm, tabulate and matplotlib, so the build
#   uses --no-build-isolation --no-deps --no-index and needs nothing else. (A missing package
#   would have to travel as wheels; see README.md there.)
# - Never carry extensions built on this machine: they are for another torch and Python (and the
#   .so files are gitignored, so they do not travel). This script builds there.
# - Build for sm_90 only (TRUTHGPT_CUDA_ARCHS=9.0): with no target named nvcc embeds older
#   machine code and PTX, and the kernels then use none of Hopper's instructions. MAX_JOBS=16
#   (16 cores, 128 GiB).
# - Only $OUT comes back (at most 8 files, 16 MiB each); the reply shows the last 12,000
#   characters of output, so the short table is printed last and full logs go to $OUT.
#   PYTHONUNBUFFERED=1 so nothing is lost when a step is killed at its time limit.
# - Measure the card as found: this script only READS nvidia-smi. Never change clocks, power,
#   persistence, compute mode or MIG, never reset the GPU (no nvidia-smi -r/-pm/-pl/-ac/-lgc/-c/
#   -mig), though commands run as root there.
# - Ceilings are measured by the bench at the start of its run, not assumed. For orientation
#   (KINDS.md, measured there 2026-10/11): device-to-device copy ~4.3 TB/s (read + write;
#   datasheet 4.8), bf16 8192^3 GEMM ~770-800 TFLOP/s on random data (datasheet ~990 dense);
#   zeros run faster, so nothing is ever timed on zeros. L2 is 60 MB: the bench flushes it
#   between timed calls. 132 SMs, ~139 GiB of device memory.
# - Firecracker machines have ncu (--clock-control none) and compute-sanitizer; gVisor ones do
#   not. Neither has gdb, strace or perf.
set -u
cd "$(dirname "$0")/.." || exit 1
ROOT=$PWD
OUT=${OUT:-$ROOT/bench-results/gpu-check}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
BUDGET=${GPU_CHECK_BUDGET:-450}
MARKERS=${GPU_CHECK_MARKERS:-cuda}
INSTALL=${GPU_CHECK_INSTALL:-inplace}
START=$SECONDS
export PYTHONUNBUFFERED=1 TRUTHGPT_CUDA_ARCHS=9.0 MAX_JOBS=${MAX_JOBS:-16}
export TRUTHGPT_BUILD_CUDA=${TRUTHGPT_BUILD_CUDA:-1}  # fail the build rather than skip _cuda
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"  # the tree itself is the package (inplace)

# CUDA_HOME: as given; else the toolkit root of the nvcc on PATH (following symlinks and
# one-line wrapper scripts that exec the real nvcc, as setup.py does); else /usr/local/cuda*.
# Checked by the presence of include/cuda_runtime.h, so a /usr/local/bin wrapper is not taken.
cuda_root_of() {  # prints the toolkit root of an nvcc path, if it is one
    local nvcc real target
    nvcc=$(readlink -f "$1") || return 1
    if head -c 2 "$nvcc" | grep -q '#!'; then   # a wrapper script: follow what it execs
        target=$(grep -oE '/[^[:space:]"]+/bin/nvcc' "$nvcc" | head -n 1)
        [ -n "$target" ] && [ "$target" != "$nvcc" ] || return 1
        real=$(readlink -f "$target") || return 1
    else
        real=$nvcc
    fi
    local root
    root=$(dirname "$(dirname "$real")")
    [ -f "$root/include/cuda_runtime.h" ] && echo "$root"
}
if [ -z "${CUDA_HOME:-}" ]; then
    if command -v nvcc >/dev/null 2>&1; then CUDA_HOME=$(cuda_root_of "$(command -v nvcc)"); fi
    if [ -z "${CUDA_HOME:-}" ]; then
        for d in /usr/local/cuda /usr/local/cuda-*; do
            if [ -x "$d/bin/nvcc" ] && [ -f "$d/include/cuda_runtime.h" ]; then CUDA_HOME=$d; break; fi
        done
    fi
fi
if [ -n "${CUDA_HOME:-}" ]; then
    export CUDA_HOME PATH="$CUDA_HOME/bin:$PATH"
fi

STEPS=()   # "name|status|seconds" for the final table
FAILED=0
remaining() { echo $((BUDGET - (SECONDS - START))); }

# step NAME LIMIT_S COMMAND...: runs with the smaller of LIMIT_S and the time left, output to
# $OUT/NAME.log (and to the screen when SHOW=1), and records the outcome.
step() {
    local name=$1 limit=$2 left rc t0
    shift 2
    left=$(remaining)
    if [ "$limit" -gt "$left" ]; then limit=$left; fi
    if [ "$limit" -lt 15 ]; then
        STEPS+=("$name|skipped: out of time|0"); FAILED=1; return 1
    fi
    echo "== $name (limit ${limit}s): $*"
    t0=$SECONDS
    if [ "${SHOW:-0}" = 1 ]; then
        timeout -k 10 "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
        rc=${PIPESTATUS[0]}
    else
        timeout -k 10 "$limit" "$@" > "$OUT/$name.log" 2>&1
        rc=$?
    fi
    local took=$((SECONDS - t0)) status=ok
    if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then status="TIMEOUT after ${limit}s"
    elif [ "$rc" -ne 0 ]; then status="FAILED (exit $rc)"; fi
    STEPS+=("$name|$status|$took")
    if [ "$status" != ok ]; then
        FAILED=1
        if [ "${SHOW:-0}" != 1 ]; then echo "-- last lines of $OUT/$name.log:"; tail -n 40 "$OUT/$name.log"; fi
    fi
    return "$rc"
}

# ---- 1. the machine and the tools (read-only queries) ----------------------------------
{
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "host: $(uname -srm)"
    echo "cuda_home: ${CUDA_HOME:-not found}"
    if command -v nvcc >/dev/null 2>&1; then echo "nvcc: $(nvcc --version | tail -n 1)"; else echo "nvcc: not on PATH"; fi
    nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used,clocks.sm,clocks.mem,temperature.gpu,power.draw \
        --format=csv 2>&1 || echo "nvidia-smi: not available"
    "$PY" - <<'EOF' 2>&1
import platform, torch
print(f"python {platform.python_version()}  torch {torch.__version__} (CUDA {torch.version.cuda})"
      f"  cuda available: {torch.cuda.is_available()}")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"gpu: {p.name}, capability {p.major}.{p.minor}, {p.multi_processor_count} SMs, "
          f"{p.total_memory / 2**30:.0f} GiB")
try:
    import triton
    print(f"triton {triton.__version__}")
except ImportError:
    print("triton: not installed")
EOF
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    if [ "${GPU_CHECK_ALLOW_NO_GPU:-0}" != 1 ]; then
        echo "error: no CUDA device visible to $PY's torch; this script is for the lent GPU machine"
        exit 2
    fi
    echo "warning: no GPU; continuing because GPU_CHECK_ALLOW_NO_GPU=1 (a dry run of the script)"
fi

# ---- 2. build ---------------------------------------------------------------------------
if [ "${GPU_CHECK_SKIP_BUILD:-0}" = 1 ]; then
    STEPS+=("build|skipped (GPU_CHECK_SKIP_BUILD=1)|0")
elif [ "$INSTALL" = pip ]; then
    step build 300 "$PY" -m pip install --no-build-isolation --no-deps --no-index \
        --disable-pip-version-check -v -e .
else
    step build 300 "$PY" setup.py -q build_ext --inplace
fi
"$PY" -m truthgpt_kernels info > "$OUT/info.txt" 2>&1
grep -E "extension|backend|device" "$OUT/info.txt" | tee -a "$OUT/env.txt"
rm -f "$OUT/info.txt"   # folded into env.txt: keeps $OUT within the 8 files that come back

# ---- 3. the CUDA tests ------------------------------------------------------------------
# shellcheck disable=SC2086  # word-splitting of the extra arguments is intended
SHOW=1 step pytest 150 "$PY" -m pytest -m "$MARKERS" -x -q -p no:cacheprovider ${GPU_CHECK_PYTEST_ARGS:-}

# ---- 4. the benchmark (quick sizes; measures its own ceilings first) --------------------
# shellcheck disable=SC2086
SHOW=1 step bench 150 "$PY" -m truthgpt_kernels bench --device cuda --quick --no-progress \
    --json "$OUT/gpu.json" --plot "$OUT/gpu.png" ${GPU_CHECK_BENCH_ARGS:-}

# ---- 5. the short table, last -----------------------------------------------------------
{
    echo
    echo "== gpu_check summary ($((SECONDS - START)) s of a ${BUDGET} s budget; logs in $OUT)"
    printf '%-8s  %-28s  %s\n' step status seconds
    for s in "${STEPS[@]}"; do
        IFS='|' read -r n st t <<< "$s"
        printf '%-8s  %-28s  %s\n' "$n" "$st" "$t"
    done
    if [ -f "$OUT/gpu.json" ]; then
        echo
        "$PY" -m truthgpt_kernels.bench.report summary "$OUT/gpu.json" 2>&1
    fi
} | tee "$OUT/summary.txt"
exit "$FAILED"
