// Lets `__host__ __device__` helpers (csrc/cuda/*_math.cuh) compile with a host compiler too,
// so the CPU extension can build them as test-only ops (csrc/testing/) and CI can check the CUDA
// kernels' index arithmetic, masks and softmax steps without a GPU.
#pragma once
#if defined(__CUDACC__)
#define TG_HD __host__ __device__ __forceinline__
#else
#define TG_HD inline
#endif

#include <cmath>

namespace truthgpt {
// tanh with ~1e-7 absolute error also under nvcc's --use_fast_math, which turns tanhf into the
// hardware tanh.approx.f32 (~2^-11 relative: a softcap of 50 off by 0.025): 1 - 2 / (e^{2|x|} + 1)
// with the sign restored (NaN stays NaN, +-inf gives +-1).
TG_HD float tanh_precise(float x) {
  const float e = expf(-2.f * fabsf(x));
  return copysignf((1.f - e) / (1.f + e), x);
}
}  // namespace truthgpt
