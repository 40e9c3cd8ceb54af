// CPU attention, part 1 of 4: the tile GEMMs and their runtime dispatch. MKL's sgemm /
// dgemm / gemm_bf16bf16f32 resolved from the libtorch_cpu already loaded, else AVX-512 (fp32)
// and AVX512-BF16 (VNNI pairs) micro-kernels, else a portable loop; `Gemm<T>` picks one per
// call from the `Isa` chosen at run time (`choose_isa`). Included by attention.cpp only.
#pragma once
#include "cpu/attention_common.h"
#include "cpu/gemm_engine.h"
#include "cpu/transpose_avx512.h"

namespace truthgpt {
namespace {  // internal to the CPU attention kernel (one translation unit: attention.cpp)

// ============================================================================ dispatch
struct MklFns {
  using sgemm_t = void (*)(const char*, const char*, const int*, const int*, const int*,
                           const float*, const float*, const int*, const float*, const int*,
                           const float*, float*, const int*);
  using dgemm_t = void (*)(const char*, const char*, const int*, const int*, const int*,
                           const double*, const double*, const int*, const double*, const int*,
                           const double*, double*, const int*);
  using bgemm_t = void (*)(int, int, int, int, int, int, float, const uint16_t*, int,
                           const uint16_t*, int, float, float*, int);
  using threads_t = int (*)(const int*);  // Fortran-style symbol: argument by reference
  sgemm_t sgemm = nullptr;
  dgemm_t dgemm = nullptr;
  bgemm_t bgemm = nullptr;
  threads_t set_local_threads = nullptr;

