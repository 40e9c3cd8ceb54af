// CPU attention, part 2 of 4: the row kernels. Score transforms (softcap, ALiBi from the
// slope, masks), the online softmax in log2 units (NaN-propagating row max) and the backward's
// dP/dS rows, portable and AVX-512 (own exp2 polynomial). The AVX2 variant, the row drivers
// the vector paths share and `Rows<Acc, PT>` (picks a path at run time) are in
// attention_rows_avx2.h.
#pragma once
#include "cpu/attention_gemm.h"

namespace truthgpt {
namespace {  // internal to the CPU attention kernel (one translation unit: attention.cpp)

// ============================================================================ row kernels
// Scores arrive from the QK^T GEMM multiplied by `alpha` (scale * log2(e), or just scale
// with softcap); after the transform they are in log2 units, so p = exp2(s - m).
template <typename Acc>
struct Cfg {
  bool alibi = false, softcap = false;
  Acc inv_cap = 0;  // 1 / softcap
  Acc capmul = 0;   // softcap * log2(e)
};

template <typename Acc>
struct RowInfo {
  int64_t pos = 0;            // absolute query position i' = i + Sk - Sq
  int64_t lo = 0, hi = -1;    // visible key window [lo, hi]
  const uint8_t* cm = nullptr;  // column mask of the current piece (nullptr: all visible)
  Acc slope2 = 0;             // ALiBi slope * log2(e)
  Acc lse2 = 0;               // backward: lse * log2(e)
  Acc delta = 0;              // backward: rowsum(dO * O)
};

template <typename Acc, typename PT>
struct RowsArgs {
  int64_t rows = 0, n = 0, j0 = 0;
  bool partial = false;
  const RowInfo<Acc>* ri = nullptr;
  const Cfg<Acc>* cf = nullptr;
  Acc* S = nullptr;  // rows x n scores (ld ldS), transformed in place; fwd: becomes P when PT == Acc
  int64_t ldS = 0;
  PT* P = nullptr;  // fwd: P output (== S for fp32/fp64); bwd: low-precision copy of P (or null)
  int64_t ldP = 0;
  // forward
  Acc* m = nullptr;
  Acc* l = nullptr;
  Acc* acc = nullptr;
  int64_t ldacc = 0, D = 0;
  // backward
  Acc* G = nullptr;   // softcap derivative 1 - tanh^2 (ld ldS)
  Acc* dP = nullptr;  // dO V^T (ld ldS); becomes dS
  PT* dSl = nullptr;  // low-precision copy of dS (or null)
};

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// max that propagates NaN (std::max and the max instructions drop a NaN operand): a NaN score
// must reach its row's max, so the row comes out NaN, as in the reference, not empty.
template <typename Acc>
inline Acc max_nan(Acc a, Acc b) {
  return (a > b || a != a) ? a : b;
}

// ---- portable
template <typename Acc, bool MASK, bool ALIBI, bool SOFTCAP>
Acc prep_row_portable(Acc* s, int64_t n, int64_t j0, const RowInfo<Acc>& ri, const Cfg<Acc>& cf, Acc* g) {
  const Acc ninf = -std::numeric_limits<Acc>::infinity();
  Acc mx = ninf;
  const int64_t lo = ri.lo - j0, hi = ri.hi - j0, prel = ri.pos - j0;
  for (int64_t c = 0; c < n; ++c) {
    Acc x = s[c];
    if (SOFTCAP) {
      const Acc t = std::tanh(x * cf.inv_cap);
      if (g) g[c] = Acc(1) - t * t;
      x = t * cf.capmul;
    }
    if (ALIBI) x -= ri.slope2 * static_cast<Acc>(std::abs(prel - c));
    if (MASK && (c < lo || c > hi || (ri.cm && !ri.cm[c]))) x = ninf;
    s[c] = x;
    mx = max_nan(mx, x);
  }
  return mx;
}

template <typename Acc>
using prep_fn = Acc (*)(Acc*, int64_t, int64_t, const RowInfo<Acc>&, const Cfg<Acc>&, Acc*);

template <typename Acc>
prep_fn<Acc> pick_prep_portable(bool mask, bool alibi, bool softcap) {
  return pick_row_kernel(mask, alibi, softcap, [](auto f) -> prep_fn<Acc> {
    using F = decltype(f);
    return prep_row_portable<Acc, F::mask, F::alibi, F::softcap>;
  });
}

template <typename PT, typename Acc>
inline PT cast_to(Acc x) {
  return static_cast<PT>(x);
}

template <typename Acc, typename PT>
void fwd_rows_portable(const RowsArgs<Acc, PT>& a) {
  const Cfg<Acc>& cf = *a.cf;
  const prep_fn<Acc> prep = pick_prep_portable<Acc>(a.partial, cf.alibi, cf.softcap);
  const Acc ninf = -std::numeric_limits<Acc>::infinity();
  for (int64_t r = 0; r < a.rows; ++r) {
    Acc* s = a.S + r * a.ldS;
    PT* p = a.P + r * a.ldP;
    const Acc mx = prep(s, a.n, a.j0, a.ri[r], cf, nullptr);
    const Acc m_old = a.m[r];
    const Acc m_new = max_nan(m_old, mx);
    if (m_new == ninf) {
      for (int64_t c = 0; c < a.n; ++c) p[c] = PT(0);
      if (a.n & 1) p[a.n] = PT(0);
      continue;
    }
    const Acc alpha = std::exp2(m_old - m_new);
    Acc sum = 0;
    for (int64_t c = 0; c < a.n; ++c) {
      const Acc e = std::exp2(s[c] - m_new);
      sum += e;
      p[c] = cast_to<PT>(e);
    }
    if (a.n & 1) p[a.n] = PT(0);
    a.l[r] = a.l[r] * alpha + sum;
    a.m[r] = m_new;
    if (alpha != Acc(1)) {
      Acc* o = a.acc + r * a.ldacc;
      for (int64_t d = 0; d < a.D; ++d) o[d] *= alpha;
    }
  }
}

template <typename Acc, typename PT>
void bwd_p_rows_portable(const RowsArgs<Acc, PT>& a) {
  const Cfg<Acc>& cf = *a.cf;
  const prep_fn<Acc> prep = pick_prep_portable<Acc>(a.partial, cf.alibi, cf.softcap);
  const Acc ninf = -std::numeric_limits<Acc>::infinity();
  for (int64_t r = 0; r < a.rows; ++r) {
    Acc* s = a.S + r * a.ldS;
    PT* pl = a.P ? a.P + r * a.ldP : nullptr;
    Acc* g = a.G ? a.G + r * a.ldS : nullptr;
    const Acc lse2 = a.ri[r].lse2;
    if (lse2 == ninf) {
      for (int64_t c = 0; c < a.n; ++c) s[c] = 0;
      if (g)
        for (int64_t c = 0; c < a.n; ++c) g[c] = 0;
    } else {
      prep(s, a.n, a.j0, a.ri[r], cf, g);
      for (int64_t c = 0; c < a.n; ++c) s[c] = std::exp2(s[c] - lse2);
    }
    if (pl) {
      for (int64_t c = 0; c < a.n; ++c) pl[c] = cast_to<PT>(s[c]);
      if (a.n & 1) pl[a.n] = PT(0);
    }
  }
}

template <typename Acc, typename PT>
void bwd_ds_rows_portable(const RowsArgs<Acc, PT>& a) {
  for (int64_t r = 0; r < a.rows; ++r) {
    const Acc* p = a.S + r * a.ldS;
    Acc* dp = a.dP + r * a.ldS;
    const Acc* g = a.G ? a.G + r * a.ldS : nullptr;
    const Acc delta = a.ri[r].delta;
    for (int64_t c = 0; c < a.n; ++c) {
      Acc x = p[c] * (dp[c] - delta);
      if (g) x *= g[c];
      dp[c] = x;
    }
    if (a.dSl) {
      PT* o = a.dSl + r * a.ldP;
      for (int64_t c = 0; c < a.n; ++c) o[c] = cast_to<PT>(dp[c]);
      if (a.n & 1) o[a.n] = PT(0);
    }
  }
}

// sum_d a[d] b[d] in the accumulation precision: eight independent partial sums (a single
// chain of D dependent adds was 4% of the bf16 backward), added in a fixed order. (bf16 on
// AVX-512: dot_bf16_avx512.)
template <typename T>
acc_t<T> row_dot(const T* a, const T* b, int64_t D) {
  using Acc = acc_t<T>;
  Acc part[8] = {};
  int64_t d = 0;
  for (; d + 8 <= D; d += 8)
    for (int u = 0; u < 8; ++u) part[u] += static_cast<Acc>(to_f(a[d + u])) * static_cast<Acc>(to_f(b[d + u]));
  Acc rest = 0;
  for (; d < D; ++d) rest += static_cast<Acc>(to_f(a[d])) * static_cast<Acc>(to_f(b[d]));
  return ((part[0] + part[1]) + (part[2] + part[3])) + ((part[4] + part[5]) + (part[6] + part[7])) + rest;
}

#if TK_X86
// ---- AVX-512 (fp32)
TK_AVX512 inline __m512 exp2_v(__m512 x) {
  // 2^x = 2^round(x) * 2^f, f in [-0.5, 0.5]; degree-6 polynomial (rel. error ~1e-7);
  // scalef applies the exponent (overflow to inf). Results below 2^-126 (and -inf inputs)
  // are zeroed: subnormal probabilities would only slow the GEMMs. NaN stays NaN (not-less-
  // than, unordered: a NaN lane is kept and the polynomial carries it).
  const __mmask16 normal = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-126.f), _CMP_NLT_UQ);
  const __m512 fl = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(x, fl);
  __m512 p = _mm512_set1_ps(1.5337577497120947e-4f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.3399859890341759e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.618519805371761e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.550329014658928e-2f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.24022646248340607f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.6931471824645996f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
  return _mm512_maskz_scalef_ps(normal, p, fl);
}

TK_AVX512 inline __m512 tanh_v(__m512 y) {
  // tanh(y) = 1 - 2 / (exp(2y) + 1)
  const __m512 e = exp2_v(_mm512_mul_ps(y, _mm512_set1_ps(static_cast<float>(2.0 * kLog2e))));
  return _mm512_sub_ps(_mm512_set1_ps(1.f), _mm512_div_ps(_mm512_set1_ps(2.f), _mm512_add_ps(e, _mm512_set1_ps(1.f))));
}

TK_AVX512 inline __mmask16 tail_mask(int64_t left) {
  return left >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << left) - 1);
}

