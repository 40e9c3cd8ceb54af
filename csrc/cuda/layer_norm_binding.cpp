// torch binding of the LayerNorm CUDA kernels (csrc/cuda/layer_norm.cu): layer_norm_fwd, layer_norm_bwd.
#include <torch/library.h>

#include <limits>

#include "binding_utils.h"
#include "layer_norm.h"

namespace truthgpt::cuda {
namespace {

// The parameters as the kernels read them: both float32 or both x's dtype, contiguous; a bias
// without a weight gets a weight of ones.
struct Params {
  at::Tensor w, b;
};

void check_param(const char* name, const c10::optional<at::Tensor>& p, const at::Tensor& x) {
  if (!p.has_value() || !p->defined()) return;
  TORCH_CHECK(p->dim() == 1 && p->size(0) == x.size(-1), "layer_norm: ", name, " must be (",
              x.size(-1), ",), got ", p->sizes());
  TORCH_CHECK(p->device() == x.device(), "layer_norm: ", name, " must be on ", x.device());
}

Params params_for(const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias,
                  const at::Tensor& x) {
  check_param("weight", weight, x);
  check_param("bias", bias, x);
  const bool hw = weight.has_value() && weight->defined(), hb = bias.has_value() && bias->defined();
  if (!hw && !hb) return {};
  auto ok = [&](const at::Tensor& t) { return t.scalar_type() == x.scalar_type() || t.scalar_type() == at::kFloat; };
  at::ScalarType st = hw ? weight->scalar_type() : bias->scalar_type();
  if ((hw && !ok(*weight)) || (hb && !ok(*bias)) || (hw && hb && weight->scalar_type() != bias->scalar_type()))
    st = at::kFloat;
  Params p;
  p.w = hw ? weight->to(st).contiguous() : at::ones({x.size(-1)}, x.options().dtype(st));
  if (hb) p.b = bias->to(st).contiguous();
  return p;
}

LnAffine affine_arg(const Params& p) {
  if (!p.w.defined()) return {nullptr, nullptr, DType::F32};
  return {p.w.data_ptr(), p.b.defined() ? p.b.data_ptr() : nullptr, dtype_of(p.w)};
}

std::vector<int64_t> leading(const at::Tensor& x) {
  return std::vector<int64_t>(x.sizes().begin(), x.sizes().end() - 1);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_fwd_cuda(
    const at::Tensor& x, const c10::optional<at::Tensor>& weight,
    const c10::optional<at::Tensor>& bias, double eps) {
  TORCH_CHECK(x.dim() >= 1, "layer_norm: x must have at least one dimension");
  const c10::cuda::CUDAGuard guard(x.device());
  const DType dtype = dtype_of(x);
  const Params p = params_for(weight, bias, x);
  at::Tensor out = at::empty(x.sizes(), x.options());
  at::Tensor mean = at::empty(leading(x), x.options().dtype(at::kFloat));
  at::Tensor rstd = at::empty(leading(x), x.options().dtype(at::kFloat));
  const int64_t n = x.size(-1);
  if (x.numel() == 0) {
    if (n == 0) {  // statistics of nothing
      mean.fill_(std::numeric_limits<float>::quiet_NaN());
      rstd.fill_(std::numeric_limits<float>::quiet_NaN());
    }
    return {out, mean, rstd};
  }
  const at::Tensor x2 = as_rows(x);
  check_launch(layer_norm_fwd(dtype, x2.size(0), n, rows_of(x2), affine_arg(p), Rows{out.data_ptr(), n},
                              mean.data_ptr<float>(), rstd.data_ptr<float>(), static_cast<float>(eps),
                              c10::cuda::getCurrentCUDAStream()),
               "layer_norm_fwd");
  return {out, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_bwd_cuda(
    const at::Tensor& grad, const at::Tensor& x, const c10::optional<at::Tensor>& weight,
    const c10::optional<at::Tensor>& bias, const at::Tensor& mean, const at::Tensor& rstd) {
  const c10::cuda::CUDAGuard guard(x.device());
  TORCH_CHECK(grad.sizes() == x.sizes() && grad.scalar_type() == x.scalar_type(),
              "layer_norm_bwd: grad must match x in shape and dtype");
  TORCH_CHECK((mean.numel() * x.size(-1) == x.numel() && rstd.numel() == mean.numel()) || x.numel() == 0,
              "layer_norm_bwd: mean and rstd must have x.shape[:-1]");
  const DType dtype = dtype_of(x);
  const Params p = params_for(weight, bias, x);
  const bool has_w = p.w.defined(), has_b = p.b.defined();
  const int64_t n = x.size(-1);
  at::Tensor dx = at::empty(x.sizes(), x.options());
  at::Tensor dw = has_w ? at::empty(p.w.sizes(), p.w.options()) : at::empty({0}, x.options());
  at::Tensor db = has_b ? at::empty(p.b.sizes(), p.b.options()) : at::empty({0}, x.options());
  if (x.numel() == 0) {
    if (has_w) dw.zero_();
    if (has_b) db.zero_();
  } else {
    const at::Tensor x2 = as_rows(x), dy2 = as_rows(grad);
    const at::Tensor m = mean.to(at::kFloat).contiguous(), r = rstd.to(at::kFloat).contiguous();
    const int64_t rows = x2.size(0);
    const Rows dx_rows{dx.data_ptr(), n};
    LnBwdPlan plan;
    check_launch(layer_norm_bwd_plan(dtype, rows, n, rows_of(dy2), rows_of(x2), affine_arg(p), dx_rows,
                                     &plan),
                 "layer_norm_bwd (plan)");
    at::Tensor partial = has_w ? at::empty({has_b ? 2 : 1, plan.teams, n}, x.options().dtype(at::kFloat))
                               : at::Tensor();
    check_launch(layer_norm_bwd(dtype, rows, n, rows_of(dy2), rows_of(x2), affine_arg(p),
                                m.data_ptr<float>(), r.data_ptr<float>(), dx_rows,
                                has_w ? dw.data_ptr() : nullptr, has_b ? db.data_ptr() : nullptr,
                                has_w ? partial.data_ptr<float>() : nullptr, plan,
                                c10::cuda::getCurrentCUDAStream()),
                 "layer_norm_bwd");
  }
  // back to the caller's parameters: absent ones get empty (distinct) tensors
  const bool gave_w = weight.has_value() && weight->defined();
  const bool gave_b = bias.has_value() && bias->defined();
  dw = gave_w ? dw.to(weight->scalar_type()) : at::empty({0}, x.options());
  db = gave_b ? db.to(bias->scalar_type()) : at::empty({0}, x.options());
  return {dx, dw, db};
}

}  // namespace

TORCH_LIBRARY_IMPL(truthgpt, CUDA, m) {
  m.impl("layer_norm_fwd", &layer_norm_fwd_cuda);
  m.impl("layer_norm_bwd", &layer_norm_bwd_cuda);
}

}  // namespace truthgpt::cuda
