// The AVX-512 vector type (16 float lanes) of cpu/vec_utils.h. No include guard: included
// twice there, inside namespaces avx512 and avx512bf16 under their target pragmas, with
// TRUTHGPT_NATIVE_BF16 0 (float -> bf16 by integer rounding, bit-identical to
// c10::BFloat16) or 1 (AVX512-BF16's VCVTNEPS2BF16: also round-to-nearest-even, but fp32
// denormals flush to zero and a NaN keeps its sign and payload).

struct FloatVec {
  static constexpr int W = 16;
  __m512 v;

  static __mmask16 lane_mask(int64_t m) {
    return m >= W ? static_cast<__mmask16>(0xffff) : static_cast<__mmask16>((1u << m) - 1u);
  }
  static __m512 widen(__m256i h) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  }
  static __m256i narrow(__m512 x) {
#if TRUTHGPT_NATIVE_BF16
    return reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(x));
#else
    const __m512i u = _mm512_castps_si512(x);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_srli_epi32(
        _mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff))), 16);
    r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q), _mm512_set1_epi32(0x7fc0));
    return _mm512_cvtepi32_epi16(r);
#endif
  }

  static FloatVec set1(float x) { return {_mm512_set1_ps(x)}; }
  static FloatVec zero() { return {_mm512_setzero_ps()}; }

  static FloatVec load(const float* p, int64_t m) {
    return {m >= W ? _mm512_loadu_ps(p) : _mm512_maskz_loadu_ps(lane_mask(m), p)};
  }
  static FloatVec load(const bf16* p, int64_t m) {
    return {widen(m >= W ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))
                         : _mm256_maskz_loadu_epi16(lane_mask(m), p))};
  }
  static FloatVec load(const f16* p, int64_t m) {
    return {_mm512_cvtph_ps(m >= W ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))
                                   : _mm256_maskz_loadu_epi16(lane_mask(m), p))};
  }
  static FloatVec load_dup(const float* p, int64_t m) {
    const __m256 h = m >= W ? _mm256_loadu_ps(p) : _mm256_maskz_loadu_ps(lane_mask(m / 2), p);
    const __m512i idx = _mm512_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7);
    return {_mm512_permutexvar_ps(idx, _mm512_castps256_ps512(h))};
  }
  static FloatVec load_dup(const bf16* p, int64_t m) {
    const __m128i h = m >= W ? _mm_loadu_si128(reinterpret_cast<const __m128i*>(p))
                             : _mm_maskz_loadu_epi16(lane_mask(m / 2), p);
    const __m256 f = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
    const __m512i idx = _mm512_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7);
    return {_mm512_permutexvar_ps(idx, _mm512_castps256_ps512(f))};
  }
  static FloatVec load_dup(const f16* p, int64_t m) {
    const __m128i h = m >= W ? _mm_loadu_si128(reinterpret_cast<const __m128i*>(p))
                             : _mm_maskz_loadu_epi16(lane_mask(m / 2), p);
    const __m256 f = _mm256_cvtph_ps(h);
    const __m512i idx = _mm512_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7);
    return {_mm512_permutexvar_ps(idx, _mm512_castps256_ps512(f))};
  }
  void store(float* p, int64_t m) const {
    if (m >= W) {
      _mm512_storeu_ps(p, v);
    } else {
      _mm512_mask_storeu_ps(p, lane_mask(m), v);
    }
  }
  void store(bf16* p, int64_t m) const {
    const __m256i h = narrow(v);
    if (m >= W) {
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), h);
    } else {
      _mm256_mask_storeu_epi16(p, lane_mask(m), h);
    }
  }
  void store(f16* p, int64_t m) const {  // F16C rounding, as the avx2 path
    const __m256i h = _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    if (m >= W) {
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), h);
    } else {
      _mm256_mask_storeu_epi16(p, lane_mask(m), h);
    }
  }

  FloatVec operator-() const {
    return {_mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(v), _mm512_set1_epi32(INT32_MIN)))};
  }
  static FloatVec fma(FloatVec a, FloatVec b, FloatVec c) { return {_mm512_fmadd_ps(a.v, b.v, c.v)}; }
  static FloatVec fmaddsub(FloatVec a, FloatVec b, FloatVec c) {
    return {_mm512_fmaddsub_ps(a.v, b.v, c.v)};
  }
  static FloatVec swap_pairs(FloatVec a) { return {_mm512_permute_ps(a.v, 0xB1)}; }
  float hsum() const { return _mm512_reduce_add_ps(v); }
  static FloatVec exp(FloatVec a) {
    // (vmaxps / vminps return their second operand when either is NaN: a NaN input stays NaN)
    const __m512 x = _mm512_min_ps(_mm512_set1_ps(kExpHi), _mm512_max_ps(_mm512_set1_ps(kExpLo), a.v));
    const __m512 magic = _mm512_set1_ps(kRoundMagic);
    const __m512 n = _mm512_sub_ps(_mm512_fmadd_ps(x, _mm512_set1_ps(kLog2e), magic), magic);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(kLn2Hi), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(kLn2Lo), r);
    __m512 p = _mm512_set1_ps(kExpC[kExpDeg]);
    for (int k = kExpDeg - 1; k >= 0; --k) p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kExpC[k]));
    return {_mm512_scalef_ps(p, n)};
  }
  // 1 / (1 + exp(-a)): the 14-bit reciprocal estimate and one Newton step (relative error
  // ~2^-28, far cheaper than a 512-bit division); 1 + exp(-a) <= 2.4e38 stays finite.
  static FloatVec sigmoid(FloatVec a) {
    const __m512 d = _mm512_add_ps(_mm512_set1_ps(1.0f), exp(-a).v);
    const __m512 r = _mm512_rcp14_ps(d);
    return {_mm512_mul_ps(r, _mm512_fnmadd_ps(d, r, _mm512_set1_ps(2.0f)))};
  }
};

// (operators are free functions: GCC does not apply the target pragma to hidden friends)
inline FloatVec operator+(FloatVec a, FloatVec b) { return {_mm512_add_ps(a.v, b.v)}; }
inline FloatVec operator-(FloatVec a, FloatVec b) { return {_mm512_sub_ps(a.v, b.v)}; }
inline FloatVec operator*(FloatVec a, FloatVec b) { return {_mm512_mul_ps(a.v, b.v)}; }
inline FloatVec operator/(FloatVec a, FloatVec b) { return {_mm512_div_ps(a.v, b.v)}; }
inline FloatVec vmax(FloatVec a, FloatVec b) { return {_mm512_max_ps(a.v, b.v)}; }

template <class T>
using VecFor = std::conditional_t<std::is_same_v<T, double>, DoubleVec, FloatVec>;