  MklFns() {
#if !defined(_WIN32)
    // torch's own MKL first (another BLAS may export the same Fortran names globally)
    void* self = dlopen("libtorch_cpu.so", RTLD_LAZY | RTLD_NOLOAD);
    auto find = [&](const char* name) -> void* {
      void* p = self ? dlsym(self, name) : nullptr;
      return p ? p : dlsym(RTLD_DEFAULT, name);
    };
    sgemm = reinterpret_cast<sgemm_t>(find("sgemm_"));
    dgemm = reinterpret_cast<dgemm_t>(find("dgemm_"));
    bgemm = reinterpret_cast<bgemm_t>(find("cblas_gemm_bf16bf16f32"));
    set_local_threads = reinterpret_cast<threads_t>(find("mkl_set_num_threads_local_"));
#endif
  }
};

const MklFns& mkl() {
  static const MklFns fns;
  return fns;
}

bool cpu_has_avx512() {
#if TK_X86
  static const bool ok = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
                         __builtin_cpu_supports("fma");
  return ok;
#else
  return false;
#endif
}

bool cpu_has_avx512bf16() {
#if TK_X86
  static const bool ok = cpu_has_avx512() && __builtin_cpu_supports("avx512bf16");
  return ok;
#else
  return false;
#endif
}

bool cpu_has_avx2() {
#if TK_X86
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return ok;
#else
  return false;
#endif
}

enum class GemmImpl { Mkl, Avx512, Portable };
enum class RowsImpl { Portable, Avx2, Avx512 };  // score transform / softmax loops

struct Isa {
  GemmImpl gemm;
  RowsImpl rows;
};

// TRUTHGPT_CPU_ATTN: auto (default) | mkl | avx512 | avx2 | portable | noavx512 | noavx2.
//   auto: our AVX-512 GEMMs on non-Intel CPUs with AVX-512 (MKL runs generic code there: ours
//         are 2x MKL's on an AMD Zen 5, 3x for bfloat16; 1.5-2.2x on a Zen 4) and on Intel CPUs
//         where MKL's sgemm measured slow against oneDNN's (gemm_engine.h); else MKL GEMMs if
//         present. Rows: the widest the CPU has (AVX-512 > AVX2 > portable).
//   mkl: MKL GEMMs if present; rows as auto.
//   avx512: our AVX-512 GEMMs and rows.
//   avx2, noavx512: as on a CPU with AVX2+FMA but no AVX-512: MKL GEMMs, AVX2 rows.
//   noavx2: as on a CPU with neither: MKL GEMMs, portable rows.
//   portable: portable GEMMs and rows.
// A path the machine cannot run falls back to the next one (GEMMs: mkl -> avx512 -> portable;
// rows: avx512 -> avx2 -> portable). fp64 always runs portable rows.
template <typename T>
Isa choose_isa() {
  const char* env = std::getenv("TRUTHGPT_CPU_ATTN");
  std::string want = env ? env : "auto";
  const bool no512 = want == "noavx512" || want == "avx2" || want == "noavx2";
  const bool avx = cpu_has_avx512() && !no512;
  bool have_mkl = false;
  bool have_avx_gemm = false;
  if (std::is_same<T, float>::value) {
    have_mkl = mkl().sgemm != nullptr;
    have_avx_gemm = avx;
  } else if (std::is_same<T, double>::value) {
    have_mkl = mkl().dgemm != nullptr;
  } else {
    have_mkl = mkl().bgemm != nullptr;
    have_avx_gemm = cpu_has_avx512bf16() && !no512;
  }
  Isa isa{GemmImpl::Portable, RowsImpl::Portable};
  if (want == "portable") return isa;
  if (!std::is_same<T, double>::value) {
    if (avx) {
      isa.rows = RowsImpl::Avx512;
    } else if (cpu_has_avx2() && want != "noavx2") {
      isa.rows = RowsImpl::Avx2;
    }
  }
  // not a measurement on non-Intel CPUs: the fp32 calibration sits near its threshold on some
  // (Zen 4), and flipping to MKL there halves the attention's speed in one process of two
  const bool mkl_slow = (want == "auto" || want.empty()) && have_avx_gemm &&
                        (!cpu::cpu_is_intel() || cpu::calibration().blas_is_slow);
  if (want != "avx512" && have_mkl && !mkl_slow) {
    isa.gemm = GemmImpl::Mkl;
  } else if (have_avx_gemm) {
    isa.gemm = GemmImpl::Avx512;
  } else if (have_mkl) {
    isa.gemm = GemmImpl::Mkl;
  }
  return isa;
}

// Flush-to-zero / denormals-are-zero while a worker runs (restored after): subnormal
// probabilities (ALiBi and windows make many) cost ~100 cycles per operation otherwise.
struct FlushDenormals {
#if TK_X86
  unsigned int prev = _mm_getcsr();
  FlushDenormals() { _mm_setcsr(prev | 0x8040u); }
  ~FlushDenormals() { _mm_setcsr(prev); }
#endif
};

// Keeps MKL single-threaded inside our worker threads (we parallelise over tiles).
struct MklSingleThread {
  int prev = 0;
  MklSingleThread() {
    const int one = 1;
    if (mkl().set_local_threads) prev = mkl().set_local_threads(&one);
  }
  ~MklSingleThread() {
    if (mkl().set_local_threads) mkl().set_local_threads(&prev);
  }
};

// ============================================================================ GEMMs
// Row-major tile GEMMs with an fp32 (fp64) accumulator C:
//   NT: C(MxN) = alpha A(MxK) B(NxK)^T + beta C
//   NN: C(MxN) = alpha A(MxK) B(KxN)   + beta C
//   TN: C(MxN) = alpha A(KxM)^T B(KxN) + beta C
// Leading dimensions are in elements; every matrix has unit stride along its rows.
enum class Op { NT, NN, TN };

// The causal bound of a tile piece: entry (row r, column c) of its (rows x keys) scores is
// visible only if c <= r + shift (the window's right edge). The AVX-512 GEMMs given one skip
// the micro-kernel blocks (6 or 8 rows x 48 or 64 columns) it makes all masked, or the masked
// part of their k range; what they skip is a masked entry, whose P and dS are exactly 0
// (a causal diagonal tile computed ~11% of a B2 H8 S1024 attention's products for nothing):
//   kSkipCols (NT: C = scores): an all-masked block is written as beta C (zeros);
//   kKeysUpTo (NN: C = P V, dS K; k = key): a block of rows takes k <= its last row + shift;
//   kRowsFrom (C = dO^T P, Q^T dS; k = row): a block of columns takes k >= its first - shift.
// The other GEMM paths compute everything.
struct Tri {
  enum Mode { kNone, kSkipCols, kKeysUpTo, kRowsFrom };
  Mode mode = kNone;
  int64_t shift = 0;
  // k range [k0, k1) of rows [m0, m0 + mr) x columns from n0 (k0 >= k1: nothing visible)
  void range(int64_t m0, int64_t mr, int64_t n0, int64_t K, int64_t& k0, int64_t& k1) const {
    k0 = 0;
    k1 = K;
    if (mode == kSkipCols) {
      if (n0 > m0 + mr - 1 + shift) k1 = 0;
    } else if (mode == kKeysUpTo) {
      k1 = std::clamp<int64_t>(m0 + mr + shift, 0, K);
    } else if (mode == kRowsFrom) {
      k0 = std::clamp<int64_t>(n0 - shift, 0, K);
    }
  }
};

// C block (mr x nw) = beta C: the result of an empty k range.
template <typename Acc>
void scale_block(Acc* c, int64_t ldc, int64_t mr, int64_t nw, Acc beta) {
  for (int64_t r = 0; r < mr; ++r)
    for (int64_t j = 0; j < nw; ++j) c[r * ldc + j] = beta == Acc(0) ? Acc(0) : beta * c[r * ldc + j];
}

template <typename T>
using acc_t = typename std::conditional<std::is_same<T, double>::value, double, float>::type;

inline float to_f(float x) { return x; }
inline double to_f(double x) { return x; }
inline float to_f(bf16 x) { return static_cast<float>(x); }

// ---- portable
template <typename T>
void gemm_portable(Op op, int64_t M, int64_t N, int64_t K, acc_t<T> alpha, const T* A, int64_t lda,
                   const T* B, int64_t ldb, acc_t<T> beta, acc_t<T>* C, int64_t ldc) {
  using Acc = acc_t<T>;
  std::vector<Acc> row(N);
  for (int64_t i = 0; i < M; ++i) {
    std::fill(row.begin(), row.end(), Acc(0));
    if (op == Op::NT) {
      const T* a = A + i * lda;
      for (int64_t j = 0; j < N; ++j) {
        const T* b = B + j * ldb;
        Acc s = 0;
        for (int64_t k = 0; k < K; ++k) s += static_cast<Acc>(to_f(a[k])) * static_cast<Acc>(to_f(b[k]));
        row[j] = s;
      }
    } else {
      for (int64_t k = 0; k < K; ++k) {
        const Acc a = static_cast<Acc>(to_f(op == Op::NN ? A[i * lda + k] : A[k * lda + i]));
        if (a == Acc(0)) continue;
        const T* b = B + k * ldb;
        for (int64_t j = 0; j < N; ++j) row[j] += a * static_cast<Acc>(to_f(b[j]));
      }
    }
    Acc* c = C + i * ldc;
    if (beta == Acc(0)) {
      for (int64_t j = 0; j < N; ++j) c[j] = alpha * row[j];
    } else {
      for (int64_t j = 0; j < N; ++j) c[j] = alpha * row[j] + beta * c[j];
    }
  }
}

// ---- MKL (column-major BLAS computing C^T = op(B)^T op(A)^T)
inline int ld_int(int64_t ld, int64_t need) { return static_cast<int>(std::max<int64_t>(std::max<int64_t>(ld, need), 1)); }

void gemm_mkl(Op op, int64_t M, int64_t N, int64_t K, float alpha, const float* A, int64_t lda,
              const float* B, int64_t ldb, float beta, float* C, int64_t ldc) {
  const char* ta = op == Op::NT ? "T" : "N";
  const char* tb = op == Op::TN ? "T" : "N";
  const int m = static_cast<int>(N), n = static_cast<int>(M), k = static_cast<int>(K);
  // B is the first operand: NT stores it (N x K) row-major = col-major K x N ('T');
  // NN/TN store it (K x N) row-major = col-major N x K ('N').
  const int lb = ld_int(ldb, op == Op::NT ? K : N);
  const int la = ld_int(lda, op == Op::TN ? M : K);
  const int lc = ld_int(ldc, N);
  mkl().sgemm(ta, tb, &m, &n, &k, &alpha, B, &lb, A, &la, &beta, C, &lc);
}

void gemm_mkl(Op op, int64_t M, int64_t N, int64_t K, double alpha, const double* A, int64_t lda,
              const double* B, int64_t ldb, double beta, double* C, int64_t ldc) {
  const char* ta = op == Op::NT ? "T" : "N";
  const char* tb = op == Op::TN ? "T" : "N";
  const int m = static_cast<int>(N), n = static_cast<int>(M), k = static_cast<int>(K);
  const int lb = ld_int(ldb, op == Op::NT ? K : N);
  const int la = ld_int(lda, op == Op::TN ? M : K);
  const int lc = ld_int(ldc, N);
  mkl().dgemm(ta, tb, &m, &n, &k, &alpha, B, &lb, A, &la, &beta, C, &lc);
}

void gemm_mkl(Op op, int64_t M, int64_t N, int64_t K, float alpha, const bf16* A, int64_t lda,
              const bf16* B, int64_t ldb, float beta, float* C, int64_t ldc) {
  constexpr int kRowMajor = 101, kNoTrans = 111, kTrans = 112;
  const int ta = op == Op::TN ? kTrans : kNoTrans;
  const int tb = op == Op::NT ? kTrans : kNoTrans;
  const int la = ld_int(lda, op == Op::TN ? M : K);
  const int lb = ld_int(ldb, op == Op::NT ? K : N);
  mkl().bgemm(kRowMajor, ta, tb, static_cast<int>(M), static_cast<int>(N), static_cast<int>(K), alpha,
              reinterpret_cast<const uint16_t*>(A), la, reinterpret_cast<const uint16_t*>(B), lb, beta, C,
              ld_int(ldc, N));
}

// Per-thread packing buffers of the AVX-512 GEMMs.
template <typename E>
E* scratch_buf(std::vector<E>& v, int64_t n) {
  if (static_cast<int64_t>(v.size()) < n) v.resize(n);
  return v.data();
}

#if TK_X86
// ---- AVX-512 fp32: C(MR x 16 NV) micro-kernel, A(r, k) = A[r sr + k sk], B row-major.
template <int MR, int NV>
TK_AVX512 void ukernel_f32(int64_t K, const float* A, int64_t sr, int64_t sk, const float* B, int64_t ldb,
                           float* C, int64_t ldc, float alpha, float beta, __mmask16 tail) {
  __m512 acc[MR][NV];
  TK_UNROLL
  for (int r = 0; r < MR; ++r)
    TK_UNROLL
    for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; ++k) {
    __m512 b[NV];
    const float* bk = B + k * ldb;
    TK_UNROLL
    for (int v = 0; v < NV; ++v)
      b[v] = (v == NV - 1) ? _mm512_maskz_loadu_ps(tail, bk + 16 * v) : _mm512_loadu_ps(bk + 16 * v);
    const float* ak = A + k * sk;
    TK_UNROLL
    for (int r = 0; r < MR; ++r) {
      const __m512 a = _mm512_set1_ps(ak[r * sr]);
      TK_UNROLL
      for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_fmadd_ps(a, b[v], acc[r][v]);
    }
  }
  const __m512 va = _mm512_set1_ps(alpha), vb = _mm512_set1_ps(beta);
  TK_UNROLL
  for (int r = 0; r < MR; ++r) {
    float* c = C + r * ldc;
    TK_UNROLL
    for (int v = 0; v < NV; ++v) {
      const __mmask16 m = (v == NV - 1) ? tail : static_cast<__mmask16>(0xFFFF);
      __m512 x = _mm512_mul_ps(acc[r][v], va);
      if (beta != 0.f) x = _mm512_fmadd_ps(vb, _mm512_maskz_loadu_ps(m, c + 16 * v), x);
      _mm512_mask_storeu_ps(c + 16 * v, m, x);
    }
  }
}

// One column block (NV vectors wide) of C over all M rows, MRX rows per micro-kernel call.
template <int NV, int MRX>
TK_AVX512 void gemm_f32_cols(int64_t M, int64_t K, float alpha, const float* A, int64_t sr, int64_t sk,
                             const float* b, int64_t ldb, float beta, float* C, int64_t ldc, __mmask16 tail,
                             const Tri& tri, int64_t n0, int64_t nw) {
  for (int64_t m0 = 0, mr = 0; m0 < M; m0 += mr) {
    // (6-row blocks end in 4 + 4 or 4 + 3 rows, not 6 + 2 or 6 + 1: a 1- or 2-row block
    // reloads all of B for a few dot products)
    const int64_t left = M - m0;
    mr = MRX == 6 && (left == 7 || left == 8) ? 4 : std::min<int64_t>(MRX, left);
    float* c = C + m0 * ldc;
    int64_t k0, k1;
    tri.range(m0, mr, n0, K, k0, k1);
    if (k0 >= k1) {
      scale_block(c, ldc, mr, nw, beta);
      continue;
    }
    const float* a = A + m0 * sr + k0 * sk;
    const float* bk = b + k0 * ldb;
#define TK_UK(R)                                                                    \
  case R:                                                                           \
    if constexpr (R <= MRX) ukernel_f32<R, NV>(k1 - k0, a, sr, sk, bk, ldb, c, ldc, alpha, beta, tail); \
    break;
    switch (mr) { TK_UK(1) TK_UK(2) TK_UK(3) TK_UK(4) TK_UK(5) TK_UK(6) TK_UK(7) TK_UK(8) default: break; }
#undef TK_UK
  }
}

// Column blocks of N: 64 wide (6 x 64 micro-kernels) where N is a multiple of 64, else 48
// (8 x 48); see gemm_bf16_vnni below for why.
inline int64_t col_block(int64_t N) { return N % 64 == 0 ? 64 : 48; }

// C(M x N) = alpha A B + beta C with A(r, k) = A[r sr + k sk] and B (K x N) row-major.
TK_AVX512 void gemm_f32_strided_a(int64_t M, int64_t N, int64_t K, float alpha, const float* A, int64_t sr,
                                  int64_t sk, const float* B, int64_t ldb, float beta, float* C, int64_t ldc,
                                  const Tri& tri = Tri{}) {
  const int64_t NB = col_block(N);
  for (int64_t n0 = 0; n0 < N; n0 += NB) {
    const int64_t nw = std::min<int64_t>(NB, N - n0);
    const int nv = static_cast<int>((nw + 15) / 16);
    const int rem = static_cast<int>(nw - 16 * (nv - 1));
    const __mmask16 tail = static_cast<__mmask16>(rem == 16 ? 0xFFFF : (1u << rem) - 1);
    const float* b = B + n0;
    float* c = C + n0;
    if (nv == 4) {
      gemm_f32_cols<4, 6>(M, K, alpha, A, sr, sk, b, ldb, beta, c, ldc, tail, tri, n0, nw);
    } else if (nv == 3) {
      gemm_f32_cols<3, 8>(M, K, alpha, A, sr, sk, b, ldb, beta, c, ldc, tail, tri, n0, nw);
    } else if (nv == 2) {
      gemm_f32_cols<2, 8>(M, K, alpha, A, sr, sk, b, ldb, beta, c, ldc, tail, tri, n0, nw);
    } else {
      gemm_f32_cols<1, 8>(M, K, alpha, A, sr, sk, b, ldb, beta, c, ldc, tail, tri, n0, nw);
    }
  }
}

// transpose16 / transpose_f32: csrc/cpu/transpose_avx512.h (shared with the GEMM engine).
using cpu::transpose16;
using cpu::transpose_f32;

// out (K x N, bf16, row stride ldo) = B^T rounded to nearest even, B (N x K fp32, ldb), with
// N and K multiples of 16: the transpose and the rounding in one pass (the backward's dK and
// dV from their transposed accumulators). Blocks go along out's rows first, so each row of out
// (often a (B, S, H, D) tensor: rows a kilobyte or more apart) is written whole in one go.
TK_AVX512BF16 void transpose_f32_bf16(int64_t N, int64_t K, const float* B, int64_t ldb, uint16_t* out, int64_t ldo) {
  for (int64_t k0 = 0; k0 < K; k0 += 16)
    for (int64_t j0 = 0; j0 < N; j0 += 16) {
      __m512 r[16];
      for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_ps(B + (j0 + i) * ldb + k0);
      transpose16(r);
      for (int i = 0; i < 16; ++i)
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + (k0 + i) * ldo + j0),
                            reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(r[i])));
    }
}

