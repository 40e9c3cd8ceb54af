// Launchers of the RMSNorm CUDA kernels (csrc/cuda/rms_norm.cu); geometry in rms_norm_math.cuh.
#pragma once
#include "launch.h"
#include "rms_norm_math.cuh"

namespace truthgpt::cuda {

// Optional weight (n,) of element type F32 or x's dtype; ptr == nullptr when absent.
struct RmsWeight {
  const void* ptr;
  DType dtype;
};

// y = x * rstd * w; rstd (rows,) float32. y may alias nothing; x, y (rows, n) unit inner stride.
cudaError_t rms_norm_fwd(DType dtype, int64_t rows, int64_t n, Rows x, RmsWeight w, Rows y,
                         float* rstd, float eps, cudaStream_t stream);

// The backward's launch plan: the caller allocates `teams * n` floats of partial dweight sums
// (none without a weight) and passes them to rms_norm_bwd with the plan.
struct RmsBwdPlan {
  rms::Geometry geo;
  int64_t blocks;
  int64_t teams;        // blocks * geo.rpb
  size_t smem_bytes;    // dynamic shared memory: the teams' dweight accumulators, or 0
};

cudaError_t rms_norm_bwd_plan(DType dtype, int64_t rows, int64_t n, Rows grad, Rows x,
                              RmsWeight w, Rows dx, RmsBwdPlan* plan);

// dx = rstd (dy w - x rstd^2 mean(dy w x)); dweight (n,) of w's dtype = sum over rows of
// dy x rstd, reduced in a fixed order (two passes, no atomics).
cudaError_t rms_norm_bwd(DType dtype, int64_t rows, int64_t n, Rows grad, Rows x, RmsWeight w,
                         const float* rstd, Rows dx, void* dweight, float* partial,
                         const RmsBwdPlan& plan, cudaStream_t stream);

}  // namespace truthgpt::cuda
