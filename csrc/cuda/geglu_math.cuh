// Per-element GeGLU math of csrc/cuda/geglu.cu, for host and device (TG_HD): fp32 math; the
// backward recomputes gelu instead of saving it. The vector width choice is swiglu's
// (swiglu::pick_vec: same operands, same layout).
//   tanh form: gelu(g) = g s, s = sigmoid(2k) = (1 + tanh k) / 2, k = sqrt(2/pi) (g + 0.044715 g^3)
//   erf form:  gelu(g) = g Phi(g), Phi(g) = (1 + erf(g / sqrt 2)) / 2
#pragma once
#include <cmath>
#include <cstdint>

#include "common/host_device.h"
#include "swiglu_math.cuh"

namespace truthgpt::cuda::geglu {

constexpr float kSqrt2OverPi = 0.7978845608f, kCubic = 0.044715f;
constexpr float kInvSqrt2 = 0.7071067812f, kInvSqrt2Pi = 0.3989422804f;

// gelu(g) and its derivative
template <bool Tanh>
TG_HD void gelu(float g, float& act, float& d) {
  if constexpr (Tanh) {
    const float s = swiglu::sigmoid(g * (2.f * kSqrt2OverPi + 2.f * kSqrt2OverPi * kCubic * g * g));
    act = g * s;
    d = s + g * s * (1.f - s) * (2.f * kSqrt2OverPi + 6.f * kSqrt2OverPi * kCubic * g * g);
  } else {
    const float cdf = 0.5f * (1.f + erff(g * kInvSqrt2));
    act = g * cdf;
    d = cdf + g * expf(-0.5f * g * g) * kInvSqrt2Pi;
  }
}

// gelu(g) * u
template <bool Tanh>
TG_HD float fwd(float g, float u) {
  float act, d;
  gelu<Tanh>(g, act, d);
  return act * u;
}

// d/dg and d/du of gelu(g) * u, times dy
template <bool Tanh>
TG_HD void bwd(float dy, float g, float u, float& dg, float& du) {
  float act, d;
  gelu<Tanh>(g, act, d);
  du = dy * act;
  dg = dy * u * d;
}

}  // namespace truthgpt::cuda::geglu