TK_AVX512 inline void store_bf16(uint16_t* dst, __mmask16 m, __m512 x) {
  __m512i bits = _mm512_castps_si512(x);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  bits = _mm512_add_epi32(bits, _mm512_add_epi32(_mm512_set1_epi32(0x7FFF), lsb));
  _mm256_mask_storeu_epi16(dst, m, _mm512_cvtepi32_epi16(_mm512_srli_epi32(bits, 16)));
}

// Per-row constants of the score transform.
struct RowConsts {
  __m512i vlo, vhi;
  __m512 prel, slope, inv_cap, capmul;
  const uint8_t* cm;
};

TK_AVX512 inline RowConsts row_consts(int64_t n, int64_t j0, const RowInfo<float>& ri, const Cfg<float>& cf) {
  RowConsts k;
  const int32_t lo = static_cast<int32_t>(std::max<int64_t>(std::min<int64_t>(ri.lo - j0, n + 1), -1));
  const int32_t hi = static_cast<int32_t>(std::max<int64_t>(std::min<int64_t>(ri.hi - j0, n + 1), -2));
  k.vlo = _mm512_set1_epi32(lo);
  k.vhi = _mm512_set1_epi32(hi);
  k.prel = _mm512_set1_ps(static_cast<float>(ri.pos - j0));
  k.slope = _mm512_set1_ps(ri.slope2);
  k.inv_cap = _mm512_set1_ps(cf.inv_cap);
  k.capmul = _mm512_set1_ps(cf.capmul);
  k.cm = ri.cm;
  return k;
}

