// SIMD helpers shared by the CPU kernels (swiglu.cpp, rms_norm.cpp, rotary.cpp).
//
// The kernels are written once against a small vector interface and compiled once per
// instruction set, then picked at run time (the default build has no -march flags and runs
// on any x86-64; an AVX-512 path is used only where the CPU has it):
//
//   portable    plain C++: 4 float lanes in GCC generic vectors (SSE2 on x86-64, NEON on
//               ARM), or 8 in arrays (ArrayVec) with other compilers
//   avx2        AVX2 + FMA, 8 float lanes              (x86-64 with GCC or Clang only)
//   avx512      AVX-512 F/BW/VL/DQ + FMA, 16 lanes     (x86-64 with GCC or Clang only)
//   avx512bf16  avx512 + AVX512-BF16's float -> bf16 conversion (one instruction instead of
//               nine; see vec_avx512.h for how it differs on denormals and NaN payloads)
//
// How: a kernel file includes foreach_isa.h, which includes the file's kernel section once
// per set, inside namespaces truthgpt::cpu::{portable,avx2,avx512,avx512bf16} and between
// the target pragmas below. In each namespace `VecFor<T>` names that instruction set's
// vector type for element type T, so the same source compiles to each. The kernel sections
// include no headers and touch no ATen code: their functions work on raw pointers and a
// range of tasks, and the host code (ordinary target) picks one with TRUTHGPT_ISA_FN and
// runs it under at::parallel_for. Nothing compiled for a wider set runs unless the CPU
// (checked with __builtin_cpu_supports) has it.
//
// Element types: float, double, bf16 (the bit layout of c10::BFloat16), f16 (c10::Half). Math
// runs in float for float/bf16/f16 and in double for double (ArrayVec<double, 4> in every instruction set:
// fp64 exists for gradcheck, not speed). float -> bf16 rounds to nearest even, NaN stays a
// (quiet) NaN; bit-identical to c10::BFloat16 except under avx512bf16 (see above). f16 <->
// float: exact widening, narrowing to nearest even (F16C instructions in avx2/avx512, integer
// code in portable); bit-identical to c10::Half except for the payload of non-canonical NaNs.
//
// Every load/store takes a lane count m: m >= W means a full vector, 0 < m < W the first m
// lanes (masked, the rest read as 0 and not written). Kernels loop `for (i = 0; i < n; i +=
// W) { m = n - i; ... }`: one code path for the body and the tail.
//
// TRUTHGPT_CPU_ISA=portable|avx2|avx512|avx512bf16 (environment, read at each kernel call)
// caps the instruction set, so tests can run every path on one machine.
#pragma once

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>
#include <type_traits>

#if (defined(__GNUC__) || defined(__clang__)) && defined(__x86_64__)
#define TRUTHGPT_X86 1
#include <immintrin.h>
#else
#define TRUTHGPT_X86 0
#endif

#if defined(__clang__)
#define TRUTHGPT_BEGIN_AVX2 \
  _Pragma("clang attribute push(__attribute__((target(\"avx2,fma,f16c\"))), apply_to = function)")
#define TRUTHGPT_BEGIN_AVX512                                                               \
  _Pragma("clang attribute push(__attribute__((target(\"avx512f,avx512bw,avx512vl,avx512dq," \
          "avx2,fma,f16c\"))), apply_to = function)")
#define TRUTHGPT_BEGIN_AVX512BF16                                                          \
  _Pragma("clang attribute push(__attribute__((target(\"avx512f,avx512bw,avx512vl,avx512dq," \
          "avx512bf16,avx2,fma,f16c\"))), apply_to = function)")
#define TRUTHGPT_END_TARGET _Pragma("clang attribute pop")
#else
// (GCC 12 reports false -Wmaybe-uninitialized in its own AVX-512 headers, GCC bug 105593)
#define TRUTHGPT_BEGIN_AVX2                                   \
  _Pragma("GCC push_options") _Pragma("GCC diagnostic push") \
  _Pragma("GCC target(\"avx2,fma,f16c\")")
#define TRUTHGPT_BEGIN_AVX512                                                     \
  _Pragma("GCC push_options") _Pragma("GCC diagnostic push")                     \
  _Pragma("GCC diagnostic ignored \"-Wmaybe-uninitialized\"")                    \
  _Pragma("GCC target(\"avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c\")")
