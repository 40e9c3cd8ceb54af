// SwiGLU on the CPU: out = silu(gate) * up, and its backward recomputing silu.
// Rows are split across threads with at::parallel_for; math in float (double for fp64).
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>

namespace truthgpt {
namespace {

// (rows, n) view with unit inner stride; copies only when the layout cannot be viewed.
at::Tensor as_rows(const at::Tensor& t) {
  auto r = t.reshape({-1, t.size(-1)});
  return r.stride(1) == 1 ? r : r.contiguous();
}

template <typename T>
void swiglu_fwd_kernel(const at::Tensor& g, const at::Tensor& u, at::Tensor& out) {
  using acc = at::opmath_type<T>;
  const int64_t rows = g.size(0), n = g.size(1);
  const int64_t gs = g.stride(0), us = u.stride(0);
  const T* gp = g.const_data_ptr<T>();
  const T* up = u.const_data_ptr<T>();
  T* op = out.data_ptr<T>();
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(n, 1));
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* gr = gp + r * gs;
      const T* ur = up + r * us;
      T* orow = op + r * n;
      for (int64_t i = 0; i < n; ++i) {
        const acc x = static_cast<acc>(gr[i]);
        orow[i] = static_cast<T>(x / (acc(1) + std::exp(-x)) * static_cast<acc>(ur[i]));
      }
    }
  });
}

template <typename T>
void swiglu_bwd_kernel(const at::Tensor& dy, const at::Tensor& g, const at::Tensor& u,
                       at::Tensor& dg, at::Tensor& du) {
  using acc = at::opmath_type<T>;
  const int64_t rows = g.size(0), n = g.size(1);
  const int64_t ys = dy.stride(0), gs = g.stride(0), us = u.stride(0);
  const T* yp = dy.const_data_ptr<T>();
  const T* gp = g.const_data_ptr<T>();
  const T* up = u.const_data_ptr<T>();
  T* dgp = dg.data_ptr<T>();
  T* dup = du.data_ptr<T>();
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(n, 1));
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      for (int64_t i = 0; i < n; ++i) {
        const acc x = static_cast<acc>(gp[r * gs + i]);
        const acc y = static_cast<acc>(yp[r * ys + i]);
        const acc sig = acc(1) / (acc(1) + std::exp(-x));
        const acc silu = x * sig;
        dup[r * n + i] = static_cast<T>(y * silu);
        // d silu / dx = sig * (1 + x * (1 - sig))
        dgp[r * n + i] = static_cast<T>(y * static_cast<acc>(up[r * us + i]) * sig *
                                        (acc(1) + x * (acc(1) - sig)));
      }
    }
  });
}

at::Tensor swiglu_fwd(const at::Tensor& gate, const at::Tensor& up) {
  auto g = as_rows(gate), u = as_rows(up);
  auto out = at::empty(g.sizes(), gate.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, gate.scalar_type(), "swiglu_fwd",
                                  [&] { swiglu_fwd_kernel<scalar_t>(g, u, out); });
  return out.view(gate.sizes());
}

std::tuple<at::Tensor, at::Tensor> swiglu_bwd(const at::Tensor& grad, const at::Tensor& gate,
                                              const at::Tensor& up) {
  auto y = as_rows(grad), g = as_rows(gate), u = as_rows(up);
  auto dg = at::empty(g.sizes(), gate.options());
  auto du = at::empty(g.sizes(), gate.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, gate.scalar_type(), "swiglu_bwd",
                                  [&] { swiglu_bwd_kernel<scalar_t>(y, g, u, dg, du); });
  return {dg.view(gate.sizes()), du.view(gate.sizes())};
}

}  // namespace

TORCH_LIBRARY_IMPL(truthgpt, CPU, m) {
  m.impl("swiglu_fwd", &swiglu_fwd);
  m.impl("swiglu_bwd", &swiglu_bwd);
}

}  // namespace truthgpt
