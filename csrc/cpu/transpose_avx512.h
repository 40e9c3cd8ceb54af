// float32 transposes through AVX-512 registers (16 x 16 blocks), shared by the CPU attention
// kernel (packing K^T, attention_gemm.h) and the GEMM engine's transposed copies
// (gemm_engine.cpp). Compiled for AVX-512 by function attribute: call only where the CPU has it
// (the default build has no -mavx512f).
#pragma once

#include <algorithm>
#include <cstdint>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define TK_TRANSPOSE_X86 1
#define TK_TRANSPOSE_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma")))

namespace truthgpt {
namespace cpu {

// out (K x N, ld ldo) = B^T for B (N x K, ldb), by 16 x 16 blocks through registers
// (32-bit elements: also used for pairs of bf16).
// 16x16 transpose in registers: r[i] (row i of a block) becomes column i.
TK_TRANSPOSE_AVX512 inline void transpose16(__m512 r[16]) {
  __m512 t[16];
  // unpack 32-bit, 64-bit, then 128-bit lanes twice
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {
    r[i] = _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(t[i]), _mm512_castps_pd(t[i + 2])));
    r[i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(t[i]), _mm512_castps_pd(t[i + 2])));
    r[i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(t[i + 1]), _mm512_castps_pd(t[i + 3])));
    r[i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(t[i + 1]), _mm512_castps_pd(t[i + 3])));
  }
  for (int i = 0; i < 16; i += 8) {
    for (int q = 0; q < 4; ++q) {
      t[i + q] = _mm512_shuffle_f32x4(r[i + q], r[i + q + 4], 0x88);
      t[i + q + 4] = _mm512_shuffle_f32x4(r[i + q], r[i + q + 4], 0xDD);
    }
  }
  for (int q = 0; q < 8; ++q) {
    r[q] = _mm512_shuffle_f32x4(t[q], t[q + 8], 0x88);
    r[q + 8] = _mm512_shuffle_f32x4(t[q], t[q + 8], 0xDD);
  }
}

TK_TRANSPOSE_AVX512 inline void transpose_f32(int64_t N, int64_t K, const float* B, int64_t ldb, float* out, int64_t ldo) {
  for (int64_t j0 = 0; j0 < N; j0 += 16) {
    const int64_t jn = std::min<int64_t>(16, N - j0);
    for (int64_t k0 = 0; k0 < K; k0 += 16) {
      const int64_t kn = std::min<int64_t>(16, K - k0);
      if (jn == 16 && kn == 16) {
        __m512 r[16];
        for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_ps(B + (j0 + i) * ldb + k0);
        transpose16(r);  // r[i] now holds column k0 + i of the block
        for (int i = 0; i < 16; ++i) _mm512_storeu_ps(out + (k0 + i) * ldo + j0, r[i]);
      } else {
        for (int64_t kk = 0; kk < kn; ++kk)
          for (int64_t jj = 0; jj < jn; ++jj) out[(k0 + kk) * ldo + j0 + jj] = B[(j0 + jj) * ldb + k0 + kk];
      }
    }
  }
}

}  // namespace cpu
}  // namespace truthgpt
#else
#define TK_TRANSPOSE_X86 0
#endif
