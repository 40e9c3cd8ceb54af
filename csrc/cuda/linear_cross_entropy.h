// Launcher of the fused linear cross-entropy row kernel (csrc/cuda/linear_cross_entropy.cu); the
// chunk loop and its GEMMs are in csrc/common/linear_cross_entropy_driver.h (ATen, cuBLAS).
#pragma once
#include "launch.h"

namespace truthgpt::cuda {

struct LceRows {
  void* logits;             // (rows, V) of `dtype`, row stride ld (read)
  int64_t ld;
  const void* bias;         // (V,) of `dtype`, or nullptr
  const int64_t* target;    // (rows,)
  const float* grad_scale;  // (rows,), or nullptr: the losses only
  float* loss;              // (rows,)
  float* zrows;             // (rows,)
  void* grad;               // (rows, V) of `dtype`, row stride ldg: the gradients (with grad_scale);
  int64_t ldg;              // == logits for the fused linear cross-entropy (in place)
};

struct LceOptions {
  int64_t ignore_index;
  float label_smoothing, z_loss, softcap;
};

cudaError_t linear_cross_entropy_rows(DType dtype, int64_t rows, int64_t V, LceRows a,
                                      LceOptions o, cudaStream_t stream);

}  // namespace truthgpt::cuda
