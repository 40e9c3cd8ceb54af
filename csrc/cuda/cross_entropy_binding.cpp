// torch binding of the fused cross-entropy on given logits (truthgpt::cross_entropy_fwd) on
// CUDA: the row kernel of the fused linear cross-entropy (csrc/cuda/linear_cross_entropy.cu),
// reading the logits and writing the gradients into a new (N, V) tensor of their dtype, or over
// the logits themselves (truthgpt::cross_entropy_grad_).
#include <torch/library.h>

#include "binding_utils.h"
#include "common/linear_cross_entropy_driver.h"
#include "linear_cross_entropy.h"

namespace truthgpt::cuda {
namespace {

// inplace (cross_entropy_grad_): the gradient written over the logits' rows (the row kernel
// reads each element before writing it, as in the fused linear cross-entropy's chunks).
std::tuple<at::Tensor, at::Tensor, at::Tensor> cross_entropy_rows_cuda(
    const at::Tensor& logits_in, const at::Tensor& target, const c10::optional<at::Tensor>& grad_scale,
    int64_t ignore_index, double label_smoothing, double z_loss, double softcap, bool inplace) {
  TORCH_CHECK(logits_in.dim() == 2, "cross_entropy_fwd: logits must be (N, V), got ", logits_in.sizes());
  const int64_t N = logits_in.size(0), V = logits_in.size(1);
  TORCH_CHECK(target.dim() == 1 && target.size(0) == N && target.scalar_type() == at::kLong,
              "cross_entropy_fwd: target must be int64 (N,)");
  if (grad_scale.has_value()) {
    TORCH_CHECK(grad_scale->numel() == N, "cross_entropy_fwd: grad_scale must have N elements");
  }
  const c10::cuda::CUDAGuard guard(logits_in.device());
  lce::check_targets(target, V, ignore_index);
  TORCH_CHECK(!inplace || ((logits_in.stride(1) == 1 || V <= 1) && grad_scale.has_value()),
              "cross_entropy_grad_: logits must have unit inner stride, and grad_scale is required");
  const at::Tensor logits = logits_in.stride(1) == 1 || V <= 1 ? logits_in : logits_in.contiguous();
  const at::Tensor tgt = target.contiguous();
  const at::Tensor scale = grad_scale.has_value() ? grad_scale->to(at::kFloat).contiguous() : at::Tensor();
  at::Tensor loss = at::empty({N}, logits.options().dtype(at::kFloat));
  at::Tensor zrows = at::empty({N}, logits.options().dtype(at::kFloat));
  at::Tensor dl = scale.defined() && !inplace ? at::empty({N, V}, logits.options()) : at::empty({0}, logits.options());
  if (N == 0) return {loss, zrows, dl};
  const LceOptions opts{ignore_index, static_cast<float>(label_smoothing), static_cast<float>(z_loss),
                        static_cast<float>(softcap)};
  LceRows rows{const_cast<void*>(logits.const_data_ptr()), logits.stride(0), nullptr,
               tgt.const_data_ptr<int64_t>(),
               scale.defined() ? scale.const_data_ptr<float>() : nullptr,
               loss.mutable_data_ptr<float>(), zrows.mutable_data_ptr<float>(),
               inplace ? const_cast<void*>(logits.const_data_ptr()) : scale.defined() ? dl.data_ptr() : nullptr,
               inplace ? logits.stride(0) : scale.defined() ? V : 0};
  check_launch(linear_cross_entropy_rows(dtype_of(logits), N, V, rows, opts,
                                         c10::cuda::getCurrentCUDAStream()),
               "cross_entropy_fwd");
  return {loss, zrows, dl};
}

}  // namespace

TORCH_LIBRARY_IMPL(truthgpt, CUDA, m) {
  m.impl("cross_entropy_fwd", &lce::cross_entropy_fwd<cross_entropy_rows_cuda>);
  m.impl("cross_entropy_grad_", &lce::cross_entropy_grad_<cross_entropy_rows_cuda>);
}

}  // namespace truthgpt::cuda
