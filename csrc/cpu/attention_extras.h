// CPU attention, part 4: the options that run as their own passes beside the row kernels,
// so the paths without them are untouched: the relative-position bias by distance (rel_bias)
// and Philox dropout (csrc/common/philox.h). Included by attention.cpp only.
//  - rel_bias: added to a piece's raw scores before the row kernels (in log2 units; with
//    softcap the cap is applied here first, its derivative kept, and the row kernels run
//    without softcap). Its gradient is dS (before the softcap derivative) summed along each
//    diagonal, into buffers owned by work items, reduced in a fixed order afterwards.
//  - dropout: a piece's keep bytes from Philox (4 words per call, a row's elements being
//    consecutive counters); the forward zeroes the dropped probabilities before P V and folds
//    1 / (1 - p) into the final normalisation; the backward zeroes them in the P of dV and in
//    dP, with 1 / (1 - p) as the GEMMs' alpha.
#pragma once
#include "common/philox.h"
#include "cpu/attention_schedule.h"

namespace truthgpt {
namespace {  // internal to the CPU attention kernel (one translation unit: attention.cpp)

template <typename Acc>
struct Extras {
  std::vector<Acc> bias2;  // rel_bias * log2(e), (Hq, L); empty without rel_bias
  int64_t L = 0;           // Sq + Sk - 1 (0: no rel_bias)
  bool dropout = false;
  bool simd = false;  // Philox on AVX2 (the row path is AVX2 or AVX-512)
  uint64_t seed = 0;
  uint32_t thr = 0;
  Acc inv_keep = 1;  // 1 / (1 - p)
  bool rel() const { return L > 0; }
  // the row kernels' configuration: without softcap when the cap is applied with the bias
  Cfg<Acc> rows_cfg(Cfg<Acc> cf) const {
    if (rel()) cf.softcap = false;
    return cf;
  }
};

// The rel_bias / dropout arguments of attention_fwd and _bwd, checked.
struct ExtraArgs {
  at::Tensor rel;  // (Hq, Sq + Sk - 1) contiguous, or undefined
  double p = 0;
  int64_t seed = 0;
};

ExtraArgs extra_args(const Problem& P, at::ScalarType qtype, const c10::optional<at::Tensor>& rel_bias,
                     double dropout_p, const c10::optional<at::Tensor>& dropout_seed) {
  ExtraArgs a;
  if (rel_bias.has_value()) {
    const at::ScalarType want = qtype == at::kDouble ? at::kDouble : at::kFloat;
    TORCH_CHECK(rel_bias->scalar_type() == want, "attention (cpu): rel_bias must be ", want, " for ", qtype,
                " inputs, got ", rel_bias->scalar_type());
    const int64_t L = std::max<int64_t>(P.Sq + P.Sk - 1, 0);  // (0 when Sq = Sk = 0)
    TORCH_CHECK(rel_bias->dim() == 2 && rel_bias->size(0) == P.Hq && rel_bias->size(1) == L,
                "attention (cpu): rel_bias must have shape (Hq, Sq + Sk - 1) = (", P.Hq, ", ", L,
                "), got ", rel_bias->sizes());
    a.rel = rel_bias->contiguous();
  }
  TORCH_CHECK(dropout_p >= 0.0 && dropout_p < 1.0, "attention (cpu): dropout_p must be in [0, 1), got ", dropout_p);
  if (dropout_p > 0) {
    TORCH_CHECK(dropout_seed.has_value() && dropout_seed->numel() == 1 && dropout_seed->scalar_type() == at::kLong,
                "attention (cpu): dropout_seed must be a one-element int64 tensor when dropout_p > 0");
    a.seed = dropout_seed->item<int64_t>();
    a.p = dropout_p;
  }
  return a;
}

template <typename Acc>
Extras<Acc> make_extras(const Problem& P, const ExtraArgs& a, const Isa& isa) {
  Extras<Acc> ex;
  if (a.rel.defined()) {
    ex.L = P.Sq + P.Sk - 1;
    const Acc* r = a.rel.const_data_ptr<Acc>();
    ex.bias2.resize(P.Hq * ex.L);
    for (int64_t x = 0; x < P.Hq * ex.L; ++x) ex.bias2[x] = static_cast<Acc>(r[x] * kLog2e);
  }
  if (a.p > 0) {
    ex.dropout = true;
    ex.seed = static_cast<uint64_t>(a.seed);
    ex.thr = philox::threshold(a.p);
    ex.inv_keep = static_cast<Acc>(1.0 / (1.0 - a.p));
  }
  ex.simd = isa.rows != RowsImpl::Portable;
  return ex;
}

// Scores of rows x n keys from j0 (raw, from the QK^T GEMM) += rel_bias in log2 units; with
// softcap: s = cap tanh(s / cap) [log2 units] + bias, and G = 1 - tanh^2 (when non-null).
template <typename Acc>
void add_rel_bias(const Problem& P, const Tile& t, const Extras<Acc>& ex, const Cfg<Acc>& cf, int64_t j0,
                  int64_t n, Acc* S, int64_t ldS, Acc* G) {
  const int64_t nr = t.nr();
  for (int64_t r = 0; r < t.rows(); ++r) {
    const int64_t h = t.h0 + r / nr, i = t.i0 + r % nr;
    const Acc* __restrict__ bz = ex.bias2.data() + h * ex.L + (j0 - i + P.Sq - 1);
    Acc* __restrict__ s = S + r * ldS;
    if (cf.softcap) {
      Acc* g = G ? G + r * ldS : nullptr;
      for (int64_t c = 0; c < n; ++c) {
        const Acc th = std::tanh(s[c] * cf.inv_cap);
        if (g) g[c] = Acc(1) - th * th;
        s[c] = th * cf.capmul + bz[c];
      }
    } else {
      for (int64_t c = 0; c < n; ++c) s[c] += bz[c];
    }
  }
}

// d rel_bias rows (row of head h at drel + (h - t.h0) * ld) += dS = P (dP - delta) along the
// diagonals of the piece: row i, keys j0.. is the contiguous run from j0 - i + Sq - 1.
template <typename Acc>
void acc_rel_bias_grad(const Problem& P, const Tile& t, const RowInfo<Acc>* ri, int64_t j0, int64_t n,
                       const Acc* S, const Acc* dP, int64_t ldS, Acc* drel, int64_t ld) {
  const int64_t nr = t.nr();
  for (int64_t r = 0; r < t.rows(); ++r) {
    const int64_t h = t.h0 + r / nr, i = t.i0 + r % nr;
    Acc* __restrict__ d = drel + (h - t.h0) * ld + (j0 - i + P.Sq - 1);
    const Acc* __restrict__ p = S + r * ldS;
    const Acc* __restrict__ dp = dP + r * ldS;
    const Acc delta = ri[r].delta;
    for (int64_t c = 0; c < n; ++c) d[c] += p[c] * (dp[c] - delta);
  }
}

// Philox words of counters ctr0 .. ctr0 + nblk - 1 (4 per counter, in order) into out.
void philox_words_plain(uint64_t ctr0, int64_t nblk, uint64_t seed, uint32_t* out) {
  for (int64_t x = 0; x < nblk; ++x) philox::block(ctr0 + static_cast<uint64_t>(x), seed, out + 4 * x);
}

#if TK_X86
// AVX2: 4 counters per vector, one per 64-bit lane (its 32-bit words in the low halves; the
// high halves carry garbage that vpmuludq ignores and the final pack drops), two vectors at
// a time for latency. Writes whole groups of 8 counters (out has room for them).
TK_AVX2 inline void philox_round4(__m256i& a, __m256i& b, __m256i& c, __m256i& d, __m256i K0, __m256i K1) {
  const __m256i pa = _mm256_mul_epu32(a, _mm256_set1_epi64x(philox::kMulA));
  const __m256i pb = _mm256_mul_epu32(c, _mm256_set1_epi64x(philox::kMulB));
  a = _mm256_xor_si256(_mm256_xor_si256(_mm256_srli_epi64(pb, 32), b), K0);
  c = _mm256_xor_si256(_mm256_xor_si256(_mm256_srli_epi64(pa, 32), d), K1);
  b = pb;
  d = pa;
}

TK_AVX2 inline void philox_store4(uint32_t* o, __m256i a, __m256i b, __m256i c, __m256i d) {
  const __m256i x01 = _mm256_blend_epi32(a, _mm256_slli_epi64(b, 32), 0xAA);  // a0 b0 a1 b1 | a2 b2 a3 b3
  const __m256i x23 = _mm256_blend_epi32(c, _mm256_slli_epi64(d, 32), 0xAA);
  const __m256i lo = _mm256_unpacklo_epi64(x01, x23), hi = _mm256_unpackhi_epi64(x01, x23);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(o), _mm256_permute2x128_si256(lo, hi, 0x20));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(o + 8), _mm256_permute2x128_si256(lo, hi, 0x31));
}