#define TRUTHGPT_BEGIN_AVX512BF16                                                 \
  _Pragma("GCC push_options") _Pragma("GCC diagnostic push")                     \
  _Pragma("GCC diagnostic ignored \"-Wmaybe-uninitialized\"")                    \
  _Pragma("GCC target(\"avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx2,fma,f16c\")")
#define TRUTHGPT_END_TARGET _Pragma("GCC diagnostic pop") _Pragma("GCC pop_options")
#endif

namespace truthgpt {
namespace cpu {

// ------------------------------------------------------------------ instruction set choice
enum class Isa { portable = 0, avx2 = 1, avx512 = 2, avx512bf16 = 3 };

inline Isa hardware_isa() {
#if TRUTHGPT_X86
  static const Isa isa = [] {
    __builtin_cpu_init();
    // __builtin_cpu_supports also checks that the OS saves the vector state (XGETBV).
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
        __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c"))
      return __builtin_cpu_supports("avx512bf16") ? Isa::avx512bf16 : Isa::avx512;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
        __builtin_cpu_supports("f16c"))
      return Isa::avx2;
    return Isa::portable;
  }();
  return isa;
#else
  return Isa::portable;
#endif
}

// The instruction set the kernels use now: the hardware's, capped by TRUTHGPT_CPU_ISA.
inline Isa active_isa() {
  const Isa hw = hardware_isa();
  const char* env = std::getenv("TRUTHGPT_CPU_ISA");
  if (env == nullptr || *env == '\0') return hw;
  const std::string want(env);
  Isa cap;
  if (want == "portable") {
    cap = Isa::portable;
  } else if (want == "avx2") {
    cap = Isa::avx2;
  } else if (want == "avx512") {
    cap = Isa::avx512;
  } else if (want == "avx512bf16") {
    cap = Isa::avx512bf16;
  } else {
    throw std::invalid_argument(
        "TRUTHGPT_CPU_ISA must be portable, avx2, avx512 or avx512bf16, got '" + want + "'");
  }
  return static_cast<int>(cap) < static_cast<int>(hw) ? cap : hw;
}

inline const char* isa_name(Isa isa) {
  return isa == Isa::avx512bf16 ? "avx512bf16"
         : isa == Isa::avx512   ? "avx512"
         : isa == Isa::avx2     ? "avx2"
                                : "portable";
}

// ------------------------------------------------------------------ scalar conversions
struct bf16 {
  uint16_t bits;
};
static_assert(sizeof(bf16) == 2, "bf16 must be 2 bytes like c10::BFloat16");

inline float bf16_to_float(bf16 h) {
  return std::bit_cast<float>(static_cast<uint32_t>(h.bits) << 16);
}

inline bf16 float_to_bf16(float f) {
  const uint32_t u = std::bit_cast<uint32_t>(f);
  const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  return bf16{static_cast<uint16_t>(f != f ? 0x7fc0u : rounded)};
}

// IEEE binary16 (the bit layout of c10::Half).
struct f16 {
  uint16_t bits;
};
static_assert(sizeof(f16) == 2, "f16 must be 2 bytes like c10::Half");

// Exact: every half is a float.
inline float f16_to_float(f16 h) {
  const uint32_t sign = static_cast<uint32_t>(h.bits & 0x8000u) << 16;
  const uint32_t e = (h.bits >> 10) & 0x1fu, man = h.bits & 0x3ffu;
  if (e == 0x1f) return std::bit_cast<float>(sign | 0x7f800000u | (man << 13));  // inf, NaN
  if (e == 0) {  // zero or subnormal: man * 2^-24 (a normal float)
    const float f = static_cast<float>(man) * 5.9604644775390625e-8f;
    return sign ? -f : f;
  }
  return std::bit_cast<float>(sign | ((e + 112) << 23) | (man << 13));
}

// Round to nearest even, by integer arithmetic (independent of the FPU's modes); overflow
// to inf, half subnormals exact, NaN -> quiet NaN 0x7e00 with the sign, as c10::Half.
inline f16 float_to_f16(float f) {
  const uint32_t u = std::bit_cast<uint32_t>(f);
  const uint32_t sign = (u >> 16) & 0x8000u, a = u & 0x7fffffffu;
  uint32_t h;
  if (a > 0x7f800000u) {
    h = 0x7e00u;                              // NaN
  } else if (a >= 0x477ff000u) {
    h = 0x7c00u;                              // >= 65520 (and inf): inf
  } else if (a >= 0x38800000u) {              // normal half: drop 13 mantissa bits
    h = ((a + 0xfffu + ((a >> 13) & 1u)) >> 13) - (112u << 10);
  } else {                                    // subnormal half: round(|f| * 2^24)
    const int shift = 126 - static_cast<int>(a >> 23);  // >= 14
    const uint32_t m = (a & 0x7fffffu) | 0x800000u;
    if (shift > 24) {
      h = 0;                                  // below 2^-25: rounds to 0
    } else {
      const uint32_t q = m >> shift, rem = m & ((1u << shift) - 1u), half = 1u << (shift - 1);
      h = q + ((rem > half || (rem == half && (q & 1u))) ? 1u : 0u);
    }
  }
  return f16{static_cast<uint16_t>(sign | h)};
}

template <class To>
inline To to_acc(float x) { return static_cast<To>(x); }
template <class To>
inline To to_acc(double x) { return static_cast<To>(x); }
template <class To>
inline To to_acc(bf16 x) { return static_cast<To>(bf16_to_float(x)); }
template <class To>
inline To to_acc(f16 x) { return static_cast<To>(f16_to_float(x)); }

template <class To, class From>
inline To from_acc(From x) {
  if constexpr (std::is_same_v<To, bf16>) {
    return float_to_bf16(static_cast<float>(x));
  } else if constexpr (std::is_same_v<To, f16>) {
    return float_to_f16(static_cast<float>(x));
  } else {
    return static_cast<To>(x);
  }
}

// A hint to bring the cache line of p into cache (no fault if p is not readable).
inline void prefetch(const void* p) {
#if defined(__GNUC__) || defined(__clang__)
  __builtin_prefetch(p, 0, 3);
#else
  (void)p;
#endif
}

// Math type of an element type: double for double, float otherwise.
template <class T>
using acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

// exp(x) for float, shared by every instruction set: x = n ln2 + r with |r| <= ln2 / 2 (n
// rounded to nearest by adding and removing 1.5 * 2^23), e^r by a degree-6 polynomial, times
// 2^n. The coefficients minimise the relative error of e^r on [-ln2/2, ln2/2] (a Remez fit,
// 4e-9); with float rounding the result is within 2 ulp on [-87.3, 88.3]. Outside that
// range the input saturates (no inf or denormal results, and no NaN from +-inf).
constexpr float kExpLo = -87.33f, kExpHi = 88.37f;
constexpr float kLog2e = 1.44269504088896341f;
constexpr float kLn2Hi = 0.693359375f, kLn2Lo = -2.12194440e-4f;
constexpr float kRoundMagic = 12582912.0f;  // 1.5 * 2^23
constexpr int kExpDeg = 6;
constexpr float kExpC[kExpDeg + 1] = {1.0f,         1.0000001192092896f,  0.5f,
                                      0.166663259f, 0.0416662395000458f, 0.00838110968470573f,
                                      0.00139485811814666f};

inline float exp_poly(float x) {
  // branch-free, so that loops over lanes vectorise (a NaN stays NaN)
  x = x < kExpLo ? kExpLo : x;
  x = x > kExpHi ? kExpHi : x;
  const float n = (x * kLog2e + kRoundMagic) - kRoundMagic;
  float r = x - n * kLn2Hi;
  r = r - n * kLn2Lo;
  float p = kExpC[kExpDeg];
  for (int k = kExpDeg - 1; k >= 0; --k) p = p * r + kExpC[k];
  return p * std::bit_cast<float>((static_cast<int32_t>(n) + 127) << 23);
}

// ------------------------------------------------------------------ portable vectors
// N lanes of S in an array; every operation is a plain loop the compiler may vectorise.
template <class S, int N>
struct ArrayVec {
  static constexpr int W = N;
  S v[N];

