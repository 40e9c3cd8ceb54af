// SwiGLU on the CPU: out = silu(gate) * up, and its backward recomputing silu
// (dgate = dy * up * s * (1 + g * (1 - s)), dup = dy * g * s, s = sigmoid(g)).
// Vectorised per instruction set (cpu/vec_utils.h; this file's kernel section is compiled
// once per set), threaded over (row, column block) tasks with at::parallel_for.
// Math in float for float/bf16/fp16 (a polynomial exp), in double for double.
#ifndef TRUTHGPT_KERNEL_SECTION  // ================================================ host part

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "cpu/tensor_utils.h"
#define TRUTHGPT_KERNELS_FILE "cpu/swiglu.cpp"
#include "cpu/foreach_isa.h"

namespace truthgpt {
namespace {

using namespace cpu;

// Columns per task: rows are cut into blocks of this many, so one long row still spreads
// over the threads.
constexpr int64_t kBlock = 16384;
// Minimum elements per thread: below this, threading costs more than it saves.
constexpr int64_t kGrainElems = 16384;

void check_inputs(const char* op, const at::Tensor& gate, const at::Tensor& up) {
  TORCH_CHECK(gate.dim() >= 1, op, ": gate must have at least one dimension");
  TORCH_CHECK(gate.sizes() == up.sizes(), op, ": gate ", gate.sizes(), " and up ", up.sizes(),
              " must have the same shape");
  TORCH_CHECK(gate.scalar_type() == up.scalar_type(), op, ": gate (", gate.scalar_type(),
              ") and up (", up.scalar_type(), ") must have the same dtype");
}

// Runs fn(t0, t1) over the (row, column block) tasks of a (rows, n) problem.
template <class F>
void for_tasks(int64_t rows, int64_t n, F&& fn) {
  const int64_t nb = (n + kBlock - 1) / kBlock;
  const int64_t grain = std::max<int64_t>(1, kGrainElems / std::min(n, kBlock));
  at::parallel_for(0, rows * nb, grain, fn);
}

at::Tensor swiglu_fwd(const at::Tensor& gate, const at::Tensor& up) {
  check_inputs("swiglu_fwd", gate, up);
  auto out = new_output(gate.sizes(), gate.scalar_type());
  if (out.numel() == 0) return out;
  auto g = as_rows(gate), u = as_rows(up);
  const int64_t rows = g.size(0), n = g.size(1);
  const Isa isa = active_isa();
  dispatch_kernel_types(gate.scalar_type(), "swiglu_fwd", [&](auto tag) {
    using T = typename decltype(tag)::type;
    const auto fn = TRUTHGPT_ISA_FN(isa, swiglu_fwd_tasks<T>);
    const T* gp = cptr<T>(g);
    const T* upp = cptr<T>(u);
    T* op = mptr<T>(out);
    const int64_t gs = row_stride(g), us = row_stride(u);
    for_tasks(rows, n, [&](int64_t t0, int64_t t1) { fn(gp, gs, upp, us, op, n, kBlock, t0, t1); });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> swiglu_bwd(const at::Tensor& grad, const at::Tensor& gate,
                                              const at::Tensor& up) {
  check_inputs("swiglu_bwd", gate, up);
  TORCH_CHECK(grad.sizes() == gate.sizes() && grad.scalar_type() == gate.scalar_type(),
              "swiglu_bwd: grad must have the shape and dtype of gate");
  auto dgate = new_output(gate.sizes(), gate.scalar_type());
  auto dup = new_output(gate.sizes(), gate.scalar_type());
  if (gate.numel() == 0) return {dgate, dup};
  auto y = as_rows(grad), g = as_rows(gate), u = as_rows(up);
  const int64_t rows = g.size(0), n = g.size(1);
  const Isa isa = active_isa();
  dispatch_kernel_types(gate.scalar_type(), "swiglu_bwd", [&](auto tag) {
    using T = typename decltype(tag)::type;
    const auto fn = TRUTHGPT_ISA_FN(isa, swiglu_bwd_tasks<T>);
    const T* yp = cptr<T>(y);
    const T* gp = cptr<T>(g);
    const T* upp = cptr<T>(u);
    T* dgp = mptr<T>(dgate);
    T* dup_p = mptr<T>(dup);
    const int64_t ys = row_stride(y), gs = row_stride(g), us = row_stride(u);
    for_tasks(rows, n, [&](int64_t t0, int64_t t1) {
      fn(yp, ys, gp, gs, upp, us, dgp, dup_p, n, kBlock, t0, t1);
    });
  });
  return {dgate, dup};
}

}  // namespace

TORCH_LIBRARY_IMPL(truthgpt, CPU, m) {
  m.impl("swiglu_fwd", &swiglu_fwd);
  m.impl("swiglu_bwd", &swiglu_bwd);
}

}  // namespace truthgpt

#else  // ========================================== kernel section (once per instruction set)

// Task t covers row t / nb, columns [b * block, min(n, (b + 1) * block)), b = t % nb.
// Inputs have unit inner stride and row strides gs, us...; outputs are contiguous (rows, n).
template <class T>
void swiglu_fwd_tasks(const T* g, int64_t gs, const T* u, int64_t us, T* out, int64_t n,
                      int64_t block, int64_t t0, int64_t t1) {
  using V = VecFor<T>;
  const int64_t nb = (n + block - 1) / block;
  int64_t r = t0 / nb, b = t0 % nb;
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t c0 = b * block, len = std::min(n, c0 + block) - c0;
    const T* gr = g + r * gs + c0;
    const T* ur = u + r * us + c0;
    T* orow = out + r * n + c0;
    for (int64_t i = 0; i < len; i += V::W) {
      const int64_t m = len - i;
      const V x = V::load(gr + i, m);
      (x * V::sigmoid(x) * V::load(ur + i, m)).store(orow + i, m);
    }
    if (++b == nb) {
      b = 0;
      ++r;
    }
  }
}

template <class T>
void swiglu_bwd_tasks(const T* dy, int64_t ys, const T* g, int64_t gs, const T* u, int64_t us,
                      T* dg, T* du, int64_t n, int64_t block, int64_t t0, int64_t t1) {
  using V = VecFor<T>;
  const V one = V::set1(1);
  const int64_t nb = (n + block - 1) / block;
  int64_t r = t0 / nb, b = t0 % nb;
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t c0 = b * block, len = std::min(n, c0 + block) - c0;
    const T* yr = dy + r * ys + c0;
    const T* gr = g + r * gs + c0;
    const T* ur = u + r * us + c0;
    T* dgr = dg + r * n + c0;
    T* dur = du + r * n + c0;
    for (int64_t i = 0; i < len; i += V::W) {
      const int64_t m = len - i;
      const V x = V::load(gr + i, m);
      const V y = V::load(yr + i, m);
      const V s = V::sigmoid(x);
      (y * x * s).store(dur + i, m);
      (y * V::load(ur + i, m) * s * V::fma(x, one - s, one)).store(dgr + i, m);
    }
    if (++b == nb) {
      b = 0;
      ++r;
    }
  }
}

#endif  // TRUTHGPT_KERNEL_SECTION
