// CPU attention, part 2b: the AVX2+FMA row kernels (fp32 accumulation: fp32, bf16 and the
// widened fp16 inputs) for CPUs without AVX-512, and `Rows<Acc, PT>`, which picks portable,
// AVX2 or AVX-512 rows at run time. Same algorithm and numbers as the AVX-512 rows in
// attention_rows.h (same exp2 polynomial, same lazy rescaling, NaN-propagating row max), on
// 8 lanes; row tails through masked loads/stores. Included by attention_schedule.h only.
#pragma once
#include "cpu/attention_rows.h"

namespace truthgpt {
namespace {  // internal to the CPU attention kernel (one translation unit: attention.cpp)

#if TK_X86
// ---- AVX2 + FMA (fp32)
TK_AVX2 inline __m256 exp2_v8(__m256 x) {
  // As exp2_v: 2^x = 2^round(x) * p(f), f in [-0.5, 0.5]; results below 2^-126 (and -inf)
  // are zeroed; NaN stays NaN. No scalef: the exponent is built in the bits, with x capped
  // at 128 (min keeps a NaN second operand) and 2^128 applied as 2 * 2^127 (overflow to inf).
  const __m256 normal = _mm256_cmp_ps(x, _mm256_set1_ps(-126.f), _CMP_NLT_UQ);
  x = _mm256_min_ps(_mm256_set1_ps(128.f), x);
  const __m256 fl = _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m256 f = _mm256_sub_ps(x, fl);
  __m256 p = _mm256_set1_ps(1.5337577497120947e-4f);
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.3399859890341759e-3f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(9.618519805371761e-3f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(5.550329014658928e-2f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(0.24022646248340607f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(0.6931471824645996f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.0f));
  const __m256 top = _mm256_cmp_ps(fl, _mm256_set1_ps(127.f), _CMP_GT_OQ);
  p = _mm256_add_ps(p, _mm256_and_ps(top, p));  // x 2 where round(x) == 128
  const __m256i e = _mm256_add_epi32(_mm256_cvtps_epi32(_mm256_min_ps(fl, _mm256_set1_ps(127.f))),
                                     _mm256_set1_epi32(127));
  p = _mm256_mul_ps(p, _mm256_castsi256_ps(_mm256_slli_epi32(e, 23)));
  return _mm256_and_ps(p, normal);
}

TK_AVX2 inline __m256 tanh_v8(__m256 y) {
  // tanh(y) = 1 - 2 / (exp(2y) + 1)
  const __m256 e = exp2_v8(_mm256_mul_ps(y, _mm256_set1_ps(static_cast<float>(2.0 * kLog2e))));
  return _mm256_sub_ps(_mm256_set1_ps(1.f), _mm256_div_ps(_mm256_set1_ps(2.f), _mm256_add_ps(e, _mm256_set1_ps(1.f))));
}

// Lane mask (all ones in the first min(left, 8) lanes) for maskload/maskstore.
TK_AVX2 inline __m256i tail_mask8(int64_t left) {
  alignas(32) static const int32_t kLanes[16] = {-1, -1, -1, -1, -1, -1, -1, -1, 0, 0, 0, 0, 0, 0, 0, 0};
  return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(kLanes + 8 - std::min<int64_t>(std::max<int64_t>(left, 0), 8)));
}

// 8 floats -> bf16 (round to nearest even by integer rounding, as store_bf16), `left` of them.
TK_AVX2 inline void store_bf16_8(uint16_t* dst, int64_t left, __m256 x) {
  __m256i bits = _mm256_castps_si256(x);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  bits = _mm256_srli_epi32(_mm256_add_epi32(bits, _mm256_add_epi32(_mm256_set1_epi32(0x7FFF), lsb)), 16);
  const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(bits, bits), 0x08);
  const __m128i h = _mm256_castsi256_si128(packed);
  if (left >= 8) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst), h);
  } else if (left > 0) {
    alignas(16) uint16_t tmp[8];
    _mm_store_si128(reinterpret_cast<__m128i*>(tmp), h);
    std::memcpy(dst, tmp, sizeof(uint16_t) * left);
  }
}

struct RowConsts8 {
  __m256i vlo1, vhi1;  // lo - 1, hi + 1 (visible: lo - 1 < j < hi + 1)
  __m256 prel, slope, inv_cap, capmul;
  const uint8_t* cm;
};