thread_local std::vector<float> tl_pack_f32;

TK_AVX512 void gemm_avx512_f32(Op op, int64_t M, int64_t N, int64_t K, float alpha, const float* A, int64_t lda,
                               const float* B, int64_t ldb, float beta, float* C, int64_t ldc, const Tri& tri) {
  if (M <= 0 || N <= 0) return;
  if (op == Op::NT) {
    float* bt = scratch_buf(tl_pack_f32, K * N);
    transpose_f32(N, K, B, ldb, bt, N);
    gemm_f32_strided_a(M, N, K, alpha, A, lda, 1, bt, N, beta, C, ldc, tri);
  } else if (op == Op::NN) {
    gemm_f32_strided_a(M, N, K, alpha, A, lda, 1, B, ldb, beta, C, ldc, tri);
  } else {
    gemm_f32_strided_a(M, N, K, alpha, A, 1, lda, B, ldb, beta, C, ldc, tri);
  }
}

// ---- AVX512-BF16: pairs of k in one 32-bit lane (VNNI layout), vdpbf16ps.
// A: rows of bf16 with k pairs contiguous (row r at A + r lda, K padded to even with zeros);
// Bv: (K/2) x Np x 2 bf16, Np a multiple of 16.
template <int MR, int NV>
TK_AVX512BF16 void ukernel_bf16(int64_t Kp, const uint16_t* A, int64_t lda, const uint16_t* Bv, int64_t Np,
                                float* C, int64_t ldc, float alpha, float beta, __mmask16 tail) {
  __m512 acc[MR][NV];
  TK_UNROLL
  for (int r = 0; r < MR; ++r)
    TK_UNROLL
    for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_setzero_ps();
  for (int64_t kp = 0; kp < Kp; ++kp) {
    __m512i b[NV];
    const uint16_t* bk = Bv + kp * Np * 2;
    TK_UNROLL
    for (int v = 0; v < NV; ++v) b[v] = _mm512_loadu_si512(bk + 32 * v);
    TK_UNROLL
    for (int r = 0; r < MR; ++r) {
      int32_t pair;
      std::memcpy(&pair, A + r * lda + 2 * kp, 4);
      const __m512i a = _mm512_set1_epi32(pair);
      TK_UNROLL
      for (int v = 0; v < NV; ++v)
        acc[r][v] = _mm512_dpbf16_ps(acc[r][v], reinterpret_cast<__m512bh>(a), reinterpret_cast<__m512bh>(b[v]));
    }
  }
  const __m512 va = _mm512_set1_ps(alpha), vb = _mm512_set1_ps(beta);
  TK_UNROLL
  for (int r = 0; r < MR; ++r) {
    float* c = C + r * ldc;
    TK_UNROLL
    for (int v = 0; v < NV; ++v) {
      const __mmask16 m = (v == NV - 1) ? tail : static_cast<__mmask16>(0xFFFF);
      __m512 x = _mm512_mul_ps(acc[r][v], va);
      if (beta != 0.f) x = _mm512_fmadd_ps(vb, _mm512_maskz_loadu_ps(m, c + 16 * v), x);
      _mm512_mask_storeu_ps(c + 16 * v, m, x);
    }
  }
}

