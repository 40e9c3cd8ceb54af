// Helpers for the thin torch bindings of the CUDA kernels (host code, torch headers).
#pragma once
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "launch.h"

namespace truthgpt::cuda {

inline DType dtype_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kHalf: return DType::F16;
    case at::kBFloat16: return DType::BF16;
    case at::kFloat: return DType::F32;
    default: TORCH_CHECK(false, "truthgpt CUDA kernels take float16, bfloat16 or float32, got ",
                         t.scalar_type());
  }
}

// (rows, n) view with unit inner stride; copies only when the layout cannot be viewed.
inline at::Tensor as_rows(const at::Tensor& t) {
  auto r = t.reshape({-1, t.size(-1)});
  return r.stride(1) == 1 ? r : r.contiguous();
}

inline Rows rows_of(const at::Tensor& t) { return Rows{const_cast<void*>(t.data_ptr()), t.stride(0)}; }

inline void check_launch(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, what, " CUDA launch failed: ", cudaGetErrorString(err),
              err == cudaErrorLaunchOutOfResources
                  ? " (this head dim and dtype need more shared memory per block than this GPU allows, e.g. "
                    "head dim > 192 in 16-bit or > 96 in float32 on sm_86 / sm_89 (99 KiB); backend=\"triton\" "
                    "serves the call)"
                  : "");
}

}  // namespace truthgpt::cuda