// Raw scores of columns [c, c + 16) -> log2-unit scores: softcap, ALiBi, masks (-inf).
template <bool MASK, bool ALIBI, bool SOFTCAP>
TK_AVX512 inline __m512 transform_v(__m512 x, int64_t c, __mmask16 tm, const RowConsts& k, float* g) {
  if (SOFTCAP) {
    const __m512 t = tanh_v(_mm512_mul_ps(x, k.inv_cap));
    if (g) _mm512_mask_storeu_ps(g + c, tm, _mm512_fnmadd_ps(t, t, _mm512_set1_ps(1.f)));
    x = _mm512_mul_ps(t, k.capmul);
  }
  if (ALIBI || MASK) {
    const __m512i jc = _mm512_add_epi32(_mm512_set1_epi32(static_cast<int32_t>(c)),
                                        _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
    if (ALIBI) {
      const __m512 d = _mm512_abs_ps(_mm512_sub_ps(k.prel, _mm512_cvtepi32_ps(jc)));
      x = _mm512_fnmadd_ps(k.slope, d, x);
    }
    if (MASK) {
      __mmask16 vm = _mm512_cmpge_epi32_mask(jc, k.vlo) & _mm512_cmple_epi32_mask(jc, k.vhi);
      if (k.cm) {
        const __m128i b = _mm_maskz_loadu_epi8(tm, k.cm + c);
        vm &= _mm_test_epi8_mask(b, b);
      }
      x = _mm512_mask_mov_ps(_mm512_set1_ps(kNegInf), vm, x);
    }
  }
  return x;
}

// Row max of the lanes seen, NaN if any lane was NaN (vmaxps drops a NaN operand, so NaN
// lanes are tracked in a mask beside the max).
TK_AVX512 inline float row_max_nan(__m512 vmax, __mmask16 nan) {
  return nan ? std::numeric_limits<float>::quiet_NaN() : _mm512_reduce_max_ps(vmax);
}

// Transform in place (when there is one) and return the row max.
template <bool MASK, bool ALIBI, bool SOFTCAP>
TK_AVX512 float prep_row_avx512(float* s, int64_t n, int64_t j0, const RowInfo<float>& ri, const Cfg<float>& cf,
                                float* g) {
  const RowConsts k = row_consts(n, j0, ri, cf);
  __m512 vmax = _mm512_set1_ps(kNegInf);
  __mmask16 nan = 0;
  for (int64_t c = 0; c < n; c += 16) {
    const __mmask16 tm = tail_mask(n - c);
    const __m512 x = transform_v<MASK, ALIBI, SOFTCAP>(_mm512_maskz_loadu_ps(tm, s + c), c, tm, k, g);
    if (MASK || ALIBI || SOFTCAP) _mm512_mask_storeu_ps(s + c, tm, x);
    vmax = _mm512_mask_max_ps(vmax, tm, vmax, x);
    nan |= _mm512_mask_cmp_ps_mask(tm, x, x, _CMP_UNORD_Q);
  }
  return row_max_nan(vmax, nan);
}

using prep_avx_fn = float (*)(float*, int64_t, int64_t, const RowInfo<float>&, const Cfg<float>&, float*);

TK_AVX512 prep_avx_fn pick_prep_avx512(bool mask, bool alibi, bool softcap) {
  return pick_row_kernel(mask, alibi, softcap, [](auto f) -> prep_avx_fn {
    using F = decltype(f);
    return prep_row_avx512<F::mask, F::alibi, F::softcap>;
  });
}

// p = exp2(s - m) over a row: written as fp32 (in place allowed) and/or bf16; returns the sum.
// Two vectors per step (independent chains); bf16 through vcvtne2ps2bf16 where the CPU has
// AVX512-BF16 (one instruction for 32 values), else by integer rounding.
TK_AVX512BF16 inline void store2_bf16_native(uint16_t* dst, int64_t left, __m512 a, __m512 b) {
  const __m512i v = reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(b, a));
  const __mmask32 m = left >= 32 ? 0xFFFFFFFFu : static_cast<__mmask32>((1u << left) - 1);
  _mm512_mask_storeu_epi16(dst, m, v);
}