TK_AVX2 void philox_words_avx2(uint64_t ctr0, int64_t nblk, uint64_t seed, uint32_t* out) {
  for (int64_t b0 = 0; b0 < nblk; b0 += 8) {
    const __m256i v0 = _mm256_add_epi64(_mm256_set1_epi64x(static_cast<long long>(ctr0 + static_cast<uint64_t>(b0))),
                                        _mm256_setr_epi64x(0, 1, 2, 3));
    const __m256i v1 = _mm256_add_epi64(v0, _mm256_set1_epi64x(4));
    __m256i a0 = v0, b0v = _mm256_srli_epi64(v0, 32), c0 = _mm256_setzero_si256(), d0 = c0;
    __m256i a1 = v1, b1v = _mm256_srli_epi64(v1, 32), c1 = c0, d1 = c0;
    uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
    for (int rd = 0; rd < 10; ++rd) {
      const __m256i K0 = _mm256_set1_epi64x(k0), K1 = _mm256_set1_epi64x(k1);
      philox_round4(a0, b0v, c0, d0, K0, K1);
      philox_round4(a1, b1v, c1, d1, K0, K1);
      k0 += philox::kWeylA;
      k1 += philox::kWeylB;
    }
    philox_store4(out + 4 * b0, a0, b0v, c0, d0);
    philox_store4(out + 4 * b0 + 16, a1, b1v, c1, d1);
  }
}
#endif

