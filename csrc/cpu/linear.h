// The host-side GEMM entry points of tk.linear's CPU kernel (linear.cpp), shared with the
// grouped linear of MoE experts (grouped_linear.cpp).
#pragma once

#include <ATen/ATen.h>

namespace truthgpt {
namespace cpu {

// x (M, K) weight^T (+ bias) -> (M, N) in x's dtype: for M <= 8 the kernel that streams the
// weights once, else the GEMM engine (gemm_engine.h; float32 GEMMs for bfloat16 / float16
// where torch's GEMM for them is slow).
at::Tensor linear_2d_any(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias);

// a @ b (2-D) through the same engine, in a's dtype; a may be a transposed view.
at::Tensor gemm_2d(const at::Tensor& a, const at::Tensor& b);

}  // namespace cpu
}  // namespace truthgpt