// One column block (NV vectors wide) of C over all M rows, MRX rows per micro-kernel call.
template <int NV, int MRX>
TK_AVX512BF16 void gemm_bf16_vnni_cols(int64_t M, int64_t Kp, float alpha, const uint16_t* A, int64_t lda,
                                       const uint16_t* b, int64_t Np, float beta, float* C, int64_t ldc,
                                       __mmask16 tail, const Tri& tri, int64_t n0, int64_t nw) {
  for (int64_t m0 = 0, mr = 0; m0 < M; m0 += mr) {
    // (6-row blocks end in 4 + 4 or 4 + 3 rows, not 6 + 2 or 6 + 1: a 1- or 2-row block
    // reloads all of B for a few dot products)
    const int64_t left = M - m0;
    mr = MRX == 6 && (left == 7 || left == 8) ? 4 : std::min<int64_t>(MRX, left);
    float* c = C + m0 * ldc;
    int64_t k0, k1;  // (in elements; pairs [k0 / 2, ceil(k1 / 2)): the other half of an edge
    tri.range(m0, mr, n0, 2 * Kp, k0, k1);  // pair is a masked entry, 0 in A or B's product)
    const int64_t p0 = k0 / 2, p1 = (k1 + 1) / 2;
    if (p0 >= p1) {
      scale_block(c, ldc, mr, nw, beta);
      continue;
    }
    const uint16_t* a = A + m0 * lda + 2 * p0;
    const uint16_t* bk = b + p0 * Np * 2;
#define TK_UK(R)                                                                \
  case R:                                                                       \
    if constexpr (R <= MRX) ukernel_bf16<R, NV>(p1 - p0, a, lda, bk, Np, c, ldc, alpha, beta, tail); \
    break;
    switch (mr) { TK_UK(1) TK_UK(2) TK_UK(3) TK_UK(4) TK_UK(5) TK_UK(6) TK_UK(7) TK_UK(8) default: break; }
#undef TK_UK
  }
}