TK_AVX512 inline void store2_bf16_plain(uint16_t* dst, int64_t left, __m512 a, __m512 b) {
  store_bf16(dst, tail_mask(left), a);
  if (left > 16) store_bf16(dst + 16, tail_mask(left - 16), b);
}

#define TK_EXP_ROW_BODY(STORE2)                                                             \
  const __m512 vm = _mm512_set1_ps(m);                                                      \
  __m512 sum0 = _mm512_setzero_ps(), sum1 = _mm512_setzero_ps();                            \
  int64_t c = 0;                                                                            \
  for (; c + 32 <= n; c += 32) {                                                            \
    const __m512 p0 = exp2_v(_mm512_sub_ps(_mm512_loadu_ps(s + c), vm));                   \
    const __m512 p1 = exp2_v(_mm512_sub_ps(_mm512_loadu_ps(s + c + 16), vm));              \
    sum0 = _mm512_add_ps(sum0, p0);                                                         \
    sum1 = _mm512_add_ps(sum1, p1);                                                         \
    if (pf) {                                                                               \
      _mm512_storeu_ps(pf + c, p0);                                                         \
      _mm512_storeu_ps(pf + c + 16, p1);                                                    \
    }                                                                                       \
    if (pb) STORE2(pb + c, 32, p0, p1);                                                     \
  }                                                                                         \
  for (; c < n; c += 32) {                                                                  \
    const __mmask16 t0 = tail_mask(n - c), t1 = tail_mask(std::max<int64_t>(0, n - c - 16)); \
    __m512 p0 = exp2_v(_mm512_sub_ps(_mm512_maskz_loadu_ps(t0, s + c), vm));                \
    __m512 p1 = exp2_v(_mm512_sub_ps(_mm512_maskz_loadu_ps(t1, s + c + 16), vm));           \
    p0 = _mm512_maskz_mov_ps(t0, p0);                                                       \
    p1 = _mm512_maskz_mov_ps(t1, p1);                                                       \
    sum0 = _mm512_add_ps(sum0, p0);                                                         \
    sum1 = _mm512_add_ps(sum1, p1);                                                         \
    if (pf) {                                                                               \
      _mm512_mask_storeu_ps(pf + c, t0, p0);                                                \
      _mm512_mask_storeu_ps(pf + c + 16, t1, p1);                                           \
    }                                                                                       \
    if (pb) STORE2(pb + c, n - c, p0, p1);                                                  \
  }                                                                                         \
  if (pb && (n & 1)) pb[n] = 0;                                                             \
  return _mm512_reduce_add_ps(_mm512_add_ps(sum0, sum1));