  static ArrayVec set1(S x) {
    ArrayVec r;
    for (int i = 0; i < N; ++i) r.v[i] = x;
    return r;
  }
  static ArrayVec zero() { return set1(S(0)); }

  template <class P>
  static ArrayVec load(const P* p, int64_t m) {
    ArrayVec r;
    if (m >= N) {
      for (int i = 0; i < N; ++i) r.v[i] = to_acc<S>(p[i]);
    } else {
      for (int i = 0; i < N; ++i) r.v[i] = i < m ? to_acc<S>(p[i]) : S(0);
    }
    return r;
  }
  // Lanes 2i and 2i+1 both get p[i]: m output lanes (even), reading m / 2 elements.
  template <class P>
  static ArrayVec load_dup(const P* p, int64_t m) {
    ArrayVec r;
    for (int i = 0; i < N; ++i) r.v[i] = i < m ? to_acc<S>(p[i / 2]) : S(0);
    return r;
  }
  template <class P>
  void store(P* p, int64_t m) const {
    const int n = m >= N ? N : static_cast<int>(m);
    for (int i = 0; i < n; ++i) p[i] = from_acc<P>(v[i]);
  }

  friend ArrayVec operator+(ArrayVec a, ArrayVec b) {
    for (int i = 0; i < N; ++i) a.v[i] += b.v[i];
    return a;
  }
  friend ArrayVec operator-(ArrayVec a, ArrayVec b) {
    for (int i = 0; i < N; ++i) a.v[i] -= b.v[i];
    return a;
  }
  friend ArrayVec operator*(ArrayVec a, ArrayVec b) {
    for (int i = 0; i < N; ++i) a.v[i] *= b.v[i];
    return a;
  }
  friend ArrayVec operator/(ArrayVec a, ArrayVec b) {
    for (int i = 0; i < N; ++i) a.v[i] /= b.v[i];
    return a;
  }
  ArrayVec operator-() const {
    ArrayVec r;
    for (int i = 0; i < N; ++i) r.v[i] = -v[i];
    return r;
  }
  // a * b + c (not fused here: std::fma is a slow library call without FMA hardware)
  static ArrayVec fma(ArrayVec a, ArrayVec b, ArrayVec c) { return a * b + c; }
  // a * b - c on even lanes, a * b + c on odd lanes
  static ArrayVec fmaddsub(ArrayVec a, ArrayVec b, ArrayVec c) {
    ArrayVec r;
    for (int i = 0; i < N; ++i) r.v[i] = a.v[i] * b.v[i] + ((i & 1) ? c.v[i] : -c.v[i]);
    return r;
  }
  // lanes (0 1)(2 3)... swapped
  static ArrayVec swap_pairs(ArrayVec a) {
    ArrayVec r;
    for (int i = 0; i < N; ++i) r.v[i] = a.v[i ^ 1];
    return r;
  }
  S hsum() const {
    S s = S(0);
    for (int i = 0; i < N; ++i) s += v[i];
    return s;
  }
  static ArrayVec exp(ArrayVec a) {
    for (int i = 0; i < N; ++i) {
      if constexpr (std::is_same_v<S, float>) {
        a.v[i] = exp_poly(a.v[i]);
      } else {
        a.v[i] = std::exp(a.v[i]);
      }
    }
    return a;
  }
  // 1 / (1 + exp(-a))
  static ArrayVec sigmoid(ArrayVec a) {
    const ArrayVec one = set1(S(1));
    return one / (one + exp(-a));
  }
};

// Lane-wise max as `a > b ? a : b` (a NaN in a loses to b), in every vector type below.
template <class S, int N>
inline ArrayVec<S, N> vmax(ArrayVec<S, N> a, ArrayVec<S, N> b) {
  for (int i = 0; i < N; ++i) a.v[i] = a.v[i] > b.v[i] ? a.v[i] : b.v[i];
  return a;
}

using DoubleVec = ArrayVec<double, 4>;

namespace portable {
namespace {

#if defined(__GNUC__) && !defined(__clang__)
// 4 float lanes in GCC's generic vectors: one SSE2 register on any x86-64, one NEON
// register on ARM (the compiler does not vectorise ArrayVec's per-lane loops by itself).
// Full vectors move with fixed-size memcpy (plain loads/stores), tails with a short one.
struct FloatVec {
  static constexpr int W = 4;
  typedef float f8 __attribute__((vector_size(16)));
  typedef int32_t i8 __attribute__((vector_size(16)));
  typedef uint32_t u8 __attribute__((vector_size(16)));
  typedef uint16_t h8 __attribute__((vector_size(8)));
  f8 v;