// Column blocks of 64 (6 x 64 micro-kernels: 24 accumulators, 4 loads of B and 6 broadcasts of
// A per k pair) where N is a multiple of 64 (D 64 / 128 outputs, 512-key score tiles), else
// of 48 (8 x 48); a 16-column block ran at 2/3 the speed per flop (8 x 16: 8 broadcasts per
// 8 dot products), which N = 64 as 48 + 16 paid on a quarter of its columns.
TK_AVX512BF16 void gemm_bf16_vnni(int64_t M, int64_t N, int64_t Kp, float alpha, const uint16_t* A, int64_t lda,
                                  const uint16_t* Bv, int64_t Np, float beta, float* C, int64_t ldc,
                                  const Tri& tri = Tri{}) {
  const int64_t NB = col_block(N);
  for (int64_t n0 = 0; n0 < N; n0 += NB) {
    const int64_t nw = std::min<int64_t>(NB, N - n0);
    const int nv = static_cast<int>((nw + 15) / 16);
    const int rem = static_cast<int>(nw - 16 * (nv - 1));
    const __mmask16 tail = static_cast<__mmask16>(rem == 16 ? 0xFFFF : (1u << rem) - 1);
    const uint16_t* b = Bv + n0 * 2;
    float* c = C + n0;
    if (nv == 4) {
      gemm_bf16_vnni_cols<4, 6>(M, Kp, alpha, A, lda, b, Np, beta, c, ldc, tail, tri, n0, nw);
    } else if (nv == 3) {
      gemm_bf16_vnni_cols<3, 8>(M, Kp, alpha, A, lda, b, Np, beta, c, ldc, tail, tri, n0, nw);
    } else if (nv == 2) {
      gemm_bf16_vnni_cols<2, 8>(M, Kp, alpha, A, lda, b, Np, beta, c, ldc, tail, tri, n0, nw);
    } else {
      gemm_bf16_vnni_cols<1, 8>(M, Kp, alpha, A, lda, b, Np, beta, c, ldc, tail, tri, n0, nw);
    }
  }
}

