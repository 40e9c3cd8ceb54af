// SwiGLU on the CPU: out = silu(gate) * up, and its backward recomputing silu
// (dgate = dy * up * s * (1 + g * (1 - s)), dup = dy * g * s, s = sigmoid(g)).
// Vectorised per instruction set (cpu/vec_utils.h; this file's kernel section is compiled
// once per set), threaded over (row, column block) tasks with at::parallel_for; the drivers
// and task loops are the gated activations' (cpu/gated_activation.h, _kernels.h).
// Math in float for float/bf16/fp16 (a polynomial exp), in double for double.
#ifndef TRUTHGPT_KERNEL_SECTION  // ================================================ host part

#include <ATen/ATen.h>
#include <torch/library.h>

#include "cpu/gated_activation.h"
#define TRUTHGPT_KERNELS_FILE "cpu/swiglu.cpp"
#include "cpu/foreach_isa.h"

namespace truthgpt {
namespace {

using namespace cpu;

at::Tensor swiglu_fwd(const at::Tensor& gate, const at::Tensor& up) {
  gated::check_inputs("swiglu_fwd", gate, up);
  return gated::run<1>("swiglu_fwd", gate, {gate, up}, [](auto tag, Isa isa) {
    return TRUTHGPT_ISA_FN(isa, gated_fwd_tasks<typename decltype(tag)::type, SiluKey>);
  })[0];
}

std::tuple<at::Tensor, at::Tensor> swiglu_bwd(const at::Tensor& grad, const at::Tensor& gate,
                                              const at::Tensor& up) {
  gated::check_inputs("swiglu_bwd", gate, up);
  gated::check_grad("swiglu_bwd", grad, gate);
  auto [dgate, dup] = gated::run<2>("swiglu_bwd", gate, {grad, gate, up}, [](auto tag, Isa isa) {
    return TRUTHGPT_ISA_FN(isa, gated_bwd_tasks<typename decltype(tag)::type, SiluKey>);
  });
  return {dgate, dup};
}

// The gradient of a packed (..., 2n) [gate | up] input in one buffer: a fused gate-up
// projection's output gradient with no concatenation after the kernel.
at::Tensor swiglu_bwd_packed(const at::Tensor& grad, const at::Tensor& gate_up) {
  gated::check_packed("swiglu_bwd_packed", grad, gate_up);
  const int64_t n = grad.dim() ? grad.size(-1) : 1;
  const at::Tensor gate = gate_up.narrow(-1, 0, n), up = gate_up.narrow(-1, n, n);
  auto outs = gated::run<2>("swiglu_bwd_packed", gate, {grad, gate, up}, [](auto tag, Isa isa) {
    return TRUTHGPT_ISA_FN(isa, gated_bwd_tasks<typename decltype(tag)::type, SiluKey>);
  }, /*packed=*/true);
  return gated::packed_base(outs[0]);
}

}  // namespace

TORCH_LIBRARY_IMPL(truthgpt, CPU, m) {
  m.impl("swiglu_fwd", &swiglu_fwd);
  m.impl("swiglu_bwd", &swiglu_bwd);
  m.impl("swiglu_bwd_packed", &swiglu_bwd_packed);
}

}  // namespace truthgpt

#else  // ========================================== kernel section (once per instruction set)

#include "cpu/gated_activation_kernels.h"

// x clamped below at -100 (float) / -750 (double), where silu and its derivative are 0 in
// that precision: float's saturating exp has a floor (sigmoid >= 4e-39, not 0) that a huge
// negative x would multiply back up (silu(-1e38) = -0.4), and -inf * 0 is NaN. A NaN stays NaN.
template <class V, class A>
inline V silu_arg(const V& x) {
  return vmax(V::set1(A(std::is_same_v<A, double> ? -750.0 : -100.0)), x);
}

template <>
struct GatedAct<SiluKey> {
  template <class V, class A>
  static V fwd(const V& x) {
    const V xc = silu_arg<V, A>(x);
    return xc * V::sigmoid(xc);
  }
  template <class V, class A>
  static void bwd(const V& y, const V& x, const V& u, V& dg, V& du) {
    const V one = V::set1(A(1));
    const V xc = silu_arg<V, A>(x);
    const V s = V::sigmoid(xc);
    du = y * xc * s;
    dg = y * u * s * V::fma(xc, one - s, one);
  }
};

#endif  // TRUTHGPT_KERNEL_SECTION
