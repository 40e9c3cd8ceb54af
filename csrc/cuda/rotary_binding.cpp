// torch binding of the rotary CUDA kernel (csrc/cuda/rotary.cu): rotary_fwd, rotary_qk_fwd.
#include <torch/library.h>

#include "binding_utils.h"
#include "rotary.h"

namespace truthgpt::cuda {
namespace {

rotary::Operand operand_of(const at::Tensor& x, const at::Tensor& out) {
  return {x.data_ptr(), out.data_ptr(), x.size(1), x.stride(0), x.stride(1), x.stride(2), x.stride(3)};
}

// Rotates q and, when k is given, k; returns the contiguous outputs.
std::tuple<at::Tensor, at::Tensor> rotate(const at::Tensor& q, const at::Tensor* k,
                                          const at::Tensor& cos, const at::Tensor& sin,
                                          const at::Tensor& position_ids, bool interleaved) {
  const c10::cuda::CUDAGuard guard(q.device());
  TORCH_CHECK(q.dim() == 4, "rotary: x must be (B, H, S, D), got ", q.sizes());
  const int64_t B = q.size(0), S = q.size(2), D = q.size(3), half = cos.size(-1);
  TORCH_CHECK(cos.dim() == 2 && sin.sizes() == cos.sizes() && 2 * half <= D && half >= 1,
              "rotary: cos/sin must be (P, R/2) with 2 <= R <= D, got ", cos.sizes(), " and ",
              sin.sizes(), " for head dim ", D);
  TORCH_CHECK(position_ids.dim() == 2 && position_ids.size(0) == B && position_ids.size(1) == S,
              "rotary: position_ids must be (B, S) = (", B, ", ", S, "), got ", position_ids.sizes());
  TORCH_CHECK(cos.size(0) > 0 || B * S == 0, "rotary: cos/sin have no rows");
  if (k) {
    TORCH_CHECK(k->dim() == 4 && k->size(0) == B && k->size(2) == S && k->size(3) == D &&
                    k->scalar_type() == q.scalar_type() && k->device() == q.device(),
                "rotary: k must match q in batch, seq, head dim, dtype and device");
  }
  for (const at::Tensor* t : {&cos, &sin, &position_ids})
    TORCH_CHECK(t->device() == q.device(), "rotary: all inputs must be on ", q.device());
  const DType dtype = dtype_of(q);
  // cos/sin are read as float32 or as x's dtype; anything else is converted once here.
  const bool table_ok = cos.scalar_type() == sin.scalar_type() &&
                        (cos.scalar_type() == at::kFloat || cos.scalar_type() == q.scalar_type());
  const at::Tensor c = table_ok ? cos : cos.to(at::kFloat);
  const at::Tensor s = table_ok ? sin : sin.to(at::kFloat);
  const at::Tensor pos = position_ids.to(at::kLong);
  at::Tensor qo = at::empty(q.sizes(), q.options());
  at::Tensor ko = k ? at::empty(k->sizes(), k->options()) : at::Tensor();
  const rotary::Operand none{nullptr, nullptr, 0, 0, 0, 0, 0};
  const rotary::Table table{c.data_ptr(), s.data_ptr(), c.stride(0), c.stride(1), s.stride(0),
                            s.stride(1), c.size(0)};
  const rotary::Positions positions{pos.data_ptr<int64_t>(), pos.stride(0), pos.stride(1)};
  check_launch(rotary_fwd(dtype, c.scalar_type() == at::kFloat ? DType::F32 : dtype, B, S, D, half,
                          interleaved, operand_of(q, qo), k ? operand_of(*k, ko) : none, table,
                          positions, c10::cuda::getCurrentCUDAStream()),
               "rotary_fwd");
  return {qo, ko};
}

at::Tensor rotary_fwd_cuda(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin,
                           const at::Tensor& position_ids, bool interleaved) {
  return std::get<0>(rotate(x, nullptr, cos, sin, position_ids, interleaved));
}

std::tuple<at::Tensor, at::Tensor> rotary_qk_fwd_cuda(const at::Tensor& q, const at::Tensor& k,
                                                      const at::Tensor& cos, const at::Tensor& sin,
                                                      const at::Tensor& position_ids,
                                                      bool interleaved) {
  return rotate(q, &k, cos, sin, position_ids, interleaved);
}

}  // namespace

TORCH_LIBRARY_IMPL(truthgpt, CUDA, m) {
  m.impl("rotary_fwd", &rotary_fwd_cuda);
  m.impl("rotary_qk_fwd", &rotary_qk_fwd_cuda);
}

}  // namespace truthgpt::cuda
