// Per-element SwiGLU math and the vector-width choice of csrc/cuda/swiglu.cu, for host and device
// (TG_HD): fp32 math; the backward recomputes silu instead of saving it.
#pragma once
#include <cmath>
#include <cstdint>

#include "common/host_device.h"
#include "vector_math.cuh"

namespace truthgpt::cuda::swiglu {

TG_HD float sigmoid(float x) { return 1.f / (1.f + expf(-x)); }

// silu(g) * u
TG_HD float fwd(float g, float u) { return g * sigmoid(g) * u; }

// d/dg and d/du of silu(g) * u, times dy
TG_HD void bwd(float dy, float g, float u, float& dg, float& du) {
  const float sig = sigmoid(g);
  du = dy * g * sig;
  dg = dy * u * sig * (1.f + g * (1.f - sig));
}

// Widest V with n and every row stride a multiple of V and every pointer V-aligned.
TG_HD int pick_vec(int elem_size, int64_t rows, int64_t n, const void* const* ptrs,
                   const int64_t* row_strides, int count) {
  return vec::widest(elem_size, [&](int v) {
    if (n % v) return false;
    for (int i = 0; i < count; ++i)
      if (!vec::aligned(ptrs[i], v, elem_size) || !vec::stride_ok(row_strides[i], rows, v))
        return false;
    return true;
  });
}

}  // namespace truthgpt::cuda::swiglu
