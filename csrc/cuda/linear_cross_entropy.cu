// Fused linear cross-entropy CUDA row kernel (also tk.cross_entropy's: cross_entropy_binding.cpp): one thread block per row of a chunk's logits,
// float32 math. Pass 1: online max and sum of exp (and the sum of the logits for label
// smoothing) over the block's strided columns, reduced over the block; pass 2 (with
// grad_scale): d loss / d logits written in place, in the logits' dtype. Formulas: see
// csrc/cpu/linear_cross_entropy.cpp.
#include <cfloat>

#include "common.cuh"
#include "common/host_device.h"
#include "linear_cross_entropy.h"

namespace truthgpt::cuda {
namespace {

constexpr int kThreads = 512;
constexpr unsigned kFull = 0xffffffffu;

// (max, sum of exp relative to max) pairs merged
__device__ __forceinline__ void merge(float& m, float& s, float m2, float s2) {
  const float mn = fmaxf(m, m2);
  if (mn == -INFINITY) return;  // both empty
  s = s * __expf(m - mn) + s2 * __expf(m2 - mn);
  m = mn;
}

// Block-wide merge of every thread's (m, s) and sum of sz; results valid in every thread.
__device__ void block_reduce(float& m, float& s, float& sz) {
  __shared__ float sm[32], ss[32], szs[32];
  for (int off = 16; off > 0; off >>= 1) {
    merge(m, s, __shfl_xor_sync(kFull, m, off), __shfl_xor_sync(kFull, s, off));
    sz += __shfl_xor_sync(kFull, sz, off);
  }
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, nw = blockDim.x / 32;
  if (lane == 0) {
    sm[warp] = m;
    ss[warp] = s;
    szs[warp] = sz;
  }
  __syncthreads();
  m = -INFINITY;
  s = 0.f;
  sz = 0.f;
  for (int w = 0; w < nw; ++w) {  // every thread, same order: deterministic
    merge(m, s, sm[w], ss[w]);
    sz += szs[w];
  }
}

template <typename T>
__device__ __forceinline__ float logit(const T* z, const T* bias, int64_t j, float cap) {
  float y = to_float(z[j]);
  if (bias != nullptr) y += to_float(bias[j]);
  return cap > 0.f ? cap * tanh_precise(y / cap) : y;  // (not tanhf: --use_fast_math)
}

template <typename T>
__global__ void __launch_bounds__(kThreads) lce_rows_kernel(int64_t V, LceRows a, LceOptions o) {
  const int64_t row = blockIdx.x;
  const T* z = static_cast<const T*>(a.logits) + row * a.ld;
  T* g = static_cast<T*>(a.grad) + row * a.ldg;  // (z itself for the fused linear CE)
  const T* bias = static_cast<const T*>(a.bias);
  const int64_t t = a.target[row];
  if (t == o.ignore_index) {
    if (threadIdx.x == 0) {
      a.loss[row] = 0.f;
      a.zrows[row] = 0.f;
    }
    if (a.grad_scale != nullptr) {
      for (int64_t j = threadIdx.x; j < V; j += blockDim.x) g[j] = from_float<T>(0.f);
    }
    return;
  }
  float m = -INFINITY, s = 0.f, sz = 0.f;
  for (int64_t j = threadIdx.x; j < V; j += blockDim.x) {
    const float y = logit(z, bias, j, o.softcap);
    if (y > m) {  // a new maximum (NaN never is: it reaches s through the else branch)
      s = s * __expf(m - y) + 1.f;
      m = y;
    } else {
      s += __expf(y - m);
    }
    sz += y;
  }
  block_reduce(m, s, sz);
  const float lse = m + logf(s);
  const float zt = logit(z, bias, t, o.softcap);
  const float eps = o.label_smoothing;
  const float zterm = o.z_loss * lse * lse;
  if (threadIdx.x == 0) {
    a.zrows[row] = zterm;
    // (the smoothing term only with smoothing: a -inf logit makes sz -inf, 0 * -inf is NaN)
    const float smooth = eps != 0.f ? eps / static_cast<float>(V) * sz : 0.f;
    a.loss[row] = lse - (1.f - eps) * zt - smooth + zterm;
  }
  if (a.grad_scale == nullptr) return;
  __syncthreads();  // every thread has read z[t] before it is overwritten
  const float sc = a.grad_scale[row];
  const float coef = sc * (1.f + 2.f * o.z_loss * lse), off = sc * eps / static_cast<float>(V);
  for (int64_t j = threadIdx.x; j < V; j += blockDim.x) {
    const float y = logit(z, bias, j, o.softcap);
    float gj = __expf(y - lse) * coef - off - (j == t ? sc * (1.f - eps) : 0.f);
    if (o.softcap > 0.f) {
      const float u = y / o.softcap;
      gj *= 1.f - u * u;
    }
    g[j] = from_float<T>(gj);
  }
}

}  // namespace

cudaError_t linear_cross_entropy_rows(DType dtype, int64_t rows, int64_t V, LceRows a,
                                      LceOptions o, cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  if (rows > 0x7fffffff) return cudaErrorInvalidValue;
  return dispatch_dtype(dtype, [&]<typename T>() {
    lce_rows_kernel<T><<<static_cast<unsigned>(rows), kThreads, 0, stream>>>(V, a, o);
    return cudaGetLastError();
  });
}

}  // namespace truthgpt::cuda