TK_AVX2 inline RowConsts8 row_consts8(int64_t n, int64_t j0, const RowInfo<float>& ri, const Cfg<float>& cf) {
  RowConsts8 k;
  const int32_t lo = static_cast<int32_t>(std::max<int64_t>(std::min<int64_t>(ri.lo - j0, n + 1), -1));
  const int32_t hi = static_cast<int32_t>(std::max<int64_t>(std::min<int64_t>(ri.hi - j0, n + 1), -2));
  k.vlo1 = _mm256_set1_epi32(lo - 1);
  k.vhi1 = _mm256_set1_epi32(hi + 1);
  k.prel = _mm256_set1_ps(static_cast<float>(ri.pos - j0));
  k.slope = _mm256_set1_ps(ri.slope2);
  k.inv_cap = _mm256_set1_ps(cf.inv_cap);
  k.capmul = _mm256_set1_ps(cf.capmul);
  k.cm = ri.cm;
  return k;
}

// Raw scores of columns [c, c + 8) (`left` of them valid) -> log2-unit scores.
template <bool MASK, bool ALIBI, bool SOFTCAP>
TK_AVX2 inline __m256 transform_v8(__m256 x, int64_t c, int64_t left, const RowConsts8& k, float* g) {
  if (SOFTCAP) {
    const __m256 t = tanh_v8(_mm256_mul_ps(x, k.inv_cap));
    if (g) _mm256_maskstore_ps(g + c, tail_mask8(left), _mm256_fnmadd_ps(t, t, _mm256_set1_ps(1.f)));
    x = _mm256_mul_ps(t, k.capmul);
  }
  if (ALIBI || MASK) {
    const __m256i jc = _mm256_add_epi32(_mm256_set1_epi32(static_cast<int32_t>(c)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    if (ALIBI) {
      const __m256 d = _mm256_andnot_ps(_mm256_set1_ps(-0.f), _mm256_sub_ps(k.prel, _mm256_cvtepi32_ps(jc)));
      x = _mm256_fnmadd_ps(k.slope, d, x);
    }
    if (MASK) {
      __m256i vm = _mm256_and_si256(_mm256_cmpgt_epi32(jc, k.vlo1), _mm256_cmpgt_epi32(k.vhi1, jc));
      if (k.cm) {
        uint64_t b = 0;
        std::memcpy(&b, k.cm + c, static_cast<size_t>(std::min<int64_t>(left, 8)));
        const __m256i bw = _mm256_cvtepu8_epi32(_mm_cvtsi64_si128(static_cast<long long>(b)));
        vm = _mm256_andnot_si256(_mm256_cmpeq_epi32(bw, _mm256_setzero_si256()), vm);
      }
      x = _mm256_blendv_ps(_mm256_set1_ps(kNegInf), x, _mm256_castsi256_ps(vm));
    }
  }
  return x;
}

// Running max and NaN flags of the valid lanes of x (vmaxps drops NaN: tracked beside).
TK_AVX2 inline void max_step8(__m256& vmax, __m256& nan, __m256 x, __m256 valid) {
  vmax = _mm256_max_ps(vmax, _mm256_blendv_ps(_mm256_set1_ps(kNegInf), x, valid));
  nan = _mm256_or_ps(nan, _mm256_and_ps(valid, _mm256_cmp_ps(x, x, _CMP_UNORD_Q)));
}

TK_AVX2 inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

TK_AVX2 inline float row_max8(__m256 vmax, __m256 nan) {
  if (_mm256_movemask_ps(nan)) return std::numeric_limits<float>::quiet_NaN();
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(vmax), _mm256_extractf128_ps(vmax, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_movehdup_ps(m));
  return _mm_cvtss_f32(m);
}

template <bool MASK, bool ALIBI, bool SOFTCAP>
TK_AVX2 float prep_row_avx2(float* s, int64_t n, int64_t j0, const RowInfo<float>& ri, const Cfg<float>& cf,
                            float* g) {
  const RowConsts8 k = row_consts8(n, j0, ri, cf);
  const __m256 all = _mm256_castsi256_ps(_mm256_set1_epi32(-1));
  __m256 vmax = _mm256_set1_ps(kNegInf), nan = _mm256_setzero_ps();
  int64_t c = 0;
  for (; c + 8 <= n; c += 8) {
    const __m256 x = transform_v8<MASK, ALIBI, SOFTCAP>(_mm256_loadu_ps(s + c), c, 8, k, g);
    if (MASK || ALIBI || SOFTCAP) _mm256_storeu_ps(s + c, x);
    max_step8(vmax, nan, x, all);
  }
  if (c < n) {
    const __m256i tm = tail_mask8(n - c);
    const __m256 x = transform_v8<MASK, ALIBI, SOFTCAP>(_mm256_maskload_ps(s + c, tm), c, n - c, k, g);
    if (MASK || ALIBI || SOFTCAP) _mm256_maskstore_ps(s + c, tm, x);
    max_step8(vmax, nan, x, _mm256_castsi256_ps(tm));
  }
  return row_max8(vmax, nan);
}

TK_AVX2 prep_avx_fn pick_prep_avx2(bool mask, bool alibi, bool softcap) {
  return pick_row_kernel(mask, alibi, softcap, [](auto f) -> prep_avx_fn {
    using F = decltype(f);
    return prep_row_avx2<F::mask, F::alibi, F::softcap>;
  });
}

// 8 probabilities of columns [c, c + 8), `left` valid, to fp32 (pf) and/or bf16 (pb).
TK_AVX2 inline void store_p8(float* pf, uint16_t* pb, int64_t c, int64_t left, __m256 p) {
  if (pf) {
    if (left >= 8) {
      _mm256_storeu_ps(pf + c, p);
    } else {
      _mm256_maskstore_ps(pf + c, tail_mask8(left), p);
    }
  }
  if (pb) store_bf16_8(pb + c, left, p);
}

// p = exp2(s - m) over a row: written as fp32 (in place allowed) and/or bf16; returns the sum.
TK_AVX2 float exp_row_avx2(const float* s, int64_t n, float m, float* pf, uint16_t* pb) {
  const __m256 vm = _mm256_set1_ps(m);
  __m256 sum0 = _mm256_setzero_ps(), sum1 = _mm256_setzero_ps();
  int64_t c = 0;
  for (; c + 16 <= n; c += 16) {
    const __m256 p0 = exp2_v8(_mm256_sub_ps(_mm256_loadu_ps(s + c), vm));
    const __m256 p1 = exp2_v8(_mm256_sub_ps(_mm256_loadu_ps(s + c + 8), vm));
    sum0 = _mm256_add_ps(sum0, p0);
    sum1 = _mm256_add_ps(sum1, p1);
    store_p8(pf, pb, c, 8, p0);
    store_p8(pf, pb, c + 8, 8, p1);
  }
  for (; c < n; c += 8) {
    const __m256i tm = tail_mask8(n - c);
    const __m256 p = _mm256_and_ps(_mm256_castsi256_ps(tm), exp2_v8(_mm256_sub_ps(_mm256_maskload_ps(s + c, tm), vm)));
    sum0 = _mm256_add_ps(sum0, p);
    store_p8(pf, pb, c, n - c, p);
  }
  if (pb && (n & 1)) pb[n] = 0;
  return hsum8(_mm256_add_ps(sum0, sum1));
}

// One pass over raw scores: transform, p = exp2(x - m) stored, sum returned, max of x in *mx.
// s is left untouched (a row whose max exceeds the reference redoes the piece from it).
template <bool MASK, bool ALIBI, bool SOFTCAP>
TK_AVX2 float fused_row_avx2(const float* s, int64_t n, int64_t j0, const RowInfo<float>& ri, const Cfg<float>& cf,
                             float m, float* pf, uint16_t* pb, float* mx) {
  const RowConsts8 k = row_consts8(n, j0, ri, cf);
  const __m256 vm = _mm256_set1_ps(m);
  const __m256 all = _mm256_castsi256_ps(_mm256_set1_epi32(-1));
  __m256 vmax = _mm256_set1_ps(kNegInf), nan = _mm256_setzero_ps();
  __m256 sum0 = _mm256_setzero_ps(), sum1 = _mm256_setzero_ps();
  int64_t c = 0;
  for (; c + 16 <= n; c += 16) {
    const __m256 x0 = transform_v8<MASK, ALIBI, SOFTCAP>(_mm256_loadu_ps(s + c), c, 8, k, nullptr);
    const __m256 x1 = transform_v8<MASK, ALIBI, SOFTCAP>(_mm256_loadu_ps(s + c + 8), c + 8, 8, k, nullptr);
    max_step8(vmax, nan, x0, all);
    max_step8(vmax, nan, x1, all);
    const __m256 p0 = exp2_v8(_mm256_sub_ps(x0, vm));
    const __m256 p1 = exp2_v8(_mm256_sub_ps(x1, vm));
    sum0 = _mm256_add_ps(sum0, p0);
    sum1 = _mm256_add_ps(sum1, p1);
    store_p8(pf, pb, c, 8, p0);
    store_p8(pf, pb, c + 8, 8, p1);
  }
  for (; c < n; c += 8) {
    const __m256i tm = tail_mask8(n - c);
    const __m256 valid = _mm256_castsi256_ps(tm);
    const __m256 x = transform_v8<MASK, ALIBI, SOFTCAP>(_mm256_maskload_ps(s + c, tm), c, n - c, k, nullptr);
    max_step8(vmax, nan, x, valid);
    const __m256 p = _mm256_and_ps(valid, exp2_v8(_mm256_sub_ps(x, vm)));
    sum0 = _mm256_add_ps(sum0, p);
    store_p8(pf, pb, c, n - c, p);
  }
  if (pb && (n & 1)) pb[n] = 0;
  *mx = row_max8(vmax, nan);
  return hsum8(_mm256_add_ps(sum0, sum1));
}

using fused8_fn = float (*)(const float*, int64_t, int64_t, const RowInfo<float>&, const Cfg<float>&, float, float*,
                            uint16_t*, float*);

TK_AVX2 fused8_fn pick_fused_avx2(bool mask, bool alibi, bool softcap) {
  return pick_row_kernel(mask, alibi, softcap, [](auto f) -> fused8_fn {
    using F = decltype(f);
    return fused_row_avx2<F::mask, F::alibi, F::softcap>;
  });
}

TK_AVX2 void scale_row_avx2(float* o, int64_t D, float alpha) {
  const __m256 va = _mm256_set1_ps(alpha);
  int64_t d = 0;
  for (; d + 8 <= D; d += 8) _mm256_storeu_ps(o + d, _mm256_mul_ps(_mm256_loadu_ps(o + d), va));
  for (; d < D; ++d) o[d] *= alpha;
}

// ---- the row drivers of the vector paths (AVX-512, AVX2); the vector work is in `prep`
// (transform + row max), `fused` (one pass: transform, exp2, sum, max), `exp_row`, `scale_row`.
using exp_row_fn = float (*)(const float*, int64_t, float, float*, uint16_t*);
using scale_row_fn = void (*)(float*, int64_t, float);

// Forward: a row's first piece finds its exact max (two passes); later pieces run one fused
// pass against the running max, redone against the new max only when it grew by more than
// kLazyRescale. fused(s, ri, m, p, &mx) -> sum.
template <typename PT, typename Fused>
void fwd_rows_simd(const RowsArgs<float, PT>& a, prep_avx_fn prep, const Fused& fused, exp_row_fn exp_row,
                   scale_row_fn scale_row) {
  const Cfg<float>& cf = *a.cf;
  constexpr bool kBf16 = std::is_same<PT, bf16>::value;
  for (int64_t r = 0; r < a.rows; ++r) {
    float* s = a.S + r * a.ldS;
    PT* p = a.P + r * a.ldP;
    float* pf = kBf16 ? nullptr : reinterpret_cast<float*>(p);
    uint16_t* pb = kBf16 ? reinterpret_cast<uint16_t*>(p) : nullptr;
    const float m_old = a.m[r];
    if (m_old == kNegInf) {
      const float mx = prep(s, a.n, a.j0, a.ri[r], cf, nullptr);
      if (mx == kNegInf) {
        std::memset(static_cast<void*>(p), 0, sizeof(PT) * (a.n + (a.n & 1)));
        continue;
      }
      a.l[r] = exp_row(s, a.n, mx, pf, pb);
      a.m[r] = mx;
      continue;
    }
    float mx;
    const float sum = fused(s, a.ri[r], m_old, p, &mx);
    if (mx <= m_old + kLazyRescale) {
      a.l[r] += sum;
      continue;
    }
    prep(s, a.n, a.j0, a.ri[r], cf, nullptr);  // the max grew a lot: redo against it
    const float alpha = std::exp2(m_old - mx);
    a.l[r] = a.l[r] * alpha + exp_row(s, a.n, mx, pf, pb);
    a.m[r] = mx;
    scale_row(a.acc + r * a.ldacc, a.D, alpha);
  }
}

template <typename PT>
void fwd_rows_avx512(const RowsArgs<float, PT>& a) {
  const Cfg<float>& cf = *a.cf;
  const int key = (a.partial ? 4 : 0) | (cf.alibi ? 2 : 0) | (cf.softcap ? 1 : 0);
  fused_fn f;
  if constexpr (std::is_same<PT, bf16>::value) {
    f = cpu_has_avx512bf16() ? pick_fused_t<2>(key) : pick_fused_t<1>(key);
  } else {
    f = pick_fused_t<0>(key);
  }
  auto fused = [&](const float* s, const RowInfo<float>& ri, float m, PT* p, float* mx) {
    return f(s, a.n, a.j0, ri, cf, m, p, mx);
  };
  fwd_rows_simd<PT>(a, pick_prep_avx512(a.partial, cf.alibi, cf.softcap), fused, exp_row_avx512, scale_row_avx512);
}

template <typename PT>
void fwd_rows_avx2(const RowsArgs<float, PT>& a) {
  const Cfg<float>& cf = *a.cf;
  constexpr bool kBf16 = std::is_same<PT, bf16>::value;
  const fused8_fn f = pick_fused_avx2(a.partial, cf.alibi, cf.softcap);
  auto fused = [&](const float* s, const RowInfo<float>& ri, float m, PT* p, float* mx) {
    return f(s, a.n, a.j0, ri, cf, m, kBf16 ? nullptr : reinterpret_cast<float*>(p),
             kBf16 ? reinterpret_cast<uint16_t*>(p) : nullptr, mx);
  };
  fwd_rows_simd<PT>(a, pick_prep_avx2(a.partial, cf.alibi, cf.softcap), fused, exp_row_avx2, scale_row_avx2);
}

// Backward: P = exp2(s - lse2) in place (and its low-precision copy), from the saved lse;
// row(s, ri, g, lse2, pl) does one row.
template <typename PT, typename Row>
void bwd_p_rows_simd(const RowsArgs<float, PT>& a, const Row& row) {
  for (int64_t r = 0; r < a.rows; ++r) {
    float* s = a.S + r * a.ldS;
    uint16_t* pl = a.P ? reinterpret_cast<uint16_t*>(a.P + r * a.ldP) : nullptr;
    float* g = a.G ? a.G + r * a.ldS : nullptr;
    const float lse2 = a.ri[r].lse2;
    if (lse2 == kNegInf) {
      std::memset(s, 0, sizeof(float) * a.n);
      if (g) std::memset(g, 0, sizeof(float) * a.n);
      if (pl) std::memset(pl, 0, sizeof(uint16_t) * (a.n + (a.n & 1)));
      continue;
    }
    row(s, a.ri[r], g, lse2, pl);
  }
}

template <typename PT>
TK_AVX2 void bwd_ds_rows_avx2(const RowsArgs<float, PT>& a) {
  for (int64_t r = 0; r < a.rows; ++r) {
    const float* p = a.S + r * a.ldS;
    float* dp = a.dP + r * a.ldS;
    const float* g = a.G ? a.G + r * a.ldS : nullptr;
    uint16_t* o = a.dSl ? reinterpret_cast<uint16_t*>(a.dSl + r * a.ldP) : nullptr;
    const __m256 delta = _mm256_set1_ps(a.ri[r].delta);
    for (int64_t c = 0; c < a.n; c += 8) {
      const __m256i tm = tail_mask8(a.n - c);
      __m256 x = _mm256_mul_ps(_mm256_maskload_ps(p + c, tm), _mm256_sub_ps(_mm256_maskload_ps(dp + c, tm), delta));
      if (g) x = _mm256_mul_ps(x, _mm256_maskload_ps(g + c, tm));
      _mm256_maskstore_ps(dp + c, tm, x);
      if (o) store_bf16_8(o + c, a.n - c, x);
    }
    if (o && (a.n & 1)) o[a.n] = 0;
  }
}
#endif  // TK_X86

template <typename Acc, typename PT>
struct Rows {
  RowsImpl impl = RowsImpl::Portable;
  void fwd(const RowsArgs<Acc, PT>& a) const {
#if TK_X86
    if constexpr (std::is_same<Acc, float>::value) {
      if (impl == RowsImpl::Avx512) return fwd_rows_avx512<PT>(a);
      if (impl == RowsImpl::Avx2) return fwd_rows_avx2<PT>(a);
    }
#endif
    fwd_rows_portable<Acc, PT>(a);
  }
  void bwd_p(const RowsArgs<Acc, PT>& a) const {
#if TK_X86
    if constexpr (std::is_same<Acc, float>::value) {
      const Cfg<float>& cf = *a.cf;
      if (impl == RowsImpl::Avx512) {
        const bwd_p_fn f = pick_bwd_p_avx512(a.partial, cf.alibi, cf.softcap);
        return bwd_p_rows_simd<PT>(a, [&](float* s, const RowInfo<float>& ri, float* g, float lse2, uint16_t* pl) {
          f(s, a.n, a.j0, ri, cf, g, lse2, pl);
        });
      }
      if (impl == RowsImpl::Avx2) {
        const prep_avx_fn prep = pick_prep_avx2(a.partial, cf.alibi, cf.softcap);
        return bwd_p_rows_simd<PT>(a, [&](float* s, const RowInfo<float>& ri, float* g, float lse2, uint16_t* pl) {
          prep(s, a.n, a.j0, ri, cf, g);
          exp_row_avx2(s, a.n, lse2, s, pl);
        });
      }
    }
#endif
    bwd_p_rows_portable<Acc, PT>(a);
  }
  void bwd_ds(const RowsArgs<Acc, PT>& a) const {
#if TK_X86
    if constexpr (std::is_same<Acc, float>::value) {
      if (impl == RowsImpl::Avx512) return bwd_ds_rows_avx512<PT>(a);
      if (impl == RowsImpl::Avx2) return bwd_ds_rows_avx2<PT>(a);
    }
#endif
    bwd_ds_rows_portable<Acc, PT>(a);
  }
  // out[j * so + d] = acc[d * n + j] rounded to PT, j < n, d < D (acc: D x n, a transposed
  // accumulator); tbuf: scratch.
  void store_transposed(PT* out, int64_t so, const Acc* acc, int64_t D, int64_t n, std::vector<Acc>& tbuf) const {
#if TK_X86
    if constexpr (std::is_same<Acc, float>::value && std::is_same<PT, bf16>::value) {
      if (impl == RowsImpl::Avx512 && cpu_has_avx512bf16() && D % 16 == 0 && n % 16 == 0)
        return transpose_f32_bf16(D, n, acc, n, reinterpret_cast<uint16_t*>(out), so);
    }
#endif
    tbuf.resize(D * n);
    Acc* rows = tbuf.data();  // (n x D)
#if TK_X86
    if constexpr (std::is_same<Acc, float>::value) {
      if (impl == RowsImpl::Avx512) {
        transpose_f32(D, n, acc, n, rows, D);
        for (int64_t j = 0; j < n; ++j) store(out + j * so, rows + j * D, D);
        return;
      }
    }
#endif
    for (int64_t j = 0; j < n; ++j)
      for (int64_t d = 0; d < D; ++d) rows[j * D + d] = acc[d * n + j];
    for (int64_t j = 0; j < n; ++j) store(out + j * so, rows + j * D, D);
  }
  // sum_d a[d] b[d] in Acc
  Acc dot(const PT* a, const PT* b, int64_t n) const {
#if TK_X86
    if constexpr (std::is_same<Acc, float>::value && std::is_same<PT, bf16>::value) {
      if (impl == RowsImpl::Avx512)
        return dot_bf16_avx512(reinterpret_cast<const uint16_t*>(a), reinterpret_cast<const uint16_t*>(b), n);
    }
#endif
    return row_dot<PT>(a, b, n);
  }
  // o[0, n) = a[0, n) rounded to PT (round to nearest even)
  void store(PT* o, const Acc* a, int64_t n) const {
#if TK_X86
    if constexpr (std::is_same<Acc, float>::value && !std::is_same<PT, float>::value) {
      if (impl == RowsImpl::Avx512 && n % 2 == 0) {  // (the converters zero-pad an odd row)
        uint16_t* ob = reinterpret_cast<uint16_t*>(o);
        if (cpu_has_avx512bf16()) {
          convert_row_bf16_native(a, n, ob);
        } else {
          convert_row_bf16_plain(a, n, ob);
        }
        return;
      }
    }
#endif
    for (int64_t d = 0; d < n; ++d) o[d] = static_cast<PT>(a[d]);
  }
};

}  // namespace
}  // namespace truthgpt
