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
// once per set), threaded over (row, column block) tasks with at::parallel_for; the drivers
// and task loops are the gated activations' (cpu/gated_activation.h, _kernels.h).
#ifndef TRUTHGPT_KERNEL_SECTION  // ================================================ host part

#include <ATen/ATen.h>
#include <torch/library.h>

#include "cpu/gated_activation.h"
#define TRUTHGPT_KERNELS_FILE "cpu/geglu.cpp"
#include "cpu/foreach_isa.h"

namespace truthgpt {
namespace {

using namespace cpu;

// true for "tanh", false for "none"
bool check_inputs(const char* op, const at::Tensor& gate, const at::Tensor& up,
                  c10::string_view approximate) {
  gated::check_inputs(op, gate, up);
  TORCH_CHECK(approximate == "tanh" || approximate == "none", op,
              ": approximate must be 'tanh' or 'none', got '", approximate, "'");
  return approximate == "tanh";
}

// Calls f(std::bool_constant<Tanh>{}) and returns what it returns.
template <class F>
auto dispatch_form(bool tanh, F&& f) {
  return tanh ? f(std::true_type{}) : f(std::false_type{});
}

at::Tensor geglu_fwd(const at::Tensor& gate, const at::Tensor& up, c10::string_view approximate) {
  const bool tanh = check_inputs("geglu_fwd", gate, up, approximate);
  if (gate.scalar_type() == at::kHalf) {  // no fp16 kernel: compute in float
    return geglu_fwd(gate.to(at::kFloat), up.to(at::kFloat), approximate).to(at::kHalf);
  }
  return dispatch_form(tanh, [&](auto form) {
    using Key = GeluKey<decltype(form)::value>;
    return gated::run<1>("geglu_fwd", gate, {gate, up}, [](auto tag, Isa isa) {
      return TRUTHGPT_ISA_FN(isa, gated_fwd_tasks<typename decltype(tag)::type, Key>);
    })[0];
  });
}

std::tuple<at::Tensor, at::Tensor> geglu_bwd(const at::Tensor& grad, const at::Tensor& gate,
                                             const at::Tensor& up, c10::string_view approximate) {
  const bool tanh = check_inputs("geglu_bwd", gate, up, approximate);
  gated::check_grad("geglu_bwd", grad, gate);
  if (gate.scalar_type() == at::kHalf) {
    auto [dg, du] = geglu_bwd(grad.to(at::kFloat), gate.to(at::kFloat), up.to(at::kFloat), approximate);
    return {dg.to(at::kHalf), du.to(at::kHalf)};
  }
  auto [dgate, dup] = dispatch_form(tanh, [&](auto form) {
    using Key = GeluKey<decltype(form)::value>;
    return gated::run<2>("geglu_bwd", gate, {grad, gate, up}, [](auto tag, Isa isa) {
      return TRUTHGPT_ISA_FN(isa, gated_bwd_tasks<typename decltype(tag)::type, Key>);
    });
  });
  return {dgate, dup};
}

// The gradient of a packed (..., 2n) [gate | up] input in one buffer (cpu/swiglu.cpp).
at::Tensor geglu_bwd_packed(const at::Tensor& grad, const at::Tensor& gate_up,
                            c10::string_view approximate) {
  gated::check_packed("geglu_bwd_packed", grad, gate_up);
  const int64_t n = grad.dim() ? grad.size(-1) : 1;
  const at::Tensor gate = gate_up.narrow(-1, 0, n), up = gate_up.narrow(-1, n, n);
  const bool tanh = check_inputs("geglu_bwd_packed", gate, up, approximate);
  if (gate.scalar_type() == at::kHalf) {  // no fp16 kernel: compute in float
    return geglu_bwd_packed(grad.to(at::kFloat), gate_up.to(at::kFloat), approximate).to(at::kHalf);
  }
  auto outs = dispatch_form(tanh, [&](auto form) {
    using Key = GeluKey<decltype(form)::value>;
    return gated::run<2>("geglu_bwd_packed", gate, {grad, gate, up}, [](auto tag, Isa isa) {
      return TRUTHGPT_ISA_FN(isa, gated_bwd_tasks<typename decltype(tag)::type, Key>);
    }, /*packed=*/true);
  });
  return gated::packed_base(outs[0]);
}

}  // namespace

TORCH_LIBRARY_IMPL(truthgpt, CPU, m) {
  m.impl("geglu_fwd", &geglu_fwd);
  m.impl("geglu_bwd", &geglu_bwd);
  m.impl("geglu_bwd_packed", &geglu_bwd_packed);
}

}  // namespace truthgpt

#else  // ========================================== kernel section (once per instruction set)

#include "cpu/gated_activation_kernels.h"

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
    // The tanh form is at its asymptotes beyond |g| = 12 (float) / 25 (double): gelu = 0 or g,
    // gelu' = 0 or 1 in that precision. g is clamped there: float's saturating exp has a floor
    // (s >= 4e-39, not 0) that g^3 in gelu' would multiply back up (gelu'(-1e13) = -0.9), and
    // g^3 overflows to inf beyond 7e12 (inf * 0). A NaN stays NaN (vmax keeps its second).
    const V c = V::set1(A(std::is_same_v<A, double> ? -25.0 : -12.0));
    const V gc = V::zero() - vmax(c, V::zero() - vmax(c, g));
    const V s = tanh_gate<V, A>(gc);
    if constexpr (Bwd) {
      const V one = V::set1(A(1));
      const V k = V::fma(gc * gc, V::set1(A(6 * kSqrt2OverPi * kGeluCubic)), V::set1(A(2 * kSqrt2OverPi)));
      *d = V::fma(gc * s * (one - s), k, s);
    }
    return vmax(gc, g) * s;  // g above the clamp (s = 1 there), gc below it
  } else {
    V cdf, e;
    normal_cdf<V, A>(g, cdf, e);
    if constexpr (Bwd) *d = V::fma(g * e, V::set1(A(kInvSqrt2Pi)), cdf);
    return g * cdf;
  }
}

template <bool Tanh>
struct GatedAct<GeluKey<Tanh>> {
  template <class V, class A>
  static V fwd(const V& g) {
    return gelu<Tanh, false, V, A>(g, nullptr);
  }
  template <class V, class A>
  static void bwd(const V& y, const V& g, const V& u, V& dg, V& du) {
    V d;
    const V act = gelu<Tanh, true, V, A>(g, &d);
    du = y * act;
    dg = y * u * d;
  }
};

#endif  // TRUTHGPT_KERNEL_SECTION