TK_AVX512BF16 float exp_row_avx512_native(const float* s, int64_t n, float m, float* pf, uint16_t* pb) {
  TK_EXP_ROW_BODY(store2_bf16_native)
}

TK_AVX512 float exp_row_avx512_plain(const float* s, int64_t n, float m, float* pf, uint16_t* pb) {
  TK_EXP_ROW_BODY(store2_bf16_plain)
}
#undef TK_EXP_ROW_BODY

TK_AVX512 inline float exp_row_avx512(const float* s, int64_t n, float m, float* pf, uint16_t* pb) {
  if (pb && cpu_has_avx512bf16()) return exp_row_avx512_native(s, n, m, pf, pb);
  return exp_row_avx512_plain(s, n, m, pf, pb);
}

TK_AVX512 void scale_row_avx512(float* o, int64_t D, float alpha) {
  const __m512 va = _mm512_set1_ps(alpha);
  for (int64_t d = 0; d < D; d += 16) {
    const __mmask16 tm = tail_mask(D - d);
    _mm512_mask_storeu_ps(o + d, tm, _mm512_mul_ps(_mm512_maskz_loadu_ps(tm, o + d), va));
  }
}

TK_AVX512 inline void store2_f32(float* dst, int64_t left, __m512 a, __m512 b) {
  _mm512_mask_storeu_ps(dst, tail_mask(left), a);
  if (left > 16) _mm512_mask_storeu_ps(dst + 16, tail_mask(left - 16), b);
}