thread_local std::vector<uint16_t> tl_pack_a16, tl_pack_b16, tl_pack_t16;

// Bv (ceil(K/2) x Np x 2) from B (K x N) row-major: pairs of consecutive rows interleaved.
TK_AVX512BF16 void pack_vnni_rows(int64_t K, int64_t N, const uint16_t* B, int64_t ldb, uint16_t* Bv, int64_t Np) {
  const int64_t Kp = (K + 1) / 2;
  const __m512i lo_idx = _mm512_set_epi16(47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9, 40, 8, 39, 7, 38,
                                          6, 37, 5, 36, 4, 35, 3, 34, 2, 33, 1, 32, 0);
  const __m512i hi_idx = _mm512_set_epi16(63, 31, 62, 30, 61, 29, 60, 28, 59, 27, 58, 26, 57, 25, 56, 24, 55, 23,
                                          54, 22, 53, 21, 52, 20, 51, 19, 50, 18, 49, 17, 48, 16);
  for (int64_t kp = 0; kp < Kp; ++kp) {
    const uint16_t* r0 = B + (2 * kp) * ldb;
    const bool has1 = 2 * kp + 1 < K;
    const uint16_t* r1 = B + (2 * kp + 1) * ldb;
    uint16_t* o = Bv + kp * Np * 2;
    for (int64_t j = 0; j < Np; j += 32) {
      const int64_t left = N - j;
      const __mmask32 m = left >= 32 ? 0xFFFFFFFFu : (left <= 0 ? 0u : ((1u << left) - 1));
      const __m512i x0 = _mm512_maskz_loadu_epi16(m, r0 + j);
      const __m512i x1 = has1 ? _mm512_maskz_loadu_epi16(m, r1 + j) : _mm512_setzero_si512();
      _mm512_storeu_si512(o + 2 * j, _mm512_permutex2var_epi16(x0, lo_idx, x1));
      if (j + 16 < Np) _mm512_storeu_si512(o + 2 * j + 32, _mm512_permutex2var_epi16(x0, hi_idx, x1));
    }
  }
}

// Bv from B (N x K) row-major, i.e. the VNNI layout of B^T: 32-bit words (k pairs) transposed.
TK_AVX512BF16 void pack_vnni_cols(int64_t N, int64_t K, const uint16_t* B, int64_t ldb, uint16_t* Bv, int64_t Np) {
  const int64_t Kp = (K + 1) / 2;
  uint32_t* out = reinterpret_cast<uint32_t*>(Bv);
  if (K % 2 == 0 && ldb % 2 == 0 && reinterpret_cast<uintptr_t>(B) % 4 == 0) {
    transpose_f32(N, Kp, reinterpret_cast<const float*>(B), ldb / 2, reinterpret_cast<float*>(Bv), Np);
    for (int64_t kp = 0; kp < Kp; ++kp)
      for (int64_t j = N; j < Np; ++j) out[kp * Np + j] = 0;
    return;
  }
  for (int64_t j = 0; j < Np; ++j) {
    if (j >= N) {
      for (int64_t kp = 0; kp < Kp; ++kp) out[kp * Np + j] = 0;
      continue;
    }
    const uint16_t* b = B + j * ldb;
    for (int64_t kp = 0; kp < Kp; ++kp) {
      const uint32_t lo = b[2 * kp];
      const uint32_t hi = (2 * kp + 1 < K) ? b[2 * kp + 1] : 0u;
      out[kp * Np + j] = lo | (hi << 16);
    }
  }
}

