// torch binding of the fused linear cross-entropy on CUDA: the chunk loop and its GEMMs
// (cuBLAS via ATen) are csrc/common/linear_cross_entropy_driver.h, the row kernel is
// csrc/cuda/linear_cross_entropy.cu. The logits have x's dtype (float32 accumulation inside
// the GEMM); dW accumulates over chunks in float32.
#include <torch/library.h>

#include "binding_utils.h"
#include "common/linear_cross_entropy_driver.h"
#include "linear_cross_entropy.h"

namespace truthgpt::cuda {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_cross_entropy_fwd_cuda(
    const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
    const at::Tensor& target, const c10::optional<at::Tensor>& grad_scale, int64_t ignore_index,
    double label_smoothing, double z_loss, double softcap, bool need_dweight, int64_t chunk_size) {
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor tgt = target.contiguous();
  // (the row kernel reads the bias in the logits' dtype, x's: a float32 master bias beside
  // bfloat16 x is rounded to it, as the weight is for the GEMMs)
  const at::Tensor b = bias.has_value() ? bias->to(x.scalar_type()).contiguous() : at::Tensor();
  const at::Tensor scale = grad_scale.has_value() ? grad_scale->to(at::kFloat).contiguous() : at::Tensor();
  const LceOptions opts{ignore_index, static_cast<float>(label_smoothing), static_cast<float>(z_loss),
                        static_cast<float>(softcap)};
  at::Tensor loss, zrows;
  return lce::run(x, weight, bias, tgt, grad_scale, ignore_index, need_dweight, chunk_size,
                  /*upcast=*/false, loss, zrows, [&](at::Tensor& L, int64_t r0, int64_t nc) {
    LceRows rows{L.data_ptr(), L.stride(0), b.defined() ? b.data_ptr() : nullptr,
                 tgt.const_data_ptr<int64_t>() + r0,
                 scale.defined() ? scale.const_data_ptr<float>() + r0 : nullptr,
                 loss.mutable_data_ptr<float>() + r0, zrows.mutable_data_ptr<float>() + r0,
                 L.data_ptr(), L.stride(0)};  // (the gradients in place)
    check_launch(linear_cross_entropy_rows(dtype_of(L), nc, L.size(1), rows, opts,
                                           c10::cuda::getCurrentCUDAStream()),
                 "linear_cross_entropy_fwd");
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(truthgpt, CUDA, m) {
  m.impl("linear_cross_entropy_fwd", &linear_cross_entropy_fwd_cuda);
}

}  // namespace truthgpt::cuda
