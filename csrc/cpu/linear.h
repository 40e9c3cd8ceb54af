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

// out = a @ b (2-D; a may be a transposed view) through the same engine: at::mm_out where
// torch's GEMM serves the dtype as it is (float32 on the BLAS engine, bfloat16 / float16 with a
// fast kernel, float64), else the product copied in (oneDNN's float32 linear has no out= form;
// float32 GEMMs for low-precision dtypes whose torch GEMM is slow).
void gemm_2d_out(at::Tensor& out, const at::Tensor& a, const at::Tensor& b);

}  // namespace cpu
}  // namespace truthgpt