// One pass over raw scores: transform, p = exp2(x - m) stored, sum returned, max of x in *mx.
// s is left untouched (a row whose max exceeds the reference redoes the piece from it).
#define TK_FUSED_BODY(STORE2, OUT)                                                          \
  const RowConsts k = row_consts(n, j0, ri, cf);                                            \
  const __m512 vm = _mm512_set1_ps(m);                                                      \
  const __mmask16 all = 0xFFFF;                                                             \
  __m512 vmax = _mm512_set1_ps(kNegInf), sum0 = _mm512_setzero_ps(), sum1 = _mm512_setzero_ps(); \
  __mmask16 nan = 0;                                                                        \
  int64_t c = 0;                                                                            \
  for (; c + 32 <= n; c += 32) {                                                            \
    const __m512 x0 = transform_v<MASK, ALIBI, SOFTCAP>(_mm512_loadu_ps(s + c), c, all, k, nullptr); \
    const __m512 x1 = transform_v<MASK, ALIBI, SOFTCAP>(_mm512_loadu_ps(s + c + 16), c + 16, all, k, nullptr); \
    vmax = _mm512_max_ps(vmax, _mm512_max_ps(x0, x1));                                      \
    nan |= _mm512_cmp_ps_mask(x0, x0, _CMP_UNORD_Q) | _mm512_cmp_ps_mask(x1, x1, _CMP_UNORD_Q); \
    const __m512 p0 = exp2_v(_mm512_sub_ps(x0, vm));                                        \
    const __m512 p1 = exp2_v(_mm512_sub_ps(x1, vm));                                        \
    sum0 = _mm512_add_ps(sum0, p0);                                                         \
    sum1 = _mm512_add_ps(sum1, p1);                                                         \
    STORE2(OUT + c, 32, p0, p1);                                                            \
  }                                                                                         \
  if (c < n) {                                                                              \
    const __mmask16 t0 = tail_mask(n - c), t1 = tail_mask(std::max<int64_t>(0, n - c - 16)); \
    const __m512 x0 = transform_v<MASK, ALIBI, SOFTCAP>(_mm512_maskz_loadu_ps(t0, s + c), c, t0, k, nullptr); \
    const __m512 x1 =                                                                       \
        transform_v<MASK, ALIBI, SOFTCAP>(_mm512_maskz_loadu_ps(t1, s + c + 16), c + 16, t1, k, nullptr); \
    vmax = _mm512_mask_max_ps(vmax, t0, vmax, x0);                                          \
    vmax = _mm512_mask_max_ps(vmax, t1, vmax, x1);                                          \
    nan |= _mm512_mask_cmp_ps_mask(t0, x0, x0, _CMP_UNORD_Q) | _mm512_mask_cmp_ps_mask(t1, x1, x1, _CMP_UNORD_Q); \
    const __m512 p0 = _mm512_maskz_mov_ps(t0, exp2_v(_mm512_sub_ps(x0, vm)));              \
    const __m512 p1 = _mm512_maskz_mov_ps(t1, exp2_v(_mm512_sub_ps(x1, vm)));              \
    sum0 = _mm512_add_ps(sum0, p0);                                                         \
    sum1 = _mm512_add_ps(sum1, p1);                                                         \
    STORE2(OUT + c, n - c, p0, p1);                                                         \
  }                                                                                         \
  if (std::is_same<decltype(OUT), uint16_t*>::value && (n & 1)) OUT[n] = 0;                \
  *mx = row_max_nan(vmax, nan);                                                             \
  return _mm512_reduce_add_ps(_mm512_add_ps(sum0, sum1));

template <bool MASK, bool ALIBI, bool SOFTCAP>
TK_AVX512 float fused_row_f32(const float* s, int64_t n, int64_t j0, const RowInfo<float>& ri, const Cfg<float>& cf,
                              float m, void* outv, float* mx) {
  float* out = static_cast<float*>(outv);
  TK_FUSED_BODY(store2_f32, out)
}

template <bool MASK, bool ALIBI, bool SOFTCAP>
TK_AVX512 float fused_row_bf16_plain(const float* s, int64_t n, int64_t j0, const RowInfo<float>& ri,
                                     const Cfg<float>& cf, float m, void* outv, float* mx) {
  uint16_t* out = static_cast<uint16_t*>(outv);
  TK_FUSED_BODY(store2_bf16_plain, out)
}

template <bool MASK, bool ALIBI, bool SOFTCAP>
TK_AVX512BF16 float fused_row_bf16_native(const float* s, int64_t n, int64_t j0, const RowInfo<float>& ri,
                                          const Cfg<float>& cf, float m, void* outv, float* mx) {
  uint16_t* out = static_cast<uint16_t*>(outv);
  TK_FUSED_BODY(store2_bf16_native, out)
}
#undef TK_FUSED_BODY

using fused_fn = float (*)(const float*, int64_t, int64_t, const RowInfo<float>&, const Cfg<float>&, float, void*,
                           float*);