// Keep bytes of a piece: keep[r * ld + c] = 1 iff element (b, h, i, j0 + c) is kept, e =
// ((b Hq + h) Sq + i) Sk + j taking word e & 3 of Philox(e >> 2, seed).
template <typename Acc>
void dropout_keep(const Problem& P, const Tile& t, const Extras<Acc>& ex, int64_t j0, int64_t n,
                  std::vector<uint32_t>& words, uint8_t* keep, int64_t ld) {
  const int64_t nr = t.nr();
  words.resize(4 * (n / 4 + 2 + 8));  // (+ 8: the AVX2 path writes whole groups of 8 counters)
  for (int64_t r = 0; r < t.rows(); ++r) {
    const int64_t h = t.h0 + r / nr, i = t.i0 + r % nr;
    const uint64_t e0 = static_cast<uint64_t>(((t.b * P.Hq + h) * P.Sq + i) * P.Sk + j0);
    const uint64_t c0 = e0 >> 2;
    const int64_t nblk = static_cast<int64_t>(((e0 + n - 1) >> 2) - c0 + 1);
#if TK_X86
    if (ex.simd) {
      philox_words_avx2(c0, nblk, ex.seed, words.data());
    } else
#endif
      philox_words_plain(c0, nblk, ex.seed, words.data());
    const uint32_t* __restrict__ w = words.data() + (e0 & 3);
    uint8_t* __restrict__ k = keep + r * ld;
    const uint32_t thr = ex.thr;
    for (int64_t c = 0; c < n; ++c) k[c] = w[c] >= thr;
  }
}

template <size_t N>
struct UintOf;
template <>
struct UintOf<2> {
  using type = uint16_t;
};
template <>
struct UintOf<4> {
  using type = uint32_t;
};
template <>
struct UintOf<8> {
  using type = uint64_t;
};

// dst row = src row with the dropped entries zeroed (in place allowed), rows x n (ld ldx),
// plus a zero pad after an odd n (the bf16 GEMMs read pairs).
template <typename X>
void drop_rows(const X* src, X* dst, int64_t rows, int64_t n, int64_t ldx, const uint8_t* keep, int64_t ldk) {
  using U = typename UintOf<sizeof(X)>::type;
  for (int64_t r = 0; r < rows; ++r) {
    const U* s = reinterpret_cast<const U*>(src + r * ldx);
    U* d = reinterpret_cast<U*>(dst + r * ldx);
    const uint8_t* k = keep + r * ldk;
    for (int64_t c = 0; c < n; ++c) d[c] = s[c] & static_cast<U>(U(0) - static_cast<U>(k[c]));
    if (n & 1) d[n] = 0;
  }
}

}  // namespace
}  // namespace truthgpt
