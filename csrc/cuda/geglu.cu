// GeGLU CUDA kernels: out = gelu(gate) * up; backward recomputes gelu. fp32 math.
// Kernels and launch are the gated activations' (gated_activation.cuh); per-element math in
// geglu_math.cuh.
#include "gated_activation.cuh"
#include "geglu.h"
#include "geglu_math.cuh"

namespace truthgpt::cuda {
namespace {

template <bool Tanh>
struct GegluOp {
  static TG_HD float fwd(float g, float u) { return geglu::fwd<Tanh>(g, u); }
  static TG_HD void bwd(float dy, float g, float u, float& dg, float& du) {
    geglu::bwd<Tanh>(dy, g, u, dg, du);
  }
};

}  // namespace

cudaError_t geglu_fwd(DType dtype, bool tanh, int64_t rows, int64_t n, Rows gate, Rows up, Rows out,
                      cudaStream_t stream) {
  return tanh ? gated::fwd<GegluOp<true>>(dtype, rows, n, gate, up, out, stream)
              : gated::fwd<GegluOp<false>>(dtype, rows, n, gate, up, out, stream);
}

cudaError_t geglu_bwd(DType dtype, bool tanh, int64_t rows, int64_t n, Rows grad, Rows gate, Rows up,
                      Rows dgate, Rows dup, cudaStream_t stream) {
  return tanh ? gated::bwd<GegluOp<true>>(dtype, rows, n, grad, gate, up, dgate, dup, stream)
              : gated::bwd<GegluOp<false>>(dtype, rows, n, grad, gate, up, dgate, dup, stream);
}

}  // namespace truthgpt::cuda