template <int VARIANT>  // 0 fp32 output, 1 bf16 (integer rounding), 2 bf16 (AVX512-BF16)
fused_fn pick_fused_t(int key) {
  return pick_row_kernel(key & 4, key & 2, key & 1, [](auto f) -> fused_fn {
    using F = decltype(f);
    if constexpr (VARIANT == 0) return fused_row_f32<F::mask, F::alibi, F::softcap>;
    else if constexpr (VARIANT == 1) return fused_row_bf16_plain<F::mask, F::alibi, F::softcap>;
    else return fused_row_bf16_native<F::mask, F::alibi, F::softcap>;
  });
}

// A new row max may exceed the running reference by this much (log2 units) before the row
// is rescaled: probabilities then stay <= 2^8, and most pieces need a single pass.
constexpr float kLazyRescale = 8.f;

// fp32 row -> bf16 (round to nearest even), zero pad to an even length.
TK_AVX512BF16 void convert_row_bf16_native(const float* x, int64_t n, uint16_t* o) {
  for (int64_t c = 0; c < n; c += 32)
    store2_bf16_native(o + c, n - c, _mm512_maskz_loadu_ps(tail_mask(n - c), x + c),
                       _mm512_maskz_loadu_ps(tail_mask(std::max<int64_t>(0, n - c - 16)), x + c + 16));
  if (n & 1) o[n] = 0;
}

TK_AVX512 void convert_row_bf16_plain(const float* x, int64_t n, uint16_t* o) {
  for (int64_t c = 0; c < n; c += 16) store_bf16(o + c, tail_mask(n - c), _mm512_maskz_loadu_ps(tail_mask(n - c), x + c));
  if (n & 1) o[n] = 0;
}

// Backward P, one pass over a row: transform (masks, ALiBi; softcap with its derivative into
// g), p = exp2(x - lse2) written in place as fp32 and, with pb, as bf16 (zero-padded to an
// even length). Masked entries come out 0 (exp2_v(-inf)).
#define TK_BWD_P_BODY(STORE2)                                                                 \
  const RowConsts k = row_consts(n, j0, ri, cf);                                              \
  const __m512 vl = _mm512_set1_ps(lse2);                                                     \
  for (int64_t c = 0; c < n; c += 32) {                                                       \
    const __mmask16 t0 = tail_mask(n - c), t1 = tail_mask(std::max<int64_t>(0, n - c - 16));   \
    const __m512 x0 = transform_v<MASK, ALIBI, SOFTCAP>(_mm512_maskz_loadu_ps(t0, s + c), c, t0, k, g); \
    const __m512 x1 =                                                                         \
        transform_v<MASK, ALIBI, SOFTCAP>(_mm512_maskz_loadu_ps(t1, s + c + 16), c + 16, t1, k, g); \
    const __m512 p0 = exp2_v(_mm512_sub_ps(x0, vl)), p1 = exp2_v(_mm512_sub_ps(x1, vl));     \
    _mm512_mask_storeu_ps(s + c, t0, p0);                                                     \
    _mm512_mask_storeu_ps(s + c + 16, t1, p1);                                                \
    if (pb) STORE2(pb + c, n - c, p0, p1);                                                    \
  }                                                                                           \
  if (pb && (n & 1)) pb[n] = 0;

template <bool MASK, bool ALIBI, bool SOFTCAP>
TK_AVX512 void bwd_p_row_plain(float* s, int64_t n, int64_t j0, const RowInfo<float>& ri, const Cfg<float>& cf,
                               float* g, float lse2, uint16_t* pb) {
  TK_BWD_P_BODY(store2_bf16_plain)
}

template <bool MASK, bool ALIBI, bool SOFTCAP>
TK_AVX512BF16 void bwd_p_row_native(float* s, int64_t n, int64_t j0, const RowInfo<float>& ri, const Cfg<float>& cf,
                                    float* g, float lse2, uint16_t* pb) {
  TK_BWD_P_BODY(store2_bf16_native)
}
#undef TK_BWD_P_BODY

using bwd_p_fn = void (*)(float*, int64_t, int64_t, const RowInfo<float>&, const Cfg<float>&, float*, float,
                          uint16_t*);

