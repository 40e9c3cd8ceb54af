// GeGLU on the CPU: out = gelu(gate) * up, and its backward recomputing gelu
// (dgate = dy * up * gelu'(g), dup = dy * gelu(g)). Two forms of gelu, as F.gelu:
//   "tanh": g * s with s = sigmoid(2k), k = sqrt(2/pi) (g + 0.044715 g^3)   (0.5 (1 + tanh k)
//           = sigmoid(2k)), gelu' = s + g s (1 - s) 2 sqrt(2/pi) (1 + 3 * 0.044715 g^2);
//   "none": g * Phi(g), Phi the standard normal CDF, gelu' = Phi(g) + g exp(-g^2/2) / sqrt(2 pi).
// Phi in float: Phi(g) = 1 - h for g >= 0 and h for g < 0, h = erfc(|g| / sqrt 2) / 2
// = exp(-g^2/2) t P(t) / 2 with t = 1 / (1 + |g| / (2 sqrt 2)) and P a degree-10 polynomial
// fitted (weighted least squares on Chebyshev nodes, our own fit) to erfcx(a) / t, a = |g| /
// sqrt 2, over all a >= 0: relative error 1.2e-8 in exact arithmetic, Phi within 1.7e-7 of
// the exact value in float (tails relatively accurate: no 1 - erf cancellation). Double uses
// std::erfc.
// Vectorised per instruction set (cpu/vec_utils.h; this file's kernel section is compiled
// once per set), threaded over (row, column block) tasks with at::parallel_for.
#ifndef TRUTHGPT_KERNEL_SECTION  // ================================================ host part

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "cpu/tensor_utils.h"
#define TRUTHGPT_KERNELS_FILE "cpu/geglu.cpp"
#include "cpu/foreach_isa.h"

