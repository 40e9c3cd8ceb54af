// Per-element math of the LayerNorm CUDA kernels (csrc/cuda/layer_norm.cu), for host and device
// (TG_HD). Launch geometry, row partition and vector width are RMSNorm's (rms_norm_math.cuh:
// teams of threads per row, a grid-stride loop over rows, fixed-order partial sums).
//
// Statistics by the corrected two-pass algorithm: mean0 = sum(x) / n, then from the deviations
// d = x - mean0: mean = mean0 + sum(d) / n, var = sum(d^2) / n - (sum(d) / n)^2 (the correction
// removes mean0's rounding error, which grows with |mean| and n).
#pragma once
#include <cmath>
#include <cstdint>

#include "common/host_device.h"
#include "rms_norm_math.cuh"

namespace truthgpt::cuda::ln {

struct Stats {
  float mean;
  float rstd;
};

TG_HD Stats stats(float mean0, float dev_sum, float dev_sq_sum, int64_t n, float eps) {
  const float nf = static_cast<float>(n);
  const float dm = dev_sum / nf;
  const float var = fmaxf(dev_sq_sum / nf - dm * dm, 0.f);
  return {mean0 + dm, 1.f / sqrtf(var + eps)};
}

// y = (x - mean) r w + b (w = 1, b = 0 when absent)
TG_HD float fwd(float x, Stats s, float w, float b) { return (x - s.mean) * s.rstd * w + b; }

TG_HD float xhat(float x, Stats s) { return (x - s.mean) * s.rstd; }

// dx = r (g - mean(g) - xhat mean(g xhat)), g = dy w: c1 = sum(g) / n, c2 = sum(g xhat) / n
TG_HD float dx(float g, float xh, float r, float c1, float c2) { return r * (g - c1 - xh * c2); }

}  // namespace truthgpt::cuda::ln
