// Launchers of the LayerNorm CUDA kernels (csrc/cuda/layer_norm.cu); geometry as RMSNorm's.
#pragma once
#include "launch.h"
#include "layer_norm_math.cuh"

namespace truthgpt::cuda {

// Optional weight and bias (n,), both of element type F32 or both of x's dtype; ptr == nullptr
// when absent (a bias without a weight: the binding passes a weight of ones).
struct LnAffine {
  const void* w;
  const void* b;
  DType dtype;
};

// y = (x - mean) rstd w + b; mean, rstd (rows,) float32. x, y (rows, n) unit inner stride.
cudaError_t layer_norm_fwd(DType dtype, int64_t rows, int64_t n, Rows x, LnAffine a, Rows y,
                           float* mean, float* rstd, float eps, cudaStream_t stream);

// The backward's launch plan: the caller allocates `teams * n` floats of partial sums per
// parameter (dweight, then dbias: none without them) and passes them with the plan.
struct LnBwdPlan {
  rms::Geometry geo;
  int64_t blocks;
  int64_t teams;        // blocks * geo.rpb
  size_t smem_bytes;    // dynamic shared memory: the teams' accumulators, or 0
};

cudaError_t layer_norm_bwd_plan(DType dtype, int64_t rows, int64_t n, Rows grad, Rows x, LnAffine a,
                                Rows dx, LnBwdPlan* plan);

// dx; dweight = sum over rows of dy xhat, dbias = sum over rows of dy (a's dtype), reduced in a
// fixed order (two passes, no atomics). partial: (2 if a.b else 1) * teams * n floats.
cudaError_t layer_norm_bwd(DType dtype, int64_t rows, int64_t n, Rows grad, Rows x, LnAffine a,
                           const float* mean, const float* rstd, Rows dx, void* dweight,
                           void* dbias, float* partial, const LnBwdPlan& plan, cudaStream_t stream);

}  // namespace truthgpt::cuda