// A' (M x Kpad) with k pairs contiguous, from A (K x M) row-major (the TN case) or from
// A (M x K) with odd K or non-even row strides (padding the last pair with zero).
void pack_a_rows(int64_t M, int64_t K, const uint16_t* A, int64_t sr, int64_t sk, uint16_t* out, int64_t ldo) {
  for (int64_t r = 0; r < M; ++r) {
    uint16_t* o = out + r * ldo;
    const uint16_t* a = A + r * sr;
    for (int64_t k = 0; k < K; ++k) o[k] = a[k * sk];
    if (K & 1) o[K] = 0;
  }
}

TK_AVX512BF16 void gemm_avx512_bf16(Op op, int64_t M, int64_t N, int64_t K, float alpha, const bf16* A_,
                                    int64_t lda, const bf16* B_, int64_t ldb, float beta, float* C, int64_t ldc,
                                    const Tri& tri) {
  if (M <= 0 || N <= 0) return;
  const uint16_t* A = reinterpret_cast<const uint16_t*>(A_);
  const uint16_t* B = reinterpret_cast<const uint16_t*>(B_);
  const int64_t Kp = (K + 1) / 2;
  const int64_t Np = (N + 15) / 16 * 16;
  uint16_t* bv = scratch_buf(tl_pack_b16, Kp * Np * 2 + 32);
  if (op == Op::NT) {
    pack_vnni_cols(N, K, B, ldb, bv, Np);
  } else {
    pack_vnni_rows(K, N, B, ldb, bv, Np);
  }
  const uint16_t* a = A;
  int64_t la = lda;
  const bool direct = op != Op::TN && (K % 2 == 0) && (lda % 2 == 0);
  if (!direct) {
    la = 2 * Kp;
    uint16_t* ap = scratch_buf(tl_pack_a16, M * la);
    if (op == Op::TN) {  // A (K x M): row pairs interleaved into 32-bit words, then transposed
      const int64_t Mp = (M + 15) / 16 * 16;
      uint16_t* t = scratch_buf(tl_pack_t16, Kp * Mp * 2 + 32);
      pack_vnni_rows(K, M, A, lda, t, Mp);
      transpose_f32(Kp, M, reinterpret_cast<const float*>(t), Mp, reinterpret_cast<float*>(ap), Kp);
    } else {
      pack_a_rows(M, K, A, lda, 1, ap, la);
    }
    a = ap;
  }
  gemm_bf16_vnni(M, N, Kp, alpha, a, la, bv, Np, beta, C, ldc, tri);
}
#endif  // TK_X86

