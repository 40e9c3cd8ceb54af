// Host-side helpers of the CPU kernels: tensor views, dtype dispatch, raw pointers.
// (The kernel sections themselves see only cpu/vec_utils.h; see there.)
#pragma once

#include <ATen/ATen.h>

#include "cpu/vec_utils.h"

namespace truthgpt {
namespace cpu {

template <class T>
struct AtType {
  using type = T;
};
template <>
struct AtType<bf16> {
  using type = at::BFloat16;
};

template <class T>
const T* cptr(const at::Tensor& t) {
  return reinterpret_cast<const T*>(t.const_data_ptr<typename AtType<T>::type>());
}
template <class T>
T* mptr(at::Tensor& t) {
  return reinterpret_cast<T*>(t.mutable_data_ptr<typename AtType<T>::type>());
}

template <class T>
struct Tag {
  using type = T;
};

// Calls f(Tag<T>{}) with T the kernel element type of `st`: float, double or bf16.
template <class F>
void dispatch_kernel_types(at::ScalarType st, const char* op, F&& f) {
  switch (st) {
    case at::kFloat:
      f(Tag<float>{});
      return;
    case at::kDouble:
      f(Tag<double>{});
      return;
    case at::kBFloat16:
      f(Tag<bf16>{});
      return;
    default:
      TORCH_CHECK(false, op, ": the CPU kernels take float32, bfloat16 and float64, got ", st);
  }
}

// Rows of `t` as a (rows, n) view with unit inner stride (any row stride); copies only
// when the layout cannot be viewed so.
inline at::Tensor as_rows(const at::Tensor& t) {
  auto r = t.reshape({-1, t.size(-1)});
  return (r.size(1) <= 1 || r.stride(1) == 1) ? r : r.contiguous();
}

// Row stride of a (rows, n) view; any value works for a single row.
inline int64_t row_stride(const at::Tensor& r) { return r.size(0) <= 1 ? r.size(1) : r.stride(0); }

}  // namespace cpu
}  // namespace truthgpt