  template <class Dst, class Src>
  static void copy(Dst* dst, const Src* src, size_t full_bytes, size_t bytes) {
    if (bytes >= full_bytes) {
      std::memcpy(dst, src, full_bytes);
    } else {
      std::memcpy(dst, src, bytes);
    }
  }

  static FloatVec set1(float x) { return {f8{} + x}; }
  static FloatVec zero() { return {f8{}}; }

  static FloatVec load(const float* p, int64_t m) {
    FloatVec r{f8{}};
    copy(&r.v, p, sizeof(f8), sizeof(float) * static_cast<size_t>(m));
    return r;
  }
  static FloatVec load(const bf16* p, int64_t m) {
    h8 h{};
    copy(&h, p, sizeof(h8), 2 * static_cast<size_t>(m));
    return {reinterpret_cast<f8>(__builtin_convertvector(h, u8) << 16)};
  }
  static FloatVec load(const f16* p, int64_t m) {  // (no F16C here: lane by lane)
    FloatVec r{f8{}};
    for (int i = 0; i < W; ++i) r.v[i] = i < m ? f16_to_float(p[i]) : 0.0f;
    return r;
  }
  template <class P>
  static FloatVec load_dup(const P* p, int64_t m) {
    FloatVec r{f8{}};
    for (int i = 0; i < W; ++i) r.v[i] = i < m ? to_acc<float>(p[i / 2]) : 0.0f;
    return r;
  }
  void store(float* p, int64_t m) const { copy(p, &v, sizeof(f8), sizeof(float) * static_cast<size_t>(m)); }
  void store(bf16* p, int64_t m) const {
    const u8 u = reinterpret_cast<u8>(v);
    u8 r = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    r = v != v ? u8{} + 0x7fc0u : r;  // NaN -> quiet NaN, as c10::BFloat16
    const h8 h = __builtin_convertvector(r, h8);
    copy(p, &h, sizeof(h8), 2 * static_cast<size_t>(m));
  }
  void store(f16* p, int64_t m) const {
    const int n = m >= W ? W : static_cast<int>(m);
    for (int i = 0; i < n; ++i) p[i] = float_to_f16(v[i]);
  }