template <typename T>
struct Gemm {
  GemmImpl impl;
  void operator()(Op op, int64_t M, int64_t N, int64_t K, acc_t<T> alpha, const T* A, int64_t lda, const T* B,
                  int64_t ldb, acc_t<T> beta, acc_t<T>* C, int64_t ldc, const Tri& tri = Tri{}) const {
    if (M <= 0 || N <= 0) return;
    if (K <= 0) {
      for (int64_t i = 0; i < M; ++i)
        for (int64_t j = 0; j < N; ++j) C[i * ldc + j] = beta == acc_t<T>(0) ? acc_t<T>(0) : beta * C[i * ldc + j];
      return;
    }
    if (impl == GemmImpl::Mkl) {
      gemm_mkl(op, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
      return;
    }
#if TK_X86
    if (impl == GemmImpl::Avx512) {
      if constexpr (std::is_same<T, float>::value) {
        gemm_avx512_f32(op, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc, tri);
        return;
      } else if constexpr (std::is_same<T, bf16>::value) {
        gemm_avx512_bf16(op, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc, tri);
        return;
      }
    }
#endif
    gemm_portable<T>(op, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
  }
};

// ============================================================================ packed keys
// The key-side operands of one (batch, kv head), keys [j0, j1), packed once into the layouts
// the AVX-512 GEMMs read, for all the query tiles (and pieces) of a work item that use them;
// without it every piece packs its keys again (a causal backward packed K three times and V
// twice per query tile).
//   kt / vt: B of the NT products S = Q K^T, dP = dO V^T. fp32: K^T (D x ld); bf16: VNNI
//            pairs of K^T ((D/2) x ld x 2). ld >= n + 16: the last vector of a piece reads
//            past its keys into zero padding.
//   kr / vr: B of the NN products dQ = dS K, O = P V (bf16 only: VNNI pairs of rows,
//            (n/2) x Dp x 2; fp32 reads K / V in place).
// Other GEMM paths (MKL, portable, fp64) read K / V in place: nothing is packed.
enum KeyPackWant : int { kPackKT = 1, kPackVT = 2, kPackKR = 4, kPackVR = 8 };

template <typename T>
struct KeyPack {
  using E = typename std::conditional<std::is_same<T, float>::value, float, uint16_t>::type;
  int64_t b = -1, kvh = -1, j0 = 0, j1 = 0, ld = 0, Dp = 0;
  int have = 0;
  std::vector<E> kt, vt, kr, vr;
  bool covers(int64_t bb, int64_t h, int64_t a, int64_t e, int want) const {
    return bb == b && h == kvh && a >= j0 && e <= j1 && (have & want) == want;
  }
};

template <typename T>
bool packs_keys(GemmImpl impl, int64_t D) {
#if TK_X86
  if (impl != GemmImpl::Avx512) return false;
  if (std::is_same<T, float>::value) return true;
  if (std::is_same<T, bf16>::value) return D % 2 == 0;
#endif
  (void)impl;
  (void)D;
  return false;
}

// Packs keys [j0, j1) of K (rows at K + j ksS) and V (V + j vsS) for `want` (KeyPackWant bits).
template <typename T>
void pack_keys(KeyPack<T>& kp, GemmImpl impl, int want, int64_t b, int64_t kvh, int64_t j0, int64_t j1, int64_t D,
               const T* K, int64_t ksS, const T* V, int64_t vsS) {
  kp.b = -1;
  kp.have = 0;
  if (!packs_keys<T>(impl, D) || j1 <= j0) return;
  const int64_t n = j1 - j0;
  kp.b = b, kp.kvh = kvh, kp.j0 = j0, kp.j1 = j1;
  kp.ld = (n + 15) / 16 * 16 + 16;
  kp.Dp = (D + 15) / 16 * 16;
#if TK_X86
  if constexpr (std::is_same<T, float>::value) {
    auto nt = [&](std::vector<float>& out, const float* src, int64_t ss) {
      out.assign(D * kp.ld, 0.f);
      transpose_f32(n, D, src, ss, out.data(), kp.ld);
    };
    if (want & kPackKT) nt(kp.kt, K, ksS);
    if (want & kPackVT) nt(kp.vt, V, vsS);
    kp.have = want & (kPackKT | kPackVT);
  } else if constexpr (std::is_same<T, bf16>::value) {
    auto nt = [&](std::vector<uint16_t>& out, const T* src, int64_t ss) {
      out.resize((D / 2) * kp.ld * 2 + 32);
      pack_vnni_cols(n, D, reinterpret_cast<const uint16_t*>(src), ss, out.data(), kp.ld);
    };
    auto nn = [&](std::vector<uint16_t>& out, const T* src, int64_t ss) {
      out.resize((n + 1) / 2 * kp.Dp * 2 + 32);
      pack_vnni_rows(n, D, reinterpret_cast<const uint16_t*>(src), ss, out.data(), kp.Dp);
    };
    if (want & kPackKT) nt(kp.kt, K, ksS);
    if (want & kPackVT) nt(kp.vt, V, vsS);
    if (want & kPackKR) nn(kp.kr, K, ksS);
    if (want & kPackVR) nn(kp.vr, V, vsS);
    kp.have = want;
  }
#else
  (void)want, (void)K, (void)ksS, (void)V, (void)vsS;
#endif
}

// C (M x n) = alpha A B^T + beta C, B = keys [j, j + n) of K (which 0) or V (1) of (batch b,
// kv head kvh): from kp where it holds them, else read in place (Bp, ldb).
template <typename T>
void gemm_nt_keys(const Gemm<T>& gemm, const KeyPack<T>& kp, int which, int64_t b, int64_t kvh, int64_t j, int64_t M,
                  int64_t n, int64_t D, acc_t<T> alpha, const T* A, int64_t lda, const T* Bp, int64_t ldb,
                  acc_t<T> beta, acc_t<T>* C, int64_t ldc, const Tri& tri = Tri{}) {
#if TK_X86
  if (M > 0 && n > 0 && kp.covers(b, kvh, j, j + n, which ? kPackVT : kPackKT)) {
    const int64_t off = j - kp.j0;
    if constexpr (std::is_same<T, float>::value) {
      gemm_f32_strided_a(M, n, D, alpha, A, lda, 1, (which ? kp.vt : kp.kt).data() + off, kp.ld, beta, C, ldc, tri);
      return;
    } else if constexpr (std::is_same<T, bf16>::value) {
      if (lda % 2 == 0) {  // (D is even: rows of A are k pairs)
        gemm_bf16_vnni(M, n, D / 2, alpha, reinterpret_cast<const uint16_t*>(A), lda,
                       (which ? kp.vt : kp.kt).data() + off * 2, kp.ld, beta, C, ldc, tri);
        return;
      }
    }
  }
#endif
  gemm(Op::NT, M, n, D, alpha, A, lda, Bp, ldb, beta, C, ldc, tri);
}

// C (M x D) = alpha A B + beta C, A (M x n) row-major, B = keys [j, j + n) of K (which 0) or
// V (1), from kp where it holds them in pairs that start at j (and n is even), else in place.
template <typename T>
void gemm_nn_keys(const Gemm<T>& gemm, const KeyPack<T>& kp, int which, int64_t b, int64_t kvh, int64_t j, int64_t M,
                  int64_t D, int64_t n, acc_t<T> alpha, const T* A, int64_t lda, const T* Bp, int64_t ldb,
                  acc_t<T> beta, acc_t<T>* C, int64_t ldc, const Tri& tri = Tri{}) {
#if TK_X86
  if constexpr (std::is_same<T, bf16>::value) {
    if (M > 0 && n > 0 && n % 2 == 0 && lda % 2 == 0 && (j - kp.j0) % 2 == 0 &&
        kp.covers(b, kvh, j, j + n, which ? kPackVR : kPackKR)) {
      gemm_bf16_vnni(M, D, n / 2, alpha, reinterpret_cast<const uint16_t*>(A), lda,
                     (which ? kp.vr : kp.kr).data() + (j - kp.j0) / 2 * kp.Dp * 2, kp.Dp, beta, C, ldc, tri);
      return;
    }
  }
#endif
  gemm(Op::NN, M, D, n, alpha, A, lda, Bp, ldb, beta, C, ldc, tri);
}

}  // namespace
}  // namespace truthgpt
