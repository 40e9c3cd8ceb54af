// SwiGLU CUDA kernels: out = silu(gate) * up; backward recomputes silu. fp32 math.
// Kernels and launch are the gated activations' (gated_activation.cuh); per-element math in
// swiglu_math.cuh.
#include "gated_activation.cuh"
#include "swiglu.h"
#include "swiglu_math.cuh"

namespace truthgpt::cuda {
namespace {

struct SwigluOp {
  static TG_HD float fwd(float g, float u) { return swiglu::fwd(g, u); }
  static TG_HD void bwd(float dy, float g, float u, float& dg, float& du) {
    swiglu::bwd(dy, g, u, dg, du);
  }
};

}  // namespace

cudaError_t swiglu_fwd(DType dtype, int64_t rows, int64_t n, Rows gate, Rows up, Rows out,
                       cudaStream_t stream) {
  return gated::fwd<SwigluOp>(dtype, rows, n, gate, up, out, stream);
}

cudaError_t swiglu_bwd(DType dtype, int64_t rows, int64_t n, Rows grad, Rows gate, Rows up,
                       Rows dgate, Rows dup, cudaStream_t stream) {
  return gated::bwd<SwigluOp>(dtype, rows, n, grad, gate, up, dgate, dup, stream);
}

}  // namespace truthgpt::cuda
