// torch binding of the RMSNorm CUDA kernels (csrc/cuda/rms_norm.cu): rms_norm_fwd, rms_norm_bwd.
#include <torch/library.h>

#include <limits>

#include "binding_utils.h"
#include "rms_norm.h"

namespace truthgpt::cuda {
namespace {

// The weight as the kernels read it: float32 or x's dtype (anything else is converted here).
at::Tensor weight_for(const c10::optional<at::Tensor>& weight, const at::Tensor& x) {
  if (!weight.has_value() || !weight->defined()) return at::Tensor();
  const at::Tensor& w = *weight;
  TORCH_CHECK(w.dim() == 1 && w.size(0) == x.size(-1), "rms_norm: weight must be (",
              x.size(-1), ",), got ", w.sizes());
  TORCH_CHECK(w.device() == x.device(), "rms_norm: weight must be on ", x.device());
  const bool ok = w.scalar_type() == at::kFloat || w.scalar_type() == x.scalar_type();
  return (ok ? w : w.to(at::kFloat)).contiguous();
}

RmsWeight weight_arg(const at::Tensor& w) {
  if (!w.defined()) return {nullptr, DType::F32};
  return {w.data_ptr(), dtype_of(w)};
}

std::vector<int64_t> leading(const at::Tensor& x) {
  return std::vector<int64_t>(x.sizes().begin(), x.sizes().end() - 1);
}

std::tuple<at::Tensor, at::Tensor> rms_norm_fwd_cuda(const at::Tensor& x,
                                                     const c10::optional<at::Tensor>& weight,
                                                     double eps) {
  TORCH_CHECK(x.dim() >= 1, "rms_norm: x must have at least one dimension");
  const c10::cuda::CUDAGuard guard(x.device());
  const DType dtype = dtype_of(x);
  const at::Tensor w = weight_for(weight, x);
  at::Tensor out = at::empty(x.sizes(), x.options());
  at::Tensor rstd = at::empty(leading(x), x.options().dtype(at::kFloat));
  const int64_t n = x.size(-1);
  if (x.numel() == 0) {
    if (n == 0) rstd.fill_(std::numeric_limits<float>::quiet_NaN());  // mean of nothing
    return {out, rstd};
  }
  const at::Tensor x2 = as_rows(x);
  check_launch(rms_norm_fwd(dtype, x2.size(0), n, rows_of(x2), weight_arg(w),
                            Rows{out.data_ptr(), n}, rstd.data_ptr<float>(),
                            static_cast<float>(eps), c10::cuda::getCurrentCUDAStream()),
               "rms_norm_fwd");
  return {out, rstd};
}

std::tuple<at::Tensor, at::Tensor> rms_norm_bwd_cuda(const at::Tensor& grad, const at::Tensor& x,
                                                     const c10::optional<at::Tensor>& weight,
                                                     const at::Tensor& rstd) {
  const c10::cuda::CUDAGuard guard(x.device());
  TORCH_CHECK(grad.sizes() == x.sizes() && grad.scalar_type() == x.scalar_type(),
              "rms_norm_bwd: grad must match x in shape and dtype");
  TORCH_CHECK(rstd.numel() * x.size(-1) == x.numel() || x.numel() == 0,
              "rms_norm_bwd: rstd must have x.shape[:-1]");
  const DType dtype = dtype_of(x);
  const at::Tensor w = weight_for(weight, x);
  const bool has_w = w.defined();
  const int64_t n = x.size(-1);
  at::Tensor dx = at::empty(x.sizes(), x.options());
  at::Tensor dw = has_w ? at::empty(w.sizes(), w.options()) : at::empty({0}, x.options());
  if (x.numel() == 0) {
    if (has_w) dw.zero_();
  } else {
    const at::Tensor x2 = as_rows(x), dy2 = as_rows(grad);
    const at::Tensor r = rstd.to(at::kFloat).contiguous();
    const int64_t rows = x2.size(0);
    const Rows dx_rows{dx.data_ptr(), n};
    RmsBwdPlan plan;
    check_launch(rms_norm_bwd_plan(dtype, rows, n, rows_of(dy2), rows_of(x2), weight_arg(w),
                                   dx_rows, &plan),
                 "rms_norm_bwd (plan)");
    at::Tensor partial = has_w ? at::empty({plan.teams, n}, x.options().dtype(at::kFloat))
                               : at::Tensor();
    check_launch(rms_norm_bwd(dtype, rows, n, rows_of(dy2), rows_of(x2), weight_arg(w),
                              r.data_ptr<float>(), dx_rows, has_w ? dw.data_ptr() : nullptr,
                              has_w ? partial.data_ptr<float>() : nullptr, plan,
                              c10::cuda::getCurrentCUDAStream()),
                 "rms_norm_bwd");
  }
  if (has_w && weight->scalar_type() != dw.scalar_type()) dw = dw.to(weight->scalar_type());
  return {dx, dw};
}

}  // namespace

TORCH_LIBRARY_IMPL(truthgpt, CUDA, m) {
  m.impl("rms_norm_fwd", &rms_norm_fwd_cuda);
  m.impl("rms_norm_bwd", &rms_norm_bwd_cuda);
}

}  // namespace truthgpt::cuda