  static FloatVec fma(FloatVec a, FloatVec b, FloatVec c) { return {a.v * b.v + c.v}; }
  static FloatVec fmaddsub(FloatVec a, FloatVec b, FloatVec c) {
    const f8 sign = {-1.0f, 1.0f, -1.0f, 1.0f};
    return {a.v * b.v + c.v * sign};
  }
  static FloatVec swap_pairs(FloatVec a) {
    return {__builtin_shuffle(a.v, i8{1, 0, 3, 2})};
  }
  float hsum() const {
    float s = 0.0f;
    for (int i = 0; i < W; ++i) s += v[i];
    return s;
  }
  static FloatVec exp(FloatVec a) {  // exp_poly, lane-parallel
    f8 x = a.v < kExpLo ? f8{} + kExpLo : a.v;
    x = x > kExpHi ? f8{} + kExpHi : x;
    const f8 n = (x * kLog2e + kRoundMagic) - kRoundMagic;
    const f8 r = (x - n * kLn2Hi) - n * kLn2Lo;
    f8 p = f8{} + kExpC[kExpDeg];
    for (int k = kExpDeg - 1; k >= 0; --k) p = p * r + kExpC[k];
    const i8 bits = (__builtin_convertvector(n, i8) + 127) << 23;
    return {p * reinterpret_cast<f8>(bits)};
  }
  static FloatVec sigmoid(FloatVec a) { return {1.0f / (1.0f + exp(FloatVec{-a.v}).v)}; }
  FloatVec operator-() const { return {-v}; }
};
inline FloatVec operator+(FloatVec a, FloatVec b) { return {a.v + b.v}; }
inline FloatVec operator-(FloatVec a, FloatVec b) { return {a.v - b.v}; }
inline FloatVec operator*(FloatVec a, FloatVec b) { return {a.v * b.v}; }
inline FloatVec operator/(FloatVec a, FloatVec b) { return {a.v / b.v}; }
inline FloatVec vmax(FloatVec a, FloatVec b) { return {a.v > b.v ? a.v : b.v}; }
#else
using FloatVec = ArrayVec<float, 8>;
#endif

template <class T>
using VecFor = std::conditional_t<std::is_same_v<T, double>, DoubleVec, FloatVec>;
}  // namespace
}  // namespace portable

#if TRUTHGPT_X86
// ------------------------------------------------------------------ AVX2: 8 float lanes
TRUTHGPT_BEGIN_AVX2
namespace avx2 {
namespace {

struct FloatVec {
  static constexpr int W = 8;
  __m256 v;

