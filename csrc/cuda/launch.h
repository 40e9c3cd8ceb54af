// Shared plain-C++ types of the interface between the thin torch bindings
// (csrc/cuda/*_binding.cpp, which include torch headers) and the kernel translation units
// (csrc/cuda/*.cu, which include only CUDA headers, so they compile fast for every arch).
// Each op declares its launchers in its own header (csrc/cuda/<op>.h).
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>

namespace truthgpt::cuda {

enum class DType : int { F16 = 0, BF16 = 1, F32 = 2 };

inline int element_size(DType d) { return d == DType::F32 ? 4 : 2; }

// A (rows, n) matrix with unit inner stride.
struct Rows {
  void* ptr;
  int64_t row_stride;  // in elements
};

}  // namespace truthgpt::cuda