namespace truthgpt {
namespace {

using namespace cpu;

// Columns per task: rows are cut into blocks of this many, so one long row still spreads
// over the threads.
constexpr int64_t kBlock = 16384;
// Minimum elements per thread: below this, threading costs more than it saves.
constexpr int64_t kGrainElems = 16384;

// true for "tanh", false for "none"
bool check_inputs(const char* op, const at::Tensor& gate, const at::Tensor& up,
                  c10::string_view approximate) {
  TORCH_CHECK(gate.dim() >= 1, op, ": gate must have at least one dimension");
  TORCH_CHECK(gate.sizes() == up.sizes(), op, ": gate ", gate.sizes(), " and up ", up.sizes(),
              " must have the same shape");
  TORCH_CHECK(gate.scalar_type() == up.scalar_type(), op, ": gate (", gate.scalar_type(),
              ") and up (", up.scalar_type(), ") must have the same dtype");
  TORCH_CHECK(approximate == "tanh" || approximate == "none", op,
              ": approximate must be 'tanh' or 'none', got '", approximate, "'");
  return approximate == "tanh";
}

// Calls f(std::bool_constant<Tanh>{}).
template <class F>
void dispatch_form(bool tanh, F&& f) {
  if (tanh) {
    f(std::true_type{});
  } else {
    f(std::false_type{});
  }
}

// Runs fn(t0, t1) over the (row, column block) tasks of a (rows, n) problem.
template <class F>
void for_tasks(int64_t rows, int64_t n, F&& fn) {
  const int64_t nb = (n + kBlock - 1) / kBlock;
  const int64_t grain = std::max<int64_t>(1, kGrainElems / std::min(n, kBlock));
  at::parallel_for(0, rows * nb, grain, fn);
}

at::Tensor geglu_fwd(const at::Tensor& gate, const at::Tensor& up, c10::string_view approximate) {
  const bool tanh = check_inputs("geglu_fwd", gate, up, approximate);
  if (gate.scalar_type() == at::kHalf) {  // no fp16 kernel: compute in float
    return geglu_fwd(gate.to(at::kFloat), up.to(at::kFloat), approximate).to(at::kHalf);
  }
  auto out = new_output(gate.sizes(), gate.scalar_type());
  if (out.numel() == 0) return out;
  auto g = as_rows(gate), u = as_rows(up);
  const int64_t rows = g.size(0), n = g.size(1);
  const Isa isa = active_isa();
  dispatch_kernel_types(gate.scalar_type(), "geglu_fwd", [&](auto tag) {
    using T = typename decltype(tag)::type;
    dispatch_form(tanh, [&](auto form) {
      const auto fn = TRUTHGPT_ISA_FN(isa, geglu_fwd_tasks<T, decltype(form)::value>);
      const T* gp = cptr<T>(g);
      const T* upp = cptr<T>(u);
      T* op = mptr<T>(out);
      const int64_t gs = row_stride(g), us = row_stride(u);
      for_tasks(rows, n, [&](int64_t t0, int64_t t1) { fn(gp, gs, upp, us, op, n, kBlock, t0, t1); });
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> geglu_bwd(const at::Tensor& grad, const at::Tensor& gate,
                                             const at::Tensor& up, c10::string_view approximate) {
  const bool tanh = check_inputs("geglu_bwd", gate, up, approximate);
  TORCH_CHECK(grad.sizes() == gate.sizes() && grad.scalar_type() == gate.scalar_type(),
              "geglu_bwd: grad must have the shape and dtype of gate");
  if (gate.scalar_type() == at::kHalf) {
    auto [dg, du] = geglu_bwd(grad.to(at::kFloat), gate.to(at::kFloat), up.to(at::kFloat), approximate);
    return {dg.to(at::kHalf), du.to(at::kHalf)};
  }
  auto dgate = new_output(gate.sizes(), gate.scalar_type());
  auto dup = new_output(gate.sizes(), gate.scalar_type());
  if (gate.numel() == 0) return {dgate, dup};
  auto y = as_rows(grad), g = as_rows(gate), u = as_rows(up);
  const int64_t rows = g.size(0), n = g.size(1);
  const Isa isa = active_isa();
  dispatch_kernel_types(gate.scalar_type(), "geglu_bwd", [&](auto tag) {
    using T = typename decltype(tag)::type;
    dispatch_form(tanh, [&](auto form) {
      const auto fn = TRUTHGPT_ISA_FN(isa, geglu_bwd_tasks<T, decltype(form)::value>);
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
  });
  return {dgate, dup};
}

}  // namespace

TORCH_LIBRARY_IMPL(truthgpt, CPU, m) {
  m.impl("geglu_fwd", &geglu_fwd);
  m.impl("geglu_bwd", &geglu_bwd);
}

}  // namespace truthgpt

#else  // ========================================== kernel section (once per instruction set)

constexpr double kSqrt2OverPi = 0.79788456080286535588;   // sqrt(2 / pi)
constexpr double kGeluCubic = 0.044715;
constexpr double kInvSqrt2Pi = 0.39894228040143267794;    // 1 / sqrt(2 pi)
// erfcx(a) = t P(t), t = 1 / (1 + a / 2); P's coefficients, constant term first
constexpr int kErfcxDeg = 10;
constexpr float kErfcxC[kErfcxDeg + 1] = {
    0.282094806f, 0.282093763f, 0.24688457f,   0.175315976f, 0.0934624374f, -0.0592113584f,
    0.13217704f,  -0.454973996f, 0.493694931f, -0.234733596f, 0.0431954339f};

// Phi(g) and exp(-g^2/2) of one lane (branch-free, so that loops over lanes vectorise).
inline void normal_cdf_lane(float g, float& cdf, float& e) {
  const float a = std::fabs(g) * 0.70710678118654752f;
  const float t = 1.0f / (1.0f + 0.5f * a);
  float p = kErfcxC[kErfcxDeg];
  for (int k = kErfcxDeg - 1; k >= 0; --k) p = p * t + kErfcxC[k];
  const float g2 = g * g;
  e = g2 > 174.0f ? 0.0f : exp_poly(-0.5f * g2);  // exp_poly saturates instead of reaching 0
  const float h = 0.5f * t * p * e;
  cdf = g < 0.0f ? h : 1.0f - h;
}
inline void normal_cdf_lane(double g, double& cdf, double& e) {
  e = std::exp(-0.5 * g * g);
  cdf = 0.5 * std::erfc(-g * 0.70710678118654752440);
}

// Phi and exp(-g^2/2) lane by lane (A: the lanes' type).
template <class V, class A>
inline void normal_cdf(const V& g, V& cdf, V& e) {
  A gs[V::W], cs[V::W], es[V::W];
  g.store(gs, V::W);
  for (int i = 0; i < V::W; ++i) normal_cdf_lane(gs[i], cs[i], es[i]);
  cdf = V::load(cs, V::W);
  e = V::load(es, V::W);
}

// sigmoid(2 sqrt(2/pi) (g + 0.044715 g^3)) = (1 + tanh(...)) / 2
template <class V, class A>
inline V tanh_gate(const V& g) {
  const V g2 = g * g;
  return V::sigmoid(g * V::fma(g2, V::set1(A(2 * kSqrt2OverPi * kGeluCubic)),
                               V::set1(A(2 * kSqrt2OverPi))));
}

// gelu(g), and (Bwd) gelu'(g) in *d
template <bool Tanh, bool Bwd, class V, class A>
inline V gelu(const V& g, V* d) {
  if constexpr (Tanh) {
    const V s = tanh_gate<V, A>(g);
    if constexpr (Bwd) {
      const V one = V::set1(A(1));
      const V k = V::fma(g * g, V::set1(A(6 * kSqrt2OverPi * kGeluCubic)), V::set1(A(2 * kSqrt2OverPi)));
      *d = V::fma(g * s * (one - s), k, s);
    }
    return g * s;
  } else {
    V cdf, e;
    normal_cdf<V, A>(g, cdf, e);
    if constexpr (Bwd) *d = V::fma(g * e, V::set1(A(kInvSqrt2Pi)), cdf);
    return g * cdf;
  }
}

// Task t covers row t / nb, columns [b * block, min(n, (b + 1) * block)), b = t % nb.
// Inputs have unit inner stride and row strides gs, us...; outputs are contiguous (rows, n).
template <class T, bool Tanh>
void geglu_fwd_tasks(const T* g, int64_t gs, const T* u, int64_t us, T* out, int64_t n,
                     int64_t block, int64_t t0, int64_t t1) {
  using V = VecFor<T>;
  using A = acc_t<T>;
  const int64_t nb = (n + block - 1) / block;
  int64_t r = t0 / nb, b = t0 % nb;
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t c0 = b * block, len = std::min(n, c0 + block) - c0;
    const T* gr = g + r * gs + c0;
    const T* ur = u + r * us + c0;
    T* orow = out + r * n + c0;
    for (int64_t i = 0; i < len; i += V::W) {
      const int64_t m = len - i;
      (gelu<Tanh, false, V, A>(V::load(gr + i, m), nullptr) * V::load(ur + i, m)).store(orow + i, m);
    }
    if (++b == nb) {
      b = 0;
      ++r;
    }
  }
}

template <class T, bool Tanh>
void geglu_bwd_tasks(const T* dy, int64_t ys, const T* g, int64_t gs, const T* u, int64_t us,
                     T* dg, T* du, int64_t n, int64_t block, int64_t t0, int64_t t1) {
  using V = VecFor<T>;
  using A = acc_t<T>;
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
      const V y = V::load(yr + i, m);
      V d;
      const V act = gelu<Tanh, true, V, A>(V::load(gr + i, m), &d);
      (y * act).store(dur + i, m);
      (y * V::load(ur + i, m) * d).store(dgr + i, m);
    }
    if (++b == nb) {
      b = 0;
      ++r;
    }
  }
}

#endif  // TRUTHGPT_KERNEL_SECTION
