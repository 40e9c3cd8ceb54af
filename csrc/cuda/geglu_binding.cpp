// torch binding of the GeGLU CUDA kernels (csrc/cuda/geglu.cu).
#include <torch/library.h>

#include "binding_utils.h"
#include "geglu.h"

namespace truthgpt::cuda {
namespace {

bool is_tanh(c10::string_view approximate) {
  TORCH_CHECK(approximate == "tanh" || approximate == "none",
              "geglu: approximate must be 'tanh' or 'none', got '", approximate, "'");
  return approximate == "tanh";
}

at::Tensor geglu_fwd_cuda(const at::Tensor& gate, const at::Tensor& up, c10::string_view approximate) {
  const bool tanh = is_tanh(approximate);
  const c10::cuda::CUDAGuard guard(gate.device());
  auto g = as_rows(gate), u = as_rows(up);
  auto out = at::empty(g.sizes(), gate.options());
  check_launch(geglu_fwd(dtype_of(gate), tanh, g.size(0), g.size(1), rows_of(g), rows_of(u),
                         rows_of(out), c10::cuda::getCurrentCUDAStream()),
               "geglu_fwd");
  return out.view(gate.sizes());
}

std::tuple<at::Tensor, at::Tensor> geglu_bwd_cuda(const at::Tensor& grad, const at::Tensor& gate,
                                                  const at::Tensor& up, c10::string_view approximate) {
  const bool tanh = is_tanh(approximate);
  const c10::cuda::CUDAGuard guard(gate.device());
  auto y = as_rows(grad), g = as_rows(gate), u = as_rows(up);
  auto dg = at::empty(g.sizes(), gate.options());
  auto du = at::empty(g.sizes(), gate.options());
  check_launch(geglu_bwd(dtype_of(gate), tanh, g.size(0), g.size(1), rows_of(y), rows_of(g),
                         rows_of(u), rows_of(dg), rows_of(du), c10::cuda::getCurrentCUDAStream()),
               "geglu_bwd");
  return {dg.view(gate.sizes()), du.view(gate.sizes())};
}

}  // namespace

TORCH_LIBRARY_IMPL(truthgpt, CUDA, m) {
  m.impl("geglu_fwd", &geglu_fwd_cuda);
  m.impl("geglu_bwd", &geglu_bwd_cuda);
}

}  // namespace truthgpt::cuda