  static __m256i lane_mask(int64_t m) {
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(m)),
                              _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  }
  static __m256 widen(__m128i h) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  }
  static __m128i narrow(__m256 x) {
    const __m256i u = _mm256_castps_si256(x);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    __m256i r = _mm256_srli_epi32(
        _mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff))), 16);
    const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(x, x, _CMP_UNORD_Q));
    r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7fc0), nan);
    r = _mm256_packus_epi32(r, r);  // per 128-bit half: [r0..r3 r0..r3 | r4..r7 r4..r7]
    return _mm256_castsi256_si128(_mm256_permute4x64_epi64(r, 0x08));
  }

  static FloatVec set1(float x) { return {_mm256_set1_ps(x)}; }
  static FloatVec zero() { return {_mm256_setzero_ps()}; }

  static FloatVec load(const float* p, int64_t m) {
    return {m >= W ? _mm256_loadu_ps(p) : _mm256_maskload_ps(p, lane_mask(m))};
  }
  static FloatVec load(const bf16* p, int64_t m) {
    if (m >= W) return {widen(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)))};
    alignas(16) uint16_t buf[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    std::memcpy(buf, p, static_cast<size_t>(m) * 2);
    return {widen(_mm_load_si128(reinterpret_cast<const __m128i*>(buf)))};
  }
  // F16C: exact widening; narrowing rounds to nearest even (NaN stays a quiet NaN, keeping
  // its sign and the top of its payload: the same NaN as float_to_f16 for canonical NaNs)
  static FloatVec load(const f16* p, int64_t m) {
    if (m >= W) return {_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)))};
    alignas(16) uint16_t buf[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    std::memcpy(buf, p, static_cast<size_t>(m) * 2);
    return {_mm256_cvtph_ps(_mm_load_si128(reinterpret_cast<const __m128i*>(buf)))};
  }
  static FloatVec load_dup(const float* p, int64_t m) {
    const __m128 h = m >= W ? _mm_loadu_ps(p)
                            : _mm_maskload_ps(p, _mm256_castsi256_si128(lane_mask(m / 2)));
    return {_mm256_permutevar8x32_ps(_mm256_castps128_ps256(h),
                                     _mm256_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3))};
  }
  static FloatVec load_dup(const bf16* p, int64_t m) {
    alignas(16) uint16_t buf[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    std::memcpy(buf, p, static_cast<size_t>(std::min<int64_t>(m, W) / 2) * 2);
    const __m128i h = _mm_load_si128(reinterpret_cast<const __m128i*>(buf));
    const __m128 f = _mm_castsi128_ps(_mm_slli_epi32(_mm_cvtepu16_epi32(h), 16));
    return {_mm256_permutevar8x32_ps(_mm256_castps128_ps256(f),
                                     _mm256_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3))};
  }
  static FloatVec load_dup(const f16* p, int64_t m) {
    alignas(16) uint16_t buf[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    std::memcpy(buf, p, static_cast<size_t>(std::min<int64_t>(m, W) / 2) * 2);
    const __m128 f = _mm_cvtph_ps(_mm_load_si128(reinterpret_cast<const __m128i*>(buf)));
    return {_mm256_permutevar8x32_ps(_mm256_castps128_ps256(f),
                                     _mm256_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3))};
  }
  void store(float* p, int64_t m) const {
    if (m >= W) {
      _mm256_storeu_ps(p, v);
    } else {
      _mm256_maskstore_ps(p, lane_mask(m), v);
    }
  }
  // 8 16-bit elements (bf16 or f16) from h: m of them
  static void store16(void* p, int64_t m, __m128i h) {
    if (m >= W) {
      _mm_storeu_si128(reinterpret_cast<__m128i*>(p), h);
    } else {
      alignas(16) uint16_t buf[8];
      _mm_store_si128(reinterpret_cast<__m128i*>(buf), h);
      std::memcpy(p, buf, static_cast<size_t>(m) * 2);
    }
  }
  void store(bf16* p, int64_t m) const { store16(p, m, narrow(v)); }
  void store(f16* p, int64_t m) const {
    store16(p, m, _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }

  FloatVec operator-() const { return {_mm256_xor_ps(v, _mm256_set1_ps(-0.0f))}; }
  static FloatVec fma(FloatVec a, FloatVec b, FloatVec c) { return {_mm256_fmadd_ps(a.v, b.v, c.v)}; }
  static FloatVec fmaddsub(FloatVec a, FloatVec b, FloatVec c) {
    return {_mm256_fmaddsub_ps(a.v, b.v, c.v)};
  }
  static FloatVec swap_pairs(FloatVec a) { return {_mm256_permute_ps(a.v, 0xB1)}; }
  float hsum() const {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
  static FloatVec exp(FloatVec a) {
    // (vmaxps / vminps return their second operand when either is NaN: a NaN input stays NaN)
    const __m256 x = _mm256_min_ps(_mm256_set1_ps(kExpHi), _mm256_max_ps(_mm256_set1_ps(kExpLo), a.v));
    const __m256 magic = _mm256_set1_ps(kRoundMagic);
    const __m256 n = _mm256_sub_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(kLog2e), magic), magic);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(kLn2Hi), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(kLn2Lo), r);
    __m256 p = _mm256_set1_ps(kExpC[kExpDeg]);
    for (int k = kExpDeg - 1; k >= 0; --k) p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kExpC[k]));
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return {_mm256_mul_ps(p, _mm256_castsi256_ps(e))};

  }
  static FloatVec sigmoid(FloatVec a) {
    const __m256 one = _mm256_set1_ps(1.0f);
    return {_mm256_div_ps(one, _mm256_add_ps(one, exp(-a).v))};
  }
};

