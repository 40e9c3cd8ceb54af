// Which library runs the CPU kernels' large float32 GEMMs (tk.linear's forward and backward,
// the fused linear cross-entropy's chunk GEMMs) and whether the attention kernel's tile GEMMs
// go to MKL or to our AVX-512 micro-kernels.
//
// torch's at::mm calls MKL's sgemm. MKL picks its code path by CPU vendor: on AMD CPUs it runs
// its AVX2 kernels even where the CPU has AVX-512 (measured on an AMD Zen 5, 2 cores: MKL sgemm
// 115-120 GFLOP/s a core, oneDNN's AVX-512 GEMM 260-275, BENCHMARKS.md). oneDNN, which torch
// also ships (mkldnn::_linear_pointwise), picks its kernels by instruction set. Which one is
// faster is measured once per process (`calibration()`: a 256 x 512 x 512 product each way,
// best of 5, interleaved) on CPUs with AVX-512. On Intel CPUs oneDNN is used when it is at
// least 1.2x faster; on others (where MKL runs its generic code) BLAS is used only when it is at
// least 1.2x faster, so a near tie does not flip the engine from one process to the next.
// Both compute in float32 with float32 accumulation (results differ by rounding only);
// oneDNN follows torch's float32 matmul precision setting, as at::mm does.
//
// TRUTHGPT_CPU_GEMM (read at each call): auto (default) | blas | onednn.
#pragma once

#include <ATen/ATen.h>

#include <string>

namespace truthgpt {
namespace cpu {

struct GemmCalibration {
  bool measured = false;      // false: no AVX-512, or torch without oneDNN: nothing to compare
  double blas_gflops = 0.0;   // at::mm (torch's BLAS), float32, threads in force at the time
  double onednn_gflops = 0.0;
  bool blas_is_slow = false;  // Intel: oneDNN >= 1.2x at::mm; others: at::mm < 1.2x oneDNN
};

// Does torch's CPU GEMM have a fast kernel for dtype t here? bfloat16: oneDNN's, on AVX-512
// BW/VL/DQ or AMX; float16: AVX512-FP16 or AMX. Elsewhere (AVX2 machines) torch's GEMMs for
// them run at 1-15 GFLOP/s against ~100 for float32 (BENCHMARKS.md). float32 / float64: true.
bool torch_has_fast_gemm(at::ScalarType t);

// Is this an Intel CPU (whose MKL code paths torch's BLAS and the attention's MKL GEMMs use)?
bool cpu_is_intel();

// Measured on first use (not from inside a parallel region: call it at an op's entry).
const GemmCalibration& calibration();

// Does tk.linear / the linear cross-entropy send float32 GEMMs to oneDNN now
// (TRUTHGPT_CPU_GEMM, else the calibration)?
bool use_onednn_fp32();

// "onednn" or "blas", with the calibration's numbers, for logs and tk.explain.
std::string gemm_engine_description();

// x (..., K) W^T (+ bias) and a @ b in float32 through the engine in force; other dtypes and
// empty products: at::linear / at::mm. Operands may be strided views (oneDNN reads strides).
// Autocast is excluded inside (an op may run under torch.autocast).
at::Tensor linear_f32(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias);
// mm_f32 with contiguous = false may return a transposed view (when a is one: see there).
at::Tensor mm_f32(const at::Tensor& a, const at::Tensor& b, bool contiguous = true);

}  // namespace cpu
}  // namespace truthgpt
