// torch binding of the SwiGLU CUDA kernels (csrc/cuda/swiglu.cu).
#include <torch/library.h>

#include "binding_utils.h"
#include "swiglu.h"

namespace truthgpt::cuda {
namespace {

at::Tensor swiglu_fwd_cuda(const at::Tensor& gate, const at::Tensor& up) {
  const c10::cuda::CUDAGuard guard(gate.device());
  auto g = as_rows(gate), u = as_rows(up);
  auto out = at::empty(g.sizes(), gate.options());
  check_launch(swiglu_fwd(dtype_of(gate), g.size(0), g.size(1), rows_of(g), rows_of(u),
                          rows_of(out), c10::cuda::getCurrentCUDAStream()),
               "swiglu_fwd");
  return out.view(gate.sizes());
}

std::tuple<at::Tensor, at::Tensor> swiglu_bwd_cuda(const at::Tensor& grad, const at::Tensor& gate,
                                                   const at::Tensor& up) {
  const c10::cuda::CUDAGuard guard(gate.device());
  auto y = as_rows(grad), g = as_rows(gate), u = as_rows(up);
  auto dg = at::empty(g.sizes(), gate.options());
  auto du = at::empty(g.sizes(), gate.options());
  check_launch(swiglu_bwd(dtype_of(gate), g.size(0), g.size(1), rows_of(y), rows_of(g),
                          rows_of(u), rows_of(dg), rows_of(du), c10::cuda::getCurrentCUDAStream()),
               "swiglu_bwd");
  return {dg.view(gate.sizes()), du.view(gate.sizes())};
}

}  // namespace

TORCH_LIBRARY_IMPL(truthgpt, CUDA, m) {
  m.impl("swiglu_fwd", &swiglu_fwd_cuda);
  m.impl("swiglu_bwd", &swiglu_bwd_cuda);
}

}  // namespace truthgpt::cuda
