// The plain-C++ interface between the thin torch bindings (csrc/cuda/*_binding.cpp, which
// include torch headers) and the kernel translation units (csrc/cuda/*.cu, which include
// only CUDA headers, so they compile fast for every arch).
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>

namespace truthgpt::cuda {

enum class DType : int { F16 = 0, BF16 = 1, F32 = 2 };

// A (rows, n) matrix with unit inner stride.
struct Rows {
  void* ptr;
  int64_t row_stride;  // in elements
};

cudaError_t swiglu_fwd(DType dtype, int64_t rows, int64_t n, Rows gate, Rows up, Rows out,
                       cudaStream_t stream);
cudaError_t swiglu_bwd(DType dtype, int64_t rows, int64_t n, Rows grad, Rows gate, Rows up,
                       Rows dgate, Rows dup, cudaStream_t stream);

}  // namespace truthgpt::cuda