TK_AVX512 bwd_p_fn pick_bwd_p_avx512(bool mask, bool alibi, bool softcap) {
  const bool native = cpu_has_avx512bf16();
  return pick_row_kernel(mask, alibi, softcap, [native](auto f) -> bwd_p_fn {
    using F = decltype(f);
    return native ? bwd_p_row_native<F::mask, F::alibi, F::softcap> : bwd_p_row_plain<F::mask, F::alibi, F::softcap>;
  });
}

// dS = P (dP - delta) [x softcap derivative] over a row: into dp (fp32), or, with a bf16 copy
// wanted (o), only there: nothing reads the fp32 dS of a low-precision problem.
#define TK_BWD_DS_BODY(STORE2)                                                                \
  const __m512 vd = _mm512_set1_ps(delta);                                                    \
  for (int64_t c = 0; c < n; c += 32) {                                                       \
    const __mmask16 t0 = tail_mask(n - c), t1 = tail_mask(std::max<int64_t>(0, n - c - 16));   \
    __m512 x0 = _mm512_mul_ps(_mm512_maskz_loadu_ps(t0, p + c), _mm512_sub_ps(_mm512_maskz_loadu_ps(t0, dp + c), vd)); \
    __m512 x1 = _mm512_mul_ps(_mm512_maskz_loadu_ps(t1, p + c + 16),                         \
                              _mm512_sub_ps(_mm512_maskz_loadu_ps(t1, dp + c + 16), vd));     \
    if (g) {                                                                                  \
      x0 = _mm512_mul_ps(x0, _mm512_maskz_loadu_ps(t0, g + c));                               \
      x1 = _mm512_mul_ps(x1, _mm512_maskz_loadu_ps(t1, g + c + 16));                          \
    }                                                                                         \
    if (o) {                                                                                  \
      STORE2(o + c, n - c, x0, x1);                                                           \
    } else {                                                                                  \
      _mm512_mask_storeu_ps(dp + c, t0, x0);                                                  \
      _mm512_mask_storeu_ps(dp + c + 16, t1, x1);                                             \
    }                                                                                         \
  }                                                                                           \
  if (o && (n & 1)) o[n] = 0;

TK_AVX512 void bwd_ds_row_plain(const float* p, float* dp, const float* g, float delta, int64_t n, uint16_t* o) {
  TK_BWD_DS_BODY(store2_bf16_plain)
}

TK_AVX512BF16 void bwd_ds_row_native(const float* p, float* dp, const float* g, float delta, int64_t n, uint16_t* o) {
  TK_BWD_DS_BODY(store2_bf16_native)
}
#undef TK_BWD_DS_BODY

// sum_d a[d] b[d] of two bf16 rows in float32 (the backward's delta = rowsum(dO O)): two
// vectors of partial sums, then their lanes.
TK_AVX512 inline __m512 load_bf16(const uint16_t* p, __mmask16 m) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p)), 16));
}

TK_AVX512 float dot_bf16_avx512(const uint16_t* a, const uint16_t* b, int64_t n) {
  __m512 s0 = _mm512_setzero_ps(), s1 = _mm512_setzero_ps();
  for (int64_t c = 0; c < n; c += 32) {
    const __mmask16 t0 = tail_mask(n - c), t1 = tail_mask(std::max<int64_t>(0, n - c - 16));
    s0 = _mm512_fmadd_ps(load_bf16(a + c, t0), load_bf16(b + c, t0), s0);
    s1 = _mm512_fmadd_ps(load_bf16(a + c + 16, t1), load_bf16(b + c + 16, t1), s1);
  }
  return _mm512_reduce_add_ps(_mm512_add_ps(s0, s1));
}

template <typename PT>
TK_AVX512 void bwd_ds_rows_avx512(const RowsArgs<float, PT>& a) {
  const auto row = cpu_has_avx512bf16() ? bwd_ds_row_native : bwd_ds_row_plain;
  for (int64_t r = 0; r < a.rows; ++r)
    row(a.S + r * a.ldS, a.dP + r * a.ldS, a.G ? a.G + r * a.ldS : nullptr, a.ri[r].delta, a.n,
        a.dSl ? reinterpret_cast<uint16_t*>(a.dSl + r * a.ldP) : nullptr);
}
#endif  // TK_X86

}  // namespace
}  // namespace truthgpt