// (operators are free functions: GCC does not apply the target pragma to hidden friends)
inline FloatVec operator+(FloatVec a, FloatVec b) { return {_mm256_add_ps(a.v, b.v)}; }
inline FloatVec operator-(FloatVec a, FloatVec b) { return {_mm256_sub_ps(a.v, b.v)}; }
inline FloatVec operator*(FloatVec a, FloatVec b) { return {_mm256_mul_ps(a.v, b.v)}; }
inline FloatVec operator/(FloatVec a, FloatVec b) { return {_mm256_div_ps(a.v, b.v)}; }
inline FloatVec vmax(FloatVec a, FloatVec b) { return {_mm256_max_ps(a.v, b.v)}; }

template <class T>
using VecFor = std::conditional_t<std::is_same_v<T, double>, DoubleVec, FloatVec>;

}  // namespace
}  // namespace avx2
TRUTHGPT_END_TARGET

// ------------------------------------------------------------------ AVX-512: 16 float lanes
TRUTHGPT_BEGIN_AVX512
namespace avx512 {
namespace {
#define TRUTHGPT_NATIVE_BF16 0
#include "cpu/vec_avx512.h"
#undef TRUTHGPT_NATIVE_BF16
}  // namespace
}  // namespace avx512
TRUTHGPT_END_TARGET

// ---------------------------------------- AVX-512 with the AVX512-BF16 conversions
TRUTHGPT_BEGIN_AVX512BF16
namespace avx512bf16 {
namespace {
#define TRUTHGPT_NATIVE_BF16 1
#include "cpu/vec_avx512.h"
#undef TRUTHGPT_NATIVE_BF16
}  // namespace
}  // namespace avx512bf16
TRUTHGPT_END_TARGET
#endif  // TRUTHGPT_X86

// Picks fn from the per-ISA namespaces: TRUTHGPT_ISA_FN(isa, my_kernel<float, bf16>) is the
// address of truthgpt::cpu::<isa>::my_kernel<float, bf16>.
#if TRUTHGPT_X86
#define TRUTHGPT_ISA_FN(isa, ...)                                                        \
  ((isa) == ::truthgpt::cpu::Isa::avx512bf16 ? &::truthgpt::cpu::avx512bf16::__VA_ARGS__ \
   : (isa) == ::truthgpt::cpu::Isa::avx512   ? &::truthgpt::cpu::avx512::__VA_ARGS__     \
   : (isa) == ::truthgpt::cpu::Isa::avx2     ? &::truthgpt::cpu::avx2::__VA_ARGS__       \
                                             : &::truthgpt::cpu::portable::__VA_ARGS__)
#else
#define TRUTHGPT_ISA_FN(isa, ...) (&::truthgpt::cpu::portable::__VA_ARGS__)
#endif

}  // namespace cpu
}  // namespace truthgpt
