// Philox4x32-10 (Salmon et al. 2011, "Parallel random numbers: as easy as 1, 2, 3"): the
// counter-based generator behind attention dropout. Host and device code (CPU kernel, CUDA
// kernel, and the same arithmetic in truthgpt_kernels/ops/reference.py and triton/attention.py),
// so every backend draws the same mask for the same seed.
//
// The stream: element e = ((b * Hq + h) * Sq + i) * Sk + j of the (B, Hq, Sq, Sk) score matrix
// takes word (e & 3) of philox(counter = e >> 2, key = seed); it is kept iff that word is
// >= threshold(p) = floor(p * 2^32). Four consecutive elements share one Philox call.
#pragma once
#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define TK_PHILOX_FN __host__ __device__ __forceinline__
#else
#define TK_PHILOX_FN inline
#endif

namespace truthgpt {
namespace philox {

constexpr uint32_t kMulA = 0xD2511F53u, kMulB = 0xCD9E8D57u;
constexpr uint32_t kWeylA = 0x9E3779B9u, kWeylB = 0xBB67AE85u;

// The four output words for a 64-bit counter (c0 = low, c1 = high, c2 = c3 = 0) and key = seed.
TK_PHILOX_FN void block(uint64_t counter, uint64_t seed, uint32_t out[4]) {
  uint32_t c0 = static_cast<uint32_t>(counter), c1 = static_cast<uint32_t>(counter >> 32), c2 = 0, c3 = 0;
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  for (int r = 0; r < 10; ++r) {
    const uint64_t pa = static_cast<uint64_t>(kMulA) * c0, pb = static_cast<uint64_t>(kMulB) * c2;
    const uint32_t n0 = static_cast<uint32_t>(pb >> 32) ^ c1 ^ k0;
    const uint32_t n2 = static_cast<uint32_t>(pa >> 32) ^ c3 ^ k1;
    c1 = static_cast<uint32_t>(pb);
    c3 = static_cast<uint32_t>(pa);
    c0 = n0;
    c2 = n2;
    k0 += kWeylA;
    k1 += kWeylB;
  }
  out[0] = c0;
  out[1] = c1;
  out[2] = c2;
  out[3] = c3;
}

// The word of element e (one Philox call; kernels walking a row call block() once per 4).
TK_PHILOX_FN uint32_t word(uint64_t seed, uint64_t e) {
  uint32_t w[4];
  block(e >> 2, seed, w);
  return w[e & 3];
}

// Elements whose word is below this are dropped: P(drop) = threshold / 2^32 ~= p.
TK_PHILOX_FN uint32_t threshold(double p) {
  const double t = floor(p * 4294967296.0);
  return t <= 0 ? 0u : t >= 4294967295.0 ? 0xFFFFFFFFu : static_cast<uint32_t>(t);
}

}  // namespace philox
}  // namespace truthgpt
