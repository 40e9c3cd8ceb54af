// Plain-C++ launcher API of the CUDA attention kernels, between the torch binding
// (attention_binding.cpp, torch headers) and the kernel translation units (attention_*.cu,
// CUDA headers only). All strides are in elements; every tensor's innermost (head-dim) stride
// is 1; outputs are contiguous.
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>

#include "attention_math.cuh"
#include "launch.h"

namespace truthgpt::cuda {

// A (B, H, S, D) operand: base pointer and the (b, h, s) strides.
struct BhsdArg {
  const void* ptr;
  int64_t sb, sh, ss;
};

struct AttentionParams {
  DType dtype;
  attn::Problem prob;  // sizes, scale, softcap, window, alibi, block mask, key mask
  BhsdArg q, k, v;
  // true when every BhsdArg base is 16-byte aligned and its strides are multiples of
  // 16 bytes: the kernels then read 16-byte vectors
  bool vec_loads;

  // forward outputs (contiguous): out (B, Hq, Sq, D) like q, lse float32 (B, Hq, Sq)
  void* out;
  float* lse;

  // backward inputs: grad_out and out like q (vec_loads covers them too), lse (B, Hq, Sq)
  BhsdArg dout, o;
  const float* lse_in;
  int64_t lse_sb, lse_sh, lse_ss;
  // backward outputs (contiguous) and float32 scratch 2 x (B, Hq, Sq) for delta = rowsum(dO * O)
  // (as the dQ kernel's product computes it, then as the dK/dV kernel's; attention_kernel.cuh)
  void *dq, *dk, *dv;
  float* delta;
  // with prob.rel: the bias gradient (Hq, Sq + Sk - 1) float32 (sum over the batch); else null
  float* drel;
};

// 0 when the head dim has no kernel (the binding checks before calling).
inline int attention_head_dim_bucket(int64_t d) { return attn::head_dim_bucket(d); }

// Forward: fills p.out and p.lse. Backward: fills p.delta, then p.dq, p.dk, p.dv.
// Both return the first launch error (cudaSuccess otherwise).
cudaError_t attention_fwd(const AttentionParams& p, cudaStream_t stream);
cudaError_t attention_bwd(const AttentionParams& p, cudaStream_t stream);

namespace detail {
// One explicit instantiation per head-dim bucket, each in its own translation unit
// (attention_fwd_<D>.cu, attention_bwd_<D>.cu).
template <int D> cudaError_t attention_fwd_bucket(const AttentionParams& p, cudaStream_t stream);
template <int D> cudaError_t attention_bwd_bucket(const AttentionParams& p, cudaStream_t stream);
}  // namespace detail

}  // namespace truthgpt::cuda
