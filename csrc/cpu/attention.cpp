// Flash attention on the CPU: truthgpt::attention_fwd / attention_bwd (schemas and input
// conventions: csrc/registration.cpp; semantics: truthgpt_kernels/ops/reference.py).
//
// Algorithm (FlashAttention-2 on tiles):
//  - A work item is a query tile: (batch, kv head, group of query heads sharing that kv head,
//    block of query rows). Small Sq (decoding) packs several query heads of one kv head into
//    one tile, so K/V are read once for them (GQA without repeating K/V).
//  - For each tile the visible keys are computed from the window (causal is folded into the
//    window), the block mask (any block size) and the key mask, as runs of keys cut into
//    pieces of at most BK keys; everything else is skipped, so cost scales with density.
//    Pieces whose keys are visible to every row of the tile need no masking at all.
//  - Per piece: S = Q K^T (tile GEMM), scores transformed (softcap, ALiBi computed from the
//    slope, masks), online softmax in log2 units, acc += P V (tile GEMM). No S x S matrix
//    exists. A row's first piece finds its max exactly; later pieces run one fused pass
//    (transform, exp2 against the running max, sum, row max) and rescale only when the max
//    grew by more than 2^8 ("lazy rescaling"); pieces go nearest keys first.
//  - Few work items (decoding, one long head): the forward also splits the keys and merges
//    the partial softmaxes in a fixed order (flash-decoding); the split depends on the
//    problem only, never on the thread count.
//  - Backward recomputes P from the saved lse by tile: dV += P^T dO, dP = dO V^T,
//    dS = P (dP - delta) [x softcap derivative], dQ += scale dS K, dK += scale dS^T Q, with
//    delta = rowsum(dO O), except for rows with exactly one visible key: delta = dP at that
//    key, so their dS is exactly 0 (single_visible_key).
//  - NaN/Inf in q, k, v propagate to the rows they reach (NaN-propagating row max); a row
//    with no visible key still gives zeros.
//    Deterministic: a work item owns its outputs (one (batch, kv head) owns dK, dV and the dQ
//    of its query heads), or, with too few such items for the threads, dK/dV are computed per
//    (batch, kv head, key block) and dQ per query tile in a second pass. Sums run in a fixed
//    order; no atomics on data.
//  - Tile GEMMs: MKL (sgemm / dgemm / gemm_bf16bf16f32, AMX on Sapphire Rapids) resolved at
//    runtime from the libtorch_cpu already loaded (it exports MKL's symbols), else our
//    AVX-512 micro-kernels (AVX512-BF16 dot products for bf16 where the CPU has them), else a
//    portable path. Score transforms and softmax: AVX-512 (own exp2 polynomial), else
//    portable. All chosen at runtime (__builtin_cpu_supports); the default build has no
//    -mavx512f. Workers run with FTZ/DAZ (subnormal probabilities are flushed).
//  - float16: the float32 kernel on operands widened once at entry (O((Sq + Sk) D) copies,
//    against O(Sq Sk D) work), outputs rounded back; so every float32 path serves it.
//  - Threads: at::parallel_for over the thread count; each thread takes work items (heaviest
//    first) from a shared counter. Accumulation is fp32 (fp64 for fp64 inputs).
//  - Knobs for tests and tuning (environment): TRUTHGPT_CPU_ATTN=mkl|avx512|portable|noavx512 (GEMM and
//    row path; noavx512 simulates a CPU without it), TRUTHGPT_ATTN_BWD=single|split, TRUTHGPT_ATTN_BQ / _BK (tile sizes),
//    TRUTHGPT_ATTN_SPLITK (forward key splits).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#if !defined(_WIN32)
#include <dlfcn.h>
#endif

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <string>
#include <type_traits>
#include <vector>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>
#define TK_X86 1
#define TK_UNROLL _Pragma("GCC unroll 16")
#define TK_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma")))
#define TK_AVX512BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma,avx512bf16")))
#else
#define TK_X86 0
#endif

namespace truthgpt {
namespace {

using bf16 = c10::BFloat16;
constexpr double kLog2e = 1.4426950408889634;
constexpr double kLn2 = 0.6931471805599453;

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

enum class GemmImpl { Mkl, Avx512, Portable };

struct Isa {
  GemmImpl gemm;
  bool avx512_rows;  // AVX-512 score/softmax loops
};

// TRUTHGPT_CPU_ATTN: auto (default) | mkl | avx512 | portable | noavx512 (as on a CPU without
// AVX-512: MKL GEMMs if present, portable loops otherwise). A path the machine cannot run
// falls back to the next one (mkl -> avx512 -> portable).
template <typename T>
Isa choose_isa() {
  const char* env = std::getenv("TRUTHGPT_CPU_ATTN");
  std::string want = env ? env : "auto";
  const bool avx = cpu_has_avx512() && want != "noavx512";
  bool have_mkl = false;
  bool have_avx_gemm = false;
  if (std::is_same<T, float>::value) {
    have_mkl = mkl().sgemm != nullptr;
    have_avx_gemm = avx;
  } else if (std::is_same<T, double>::value) {
    have_mkl = mkl().dgemm != nullptr;
  } else {
    have_mkl = mkl().bgemm != nullptr;
    have_avx_gemm = cpu_has_avx512bf16();
  }
  Isa isa{GemmImpl::Portable, false};
  if (want == "portable") return isa;
  isa.avx512_rows = avx && !std::is_same<T, double>::value;
  if (want != "avx512" && have_mkl) {
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

// C(M x N) = alpha A B + beta C with A(r, k) = A[r sr + k sk] and B (K x N) row-major.
TK_AVX512 void gemm_f32_strided_a(int64_t M, int64_t N, int64_t K, float alpha, const float* A, int64_t sr,
                                  int64_t sk, const float* B, int64_t ldb, float beta, float* C, int64_t ldc) {
  constexpr int kMR = 8;
  for (int64_t n0 = 0; n0 < N; n0 += 48) {
    const int64_t nw = std::min<int64_t>(48, N - n0);
    const int nv = static_cast<int>((nw + 15) / 16);
    const int rem = static_cast<int>(nw - 16 * (nv - 1));
    const __mmask16 tail = static_cast<__mmask16>(rem == 16 ? 0xFFFF : (1u << rem) - 1);
    for (int64_t m0 = 0; m0 < M; m0 += kMR) {
      const int mr = static_cast<int>(std::min<int64_t>(kMR, M - m0));
      const float* a = A + m0 * sr;
      const float* b = B + n0;
      float* c = C + m0 * ldc + n0;
#define TK_UK(R, V) ukernel_f32<R, V>(K, a, sr, sk, b, ldb, c, ldc, alpha, beta, tail)
#define TK_UK_ROWS(V)        \
  switch (mr) {              \
    case 1: TK_UK(1, V); break; \
    case 2: TK_UK(2, V); break; \
    case 3: TK_UK(3, V); break; \
    case 4: TK_UK(4, V); break; \
    case 5: TK_UK(5, V); break; \
    case 6: TK_UK(6, V); break; \
    case 7: TK_UK(7, V); break; \
    default: TK_UK(8, V); break; \
  }
      if (nv == 1) {
        TK_UK_ROWS(1)
      } else if (nv == 2) {
        TK_UK_ROWS(2)
      } else {
        TK_UK_ROWS(3)
      }
#undef TK_UK_ROWS
#undef TK_UK
    }
  }
}

// out (K x N, ld ldo) = B^T for B (N x K, ldb), by 16 x 16 blocks through registers
// (32-bit elements: also used for pairs of bf16).
TK_AVX512 void transpose_f32(int64_t N, int64_t K, const float* B, int64_t ldb, float* out, int64_t ldo) {
  for (int64_t j0 = 0; j0 < N; j0 += 16) {
    const int64_t jn = std::min<int64_t>(16, N - j0);
    for (int64_t k0 = 0; k0 < K; k0 += 16) {
      const int64_t kn = std::min<int64_t>(16, K - k0);
      if (jn == 16 && kn == 16) {
        __m512 r[16], t[16];
        for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_ps(B + (j0 + i) * ldb + k0);
        // 16x16 transpose: unpack 32-bit, 64-bit, then 128-bit lanes twice.
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
        // r[i] now holds column k0 + i of the block
        for (int i = 0; i < 16; ++i) _mm512_storeu_ps(out + (k0 + i) * ldo + j0, r[i]);
      } else {
        for (int64_t kk = 0; kk < kn; ++kk)
          for (int64_t jj = 0; jj < jn; ++jj) out[(k0 + kk) * ldo + j0 + jj] = B[(j0 + jj) * ldb + k0 + kk];
      }
    }
  }
}

thread_local std::vector<float> tl_pack_f32;

TK_AVX512 void gemm_avx512_f32(Op op, int64_t M, int64_t N, int64_t K, float alpha, const float* A, int64_t lda,
                               const float* B, int64_t ldb, float beta, float* C, int64_t ldc) {
  if (M <= 0 || N <= 0) return;
  if (op == Op::NT) {
    float* bt = scratch_buf(tl_pack_f32, K * N);
    transpose_f32(N, K, B, ldb, bt, N);
    gemm_f32_strided_a(M, N, K, alpha, A, lda, 1, bt, N, beta, C, ldc);
  } else if (op == Op::NN) {
    gemm_f32_strided_a(M, N, K, alpha, A, lda, 1, B, ldb, beta, C, ldc);
  } else {
    gemm_f32_strided_a(M, N, K, alpha, A, 1, lda, B, ldb, beta, C, ldc);
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

TK_AVX512BF16 void gemm_bf16_vnni(int64_t M, int64_t N, int64_t Kp, float alpha, const uint16_t* A, int64_t lda,
                                  const uint16_t* Bv, int64_t Np, float beta, float* C, int64_t ldc) {
  constexpr int kMR = 8;
  for (int64_t n0 = 0; n0 < N; n0 += 48) {
    const int64_t nw = std::min<int64_t>(48, N - n0);
    const int nv = static_cast<int>((nw + 15) / 16);
    const int rem = static_cast<int>(nw - 16 * (nv - 1));
    const __mmask16 tail = static_cast<__mmask16>(rem == 16 ? 0xFFFF : (1u << rem) - 1);
    for (int64_t m0 = 0; m0 < M; m0 += kMR) {
      const int mr = static_cast<int>(std::min<int64_t>(kMR, M - m0));
      const uint16_t* a = A + m0 * lda;
      const uint16_t* b = Bv + n0 * 2;
      float* c = C + m0 * ldc + n0;
#define TK_UK(R, V) ukernel_bf16<R, V>(Kp, a, lda, b, Np, c, ldc, alpha, beta, tail)
#define TK_UK_ROWS(V)        \
  switch (mr) {              \
    case 1: TK_UK(1, V); break; \
    case 2: TK_UK(2, V); break; \
    case 3: TK_UK(3, V); break; \
    case 4: TK_UK(4, V); break; \
    case 5: TK_UK(5, V); break; \
    case 6: TK_UK(6, V); break; \
    case 7: TK_UK(7, V); break; \
    default: TK_UK(8, V); break; \
  }
      if (nv == 1) {
        TK_UK_ROWS(1)
      } else if (nv == 2) {
        TK_UK_ROWS(2)
      } else {
        TK_UK_ROWS(3)
      }
#undef TK_UK_ROWS
#undef TK_UK
    }
  }
}

thread_local std::vector<uint16_t> tl_pack_a16, tl_pack_b16;

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
                                    int64_t lda, const bf16* B_, int64_t ldb, float beta, float* C, int64_t ldc) {
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
    if (op == Op::TN) {
      pack_a_rows(M, K, A, 1, lda, ap, la);
    } else {
      pack_a_rows(M, K, A, lda, 1, ap, la);
    }
    a = ap;
  }
  gemm_bf16_vnni(M, N, Kp, alpha, a, la, bv, Np, beta, C, ldc);
}
#endif  // TK_X86

template <typename T>
struct Gemm {
  GemmImpl impl;
  void operator()(Op op, int64_t M, int64_t N, int64_t K, acc_t<T> alpha, const T* A, int64_t lda, const T* B,
                  int64_t ldb, acc_t<T> beta, acc_t<T>* C, int64_t ldc) const {
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
        gemm_avx512_f32(op, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
        return;
      } else if constexpr (std::is_same<T, bf16>::value) {
        gemm_avx512_bf16(op, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
        return;
      }
    }
#endif
    gemm_portable<T>(op, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
  }
};

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
  const int key = (mask ? 4 : 0) | (alibi ? 2 : 0) | (softcap ? 1 : 0);
  switch (key) {
    case 0: return prep_row_portable<Acc, false, false, false>;
    case 1: return prep_row_portable<Acc, false, false, true>;
    case 2: return prep_row_portable<Acc, false, true, false>;
    case 3: return prep_row_portable<Acc, false, true, true>;
    case 4: return prep_row_portable<Acc, true, false, false>;
    case 5: return prep_row_portable<Acc, true, false, true>;
    case 6: return prep_row_portable<Acc, true, true, false>;
    default: return prep_row_portable<Acc, true, true, true>;
  }
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
  const int key = (mask ? 4 : 0) | (alibi ? 2 : 0) | (softcap ? 1 : 0);
  switch (key) {
    case 0: return prep_row_avx512<false, false, false>;
    case 1: return prep_row_avx512<false, false, true>;
    case 2: return prep_row_avx512<false, true, false>;
    case 3: return prep_row_avx512<false, true, true>;
    case 4: return prep_row_avx512<true, false, false>;
    case 5: return prep_row_avx512<true, false, true>;
    case 6: return prep_row_avx512<true, true, false>;
    default: return prep_row_avx512<true, true, true>;
  }
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
#define TK_PICK(M, A, S)                                                \
  if constexpr (VARIANT == 0) return fused_row_f32<M, A, S>;            \
  else if constexpr (VARIANT == 1) return fused_row_bf16_plain<M, A, S>; \
  else return fused_row_bf16_native<M, A, S>;
  switch (key) {
    case 0: { TK_PICK(false, false, false) }
    case 1: { TK_PICK(false, false, true) }
    case 2: { TK_PICK(false, true, false) }
    case 3: { TK_PICK(false, true, true) }
    case 4: { TK_PICK(true, false, false) }
    case 5: { TK_PICK(true, false, true) }
    case 6: { TK_PICK(true, true, false) }
    default: { TK_PICK(true, true, true) }
  }
#undef TK_PICK
}

// A new row max may exceed the running reference by this much (log2 units) before the row
// is rescaled: probabilities then stay <= 2^8, and most pieces need a single pass.
constexpr float kLazyRescale = 8.f;

template <typename PT>
TK_AVX512 void fwd_rows_avx512(const RowsArgs<float, PT>& a) {
  const Cfg<float>& cf = *a.cf;
  constexpr bool kBf16 = std::is_same<PT, bf16>::value;
  const prep_avx_fn prep = pick_prep_avx512(a.partial, cf.alibi, cf.softcap);
  const int key = (a.partial ? 4 : 0) | (cf.alibi ? 2 : 0) | (cf.softcap ? 1 : 0);
  fused_fn fused;
  if constexpr (kBf16) {
    fused = cpu_has_avx512bf16() ? pick_fused_t<2>(key) : pick_fused_t<1>(key);
  } else {
    fused = pick_fused_t<0>(key);
  }
  auto full_pass = [&](float* s, PT* p, float mx) {  // s already transformed
    return kBf16 ? exp_row_avx512(s, a.n, mx, nullptr, reinterpret_cast<uint16_t*>(p))
                 : exp_row_avx512(s, a.n, mx, reinterpret_cast<float*>(p), nullptr);
  };
  for (int64_t r = 0; r < a.rows; ++r) {
    float* s = a.S + r * a.ldS;
    PT* p = a.P + r * a.ldP;
    const float m_old = a.m[r];
    if (m_old == kNegInf) {  // first visible keys of this row: exact max, two passes
      const float mx = prep(s, a.n, a.j0, a.ri[r], cf, nullptr);
      if (mx == kNegInf) {
        std::memset(static_cast<void*>(p), 0, sizeof(PT) * (a.n + (a.n & 1)));
        continue;
      }
      a.l[r] = full_pass(s, p, mx);
      a.m[r] = mx;
      continue;
    }
    float mx;
    const float sum = fused(s, a.n, a.j0, a.ri[r], cf, m_old, p, &mx);
    if (mx <= m_old + kLazyRescale) {
      a.l[r] += sum;
      continue;
    }
    prep(s, a.n, a.j0, a.ri[r], cf, nullptr);  // the max grew a lot: redo against it
    const float alpha = std::exp2(m_old - mx);
    a.l[r] = a.l[r] * alpha + full_pass(s, p, mx);
    a.m[r] = mx;
    scale_row_avx512(a.acc + r * a.ldacc, a.D, alpha);
  }
}

template <typename PT>
TK_AVX512 void bwd_p_rows_avx512(const RowsArgs<float, PT>& a) {
  const Cfg<float>& cf = *a.cf;
  const prep_avx_fn prep = pick_prep_avx512(a.partial, cf.alibi, cf.softcap);
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
    prep(s, a.n, a.j0, a.ri[r], cf, g);
    exp_row_avx512(s, a.n, lse2, s, pl);
  }
}

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

template <typename PT>
TK_AVX512 void bwd_ds_rows_avx512(const RowsArgs<float, PT>& a) {
  const bool native = cpu_has_avx512bf16();
  for (int64_t r = 0; r < a.rows; ++r) {
    const float* p = a.S + r * a.ldS;
    float* dp = a.dP + r * a.ldS;
    const float* g = a.G ? a.G + r * a.ldS : nullptr;
    const __m512 delta = _mm512_set1_ps(a.ri[r].delta);
    for (int64_t c = 0; c < a.n; c += 16) {
      const __mmask16 tm = tail_mask(a.n - c);
      __m512 x = _mm512_mul_ps(_mm512_maskz_loadu_ps(tm, p + c), _mm512_sub_ps(_mm512_maskz_loadu_ps(tm, dp + c), delta));
      if (g) x = _mm512_mul_ps(x, _mm512_maskz_loadu_ps(tm, g + c));
      _mm512_mask_storeu_ps(dp + c, tm, x);
    }
    if (a.dSl) {
      uint16_t* o = reinterpret_cast<uint16_t*>(a.dSl + r * a.ldP);
      if (native) {
        convert_row_bf16_native(dp, a.n, o);
      } else {
        convert_row_bf16_plain(dp, a.n, o);
      }
    }
  }
}
#endif  // TK_X86

template <typename Acc, typename PT>
struct Rows {
  bool avx512;
  void fwd(const RowsArgs<Acc, PT>& a) const {
#if TK_X86
    if constexpr (std::is_same<Acc, float>::value) {
      if (avx512) return fwd_rows_avx512<PT>(a);
    }
#endif
    fwd_rows_portable<Acc, PT>(a);
  }
  void bwd_p(const RowsArgs<Acc, PT>& a) const {
#if TK_X86
    if constexpr (std::is_same<Acc, float>::value) {
      if (avx512) return bwd_p_rows_avx512<PT>(a);
    }
#endif
    bwd_p_rows_portable<Acc, PT>(a);
  }
  void bwd_ds(const RowsArgs<Acc, PT>& a) const {
#if TK_X86
    if constexpr (std::is_same<Acc, float>::value) {
      if (avx512) return bwd_ds_rows_avx512<PT>(a);
    }
#endif
    bwd_ds_rows_portable<Acc, PT>(a);
  }
};

// ============================================================================ problem, tiles
struct Piece {
  int64_t j0, j1;
  bool partial;  // some (row, key) pairs of the piece are masked
  bool need_cm;  // ... by the key mask or the block mask (not only by the window)
};

struct Tile {
  int64_t b, kvh, h0, nh, i0, i1;
  int64_t nr() const { return i1 - i0; }
  int64_t rows() const { return nh * (i1 - i0); }
};

struct Problem {
  int64_t B = 0, Hq = 0, Hkv = 0, Sq = 0, Sk = 0, D = 0, g = 1;
  double scale = 1.0, softcap = 0.0;
  int64_t wl = -1, wr = -1, off = 0;
  std::vector<double> slopes;  // B * Hq, empty without ALiBi
  const uint8_t* bm = nullptr;
  int64_t bm_sB = 0, bm_sH = 0, bm_sQ = 0, bm_sK = 0, bs = 1;
  const uint8_t* km = nullptr;
  int64_t km_sB = 0, km_sK = 0;
  std::vector<int32_t> kmc;  // B x (Sk + 1) prefix counts of the key mask
  // tiling
  int64_t BQ = 128, BK = 512, hpt = 1, ngroups = 1;
  std::vector<std::pair<int64_t, int64_t>> qtiles;

  int64_t lo(int64_t i) const {
    const int64_t p = i + off;
    return wl < 0 ? 0 : std::max<int64_t>(0, p - wl);
  }
  int64_t hi(int64_t i) const {
    const int64_t p = i + off;
    return wr < 0 ? Sk - 1 : std::min<int64_t>(Sk - 1, p + wr);
  }
  bool bmask(int64_t b, int64_t h, int64_t qb, int64_t kb) const {
    return bm[b * bm_sB + h * bm_sH + qb * bm_sQ + kb * bm_sK] != 0;
  }
  bool kmask(int64_t b, int64_t j) const { return km[b * km_sB + j * km_sK] != 0; }
  int64_t items_fwd() const { return B * Hkv * ngroups * static_cast<int64_t>(qtiles.size()); }
  Tile tile(int64_t b, int64_t kvh, int64_t grp, int64_t t) const {
    const int64_t h0 = kvh * g + grp * hpt;
    return Tile{b, kvh, h0, std::min<int64_t>(hpt, (kvh + 1) * g - h0), qtiles[t].first, qtiles[t].second};
  }
};

int64_t env_int(const char* name, int64_t dflt) {
  const char* v = std::getenv(name);
  if (!v || !*v) return dflt;
  const long long x = std::atoll(v);
  return x > 0 ? static_cast<int64_t>(x) : dflt;
}

// Tile sizes: BQ query rows x BK keys. With a block mask, query tiles never straddle a
// query block (so one block-mask row applies) unless blocks are smaller than 32 rows.
// (128 x 512 measured best or equal-best for fp32 and bf16, forward and backward, D 64.)
void plan_tiles(Problem& P) {
  int64_t BQ = 128, BK = 512;
  if (P.D > 128) BQ = 64;
  BQ = env_int("TRUTHGPT_ATTN_BQ", BQ);
  BK = (env_int("TRUTHGPT_ATTN_BK", BK) + 15) / 16 * 16;
  // narrow windows: keep the wasted triangle of a tile small
  if (P.wl >= 0 && P.wr >= 0) {
    const int64_t w = P.wl + P.wr + 1;
    while (BQ > 32 && BQ * 4 > w) BQ /= 2;
  }
  // decoding / short queries: several query heads of one kv head per tile
  P.hpt = 1;
  if (P.Sq <= 16 && P.g > 1) P.hpt = std::max<int64_t>(1, std::min<int64_t>(P.g, BQ / P.Sq));
  P.ngroups = (P.g + P.hpt - 1) / P.hpt;
  P.BQ = BQ;
  P.BK = BK;
  P.qtiles.clear();
  if (P.bm && P.bs >= 32) {
    const int64_t per = (P.bs + BQ - 1) / BQ;  // tiles per query block
    const int64_t size = (P.bs + per - 1) / per;
    for (int64_t b0 = 0; b0 < P.Sq; b0 += P.bs) {
      const int64_t bend = std::min<int64_t>(b0 + P.bs, P.Sq);
      for (int64_t i0 = b0; i0 < bend; i0 += size) P.qtiles.emplace_back(i0, std::min<int64_t>(i0 + size, bend));
    }
  } else {
    int64_t step = BQ;
    if (P.bm) step = std::max<int64_t>(1, BQ / P.bs) * P.bs;  // whole small blocks
    for (int64_t i0 = 0; i0 < P.Sq; i0 += step) P.qtiles.emplace_back(i0, std::min<int64_t>(i0 + step, P.Sq));
  }
}

// Visible key pieces of a tile within keys [L0, L1): window union, intersected with the runs
// of key blocks visible to some row of the tile, cut into pieces of at most BK keys.
void tile_pieces(const Problem& P, const Tile& t, int64_t L0, int64_t L1, std::vector<Piece>& out,
                 std::vector<uint8_t>& any_buf, std::vector<uint8_t>& all_buf) {
  out.clear();
  int64_t wlo = std::numeric_limits<int64_t>::max(), whi = -1, maxlo = 0, minhi = std::numeric_limits<int64_t>::max();
  bool has_empty = false;
  for (int64_t i = t.i0; i < t.i1; ++i) {
    const int64_t lo = P.lo(i), hi = P.hi(i);
    if (lo > hi) {
      has_empty = true;
      continue;
    }
    wlo = std::min(wlo, lo);
    whi = std::max(whi, hi);
    maxlo = std::max(maxlo, lo);
    minhi = std::min(minhi, hi);
  }
  wlo = std::max(wlo, L0);
  whi = std::min(whi, L1 - 1);
  if (wlo > whi) return;
  const bool window_all = !has_empty;
  auto emit = [&](int64_t a, int64_t e, int64_t kb_first) {  // run [a, e] inclusive
    const int64_t len = e - a + 1;
    const int64_t np = (len + P.BK - 1) / P.BK;
    int64_t psize = (len + np - 1) / np;
    psize = std::min<int64_t>(P.BK, (psize + 15) / 16 * 16);
    for (int64_t j0 = a; j0 <= e; j0 += psize) {
      const int64_t j1 = std::min<int64_t>(j0 + psize, e + 1);
      Piece pc{j0, j1, false, false};
      pc.partial = !(window_all && maxlo <= j0 && minhi >= j1 - 1);
      if (P.km) {
        const int32_t* c = P.kmc.data() + t.b * (P.Sk + 1);
        const int64_t cnt = c[j1] - c[j0];
        if (cnt == 0) continue;
        if (cnt < j1 - j0) pc.partial = pc.need_cm = true;
      }
      if (P.bm) {
        for (int64_t kb = j0 / P.bs; kb <= (j1 - 1) / P.bs; ++kb)
          if (!all_buf[kb - kb_first]) pc.partial = pc.need_cm = true;
      }
      out.push_back(pc);
    }
  };
  if (!P.bm) {
    emit(wlo, whi, 0);
    return;
  }
  const int64_t kb0 = wlo / P.bs, kb1 = whi / P.bs;
  const int64_t qb0 = t.i0 / P.bs, qb1 = (t.i1 - 1) / P.bs;
  const int64_t nkb = kb1 - kb0 + 1;
  any_buf.assign(nkb, 0);
  all_buf.assign(nkb, 1);
  for (int64_t h = t.h0; h < t.h0 + t.nh; ++h)
    for (int64_t qb = qb0; qb <= qb1; ++qb)
      for (int64_t kb = kb0; kb <= kb1; ++kb) {
        const bool v = P.bmask(t.b, h, qb, kb);
        any_buf[kb - kb0] |= v;
        all_buf[kb - kb0] &= v;
      }
  int64_t kb = kb0;
  while (kb <= kb1) {
    if (!any_buf[kb - kb0]) {
      ++kb;
      continue;
    }
    int64_t ke = kb;
    while (ke + 1 <= kb1 && any_buf[ke + 1 - kb0]) ++ke;
    emit(std::max(wlo, kb * P.bs), std::min(whi, (ke + 1) * P.bs - 1), kb0);
    kb = ke + 1;
  }
}

// Column masks of a partial piece: one per (head, query block) group of the tile's rows.
template <typename Acc>
void piece_colmasks(const Problem& P, const Tile& t, const Piece& pc, std::vector<uint8_t>& buf,
                    std::vector<RowInfo<Acc>>& ri) {
  const int64_t n = pc.j1 - pc.j0, nr = t.nr();
  if (!pc.need_cm) {
    for (int64_t r = 0; r < t.rows(); ++r) ri[r].cm = nullptr;
    return;
  }
  const int64_t qb0 = P.bm ? t.i0 / P.bs : 0;
  const int64_t nqg = P.bm ? (t.i1 - 1) / P.bs - qb0 + 1 : 1;
  const int64_t ngrp = P.bm ? t.nh * nqg : 1;
  const int64_t ld = (n + 63) / 64 * 64;
  buf.resize(ngrp * ld);
  for (int64_t gi = 0; gi < ngrp; ++gi) {
    uint8_t* c = buf.data() + gi * ld;
    for (int64_t j = 0; j < n; ++j) c[j] = P.km ? P.kmask(t.b, pc.j0 + j) : 1;
    if (P.bm) {
      const int64_t h = t.h0 + gi / nqg, qb = qb0 + gi % nqg;
      for (int64_t j = 0; j < n;) {
        const int64_t kb = (pc.j0 + j) / P.bs;
        const int64_t jend = std::min<int64_t>(n, (kb + 1) * P.bs - pc.j0);
        if (!P.bmask(t.b, h, qb, kb)) std::memset(c + j, 0, jend - j);
        j = jend;
      }
    }
  }
  for (int64_t r = 0; r < t.rows(); ++r) {
    int64_t gi = 0;
    if (P.bm) gi = (r / nr) * nqg + ((t.i0 + r % nr) / P.bs - qb0);
    ri[r].cm = buf.data() + gi * ld;
  }
}

// Heaviest tiles first (dynamic scheduling then balances causal / windowed work).
std::vector<int64_t> tile_order(const Problem& P) {
  const int64_t nt = static_cast<int64_t>(P.qtiles.size());
  std::vector<int64_t> order(nt);
  std::vector<int64_t> cost(nt);
  for (int64_t t = 0; t < nt; ++t) {
    order[t] = t;
    const int64_t i0 = P.qtiles[t].first, i1 = P.qtiles[t].second - 1;
    cost[t] = std::max<int64_t>(0, P.hi(i1) - P.lo(i0) + 1);
  }
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return cost[a] > cost[b]; });
  return order;
}

// Runs f(item, thread_state) for items [0, n) over at::parallel_for threads, each thread
// taking the next item from a shared counter.
template <typename State, typename F>
void run_items(int64_t n, F&& f) {
  if (n <= 0) return;
  std::atomic<int64_t> next{0};
  const int64_t nt = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), n));
  at::parallel_for(0, nt, 1, [&](int64_t, int64_t) {
    MklSingleThread guard;
    FlushDenormals ftz;
    State st;
    for (;;) {
      const int64_t it = next.fetch_add(1, std::memory_order_relaxed);
      if (it >= n) break;
      f(it, st);
    }
  });
}

// ============================================================================ setup
at::Tensor rows_unit(const at::Tensor& t) {
  // the kernels need unit stride along D and row strides (BLAS leading dimensions) that fit
  // a 32-bit int; batch and head strides are used in 64-bit pointer arithmetic only
  const bool ok = (t.stride(-1) == 1 || t.size(-1) == 1) && (t.stride(2) >= t.size(3) || t.size(2) == 1) &&
                  t.stride(2) < (int64_t{1} << 30);
  return ok ? t : t.contiguous();
}

void setup_problem(Problem& P, const at::Tensor& q, const at::Tensor& k, double scale, int64_t wl, int64_t wr,
                   const c10::optional<at::Tensor>& alibi, const c10::optional<at::Tensor>& block_mask,
                   int64_t block_size, const c10::optional<at::Tensor>& key_mask, double softcap,
                   at::Tensor& bm_keep, at::Tensor& km_keep) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4, "attention: q, k, v must be 4-d (B, H, S, D)");
  P.B = q.size(0);
  P.Hq = q.size(1);
  P.Sq = q.size(2);
  P.D = q.size(3);
  P.Hkv = k.size(1);
  P.Sk = k.size(2);
  TORCH_CHECK(k.size(0) == P.B && k.size(3) == P.D && P.Hkv > 0 && P.Hq % P.Hkv == 0,
              "attention: k/v shapes do not match q");
  P.g = P.Hq / P.Hkv;
  P.scale = scale;
  P.softcap = softcap;
  P.wl = wl;
  P.wr = wr;
  P.off = P.Sk - P.Sq;
  if (alibi.has_value()) {
    const at::Tensor s = alibi->to(at::kDouble).expand({P.B, P.Hq}).contiguous();
    P.slopes.assign(s.data_ptr<double>(), s.data_ptr<double>() + P.B * P.Hq);
  }
  if (block_mask.has_value()) {
    TORCH_CHECK(block_size > 0, "attention: block_size must be positive");
    const int64_t nq = (P.Sq + block_size - 1) / block_size, nk = (P.Sk + block_size - 1) / block_size;
    bm_keep = block_mask->to(at::kBool).expand({P.B, P.Hq, nq, nk});
    P.bm = reinterpret_cast<const uint8_t*>(bm_keep.data_ptr<bool>());
    P.bm_sB = bm_keep.stride(0);
    P.bm_sH = bm_keep.stride(1);
    P.bm_sQ = bm_keep.stride(2);
    P.bm_sK = bm_keep.stride(3);
    P.bs = block_size;
  }
  if (key_mask.has_value()) {
    km_keep = key_mask->to(at::kBool).expand({P.B, P.Sk});
    P.km = reinterpret_cast<const uint8_t*>(km_keep.data_ptr<bool>());
    P.km_sB = km_keep.stride(0);
    P.km_sK = km_keep.stride(1);
    P.kmc.assign(P.B * (P.Sk + 1), 0);
    for (int64_t b = 0; b < P.B; ++b) {
      int32_t* c = P.kmc.data() + b * (P.Sk + 1);
      for (int64_t j = 0; j < P.Sk; ++j) c[j + 1] = c[j] + (P.kmask(b, j) ? 1 : 0);
    }
  }
}

template <typename Acc>
Cfg<Acc> make_cfg(const Problem& P) {
  Cfg<Acc> cf;
  cf.alibi = !P.slopes.empty();
  cf.softcap = P.softcap > 0;
  if (cf.softcap) {
    cf.inv_cap = static_cast<Acc>(1.0 / P.softcap);
    cf.capmul = static_cast<Acc>(P.softcap * kLog2e);
  }
  return cf;
}

template <typename Acc>
void fill_rows(const Problem& P, const Tile& t, std::vector<RowInfo<Acc>>& ri) {
  const int64_t nr = t.nr();
  ri.resize(t.rows());
  for (int64_t r = 0; r < t.rows(); ++r) {
    const int64_t h = t.h0 + r / nr, i = t.i0 + r % nr;
    RowInfo<Acc>& x = ri[r];
    x.pos = i + P.off;
    x.lo = P.lo(i);
    x.hi = P.hi(i);
    x.cm = nullptr;
    x.slope2 = P.slopes.empty() ? Acc(0) : static_cast<Acc>(P.slopes[t.b * P.Hq + h] * kLog2e);
  }
}

// A tile's rows of a (B, H, S, D) tensor as a matrix: a direct pointer when the tile is one
// head (rows at stride sS), else packed into `buf` (ld D).
template <typename T>
const T* tile_rows(const T* base, int64_t sB, int64_t sH, int64_t sS, const Tile& t, int64_t D, std::vector<T>& buf,
                   int64_t& ld) {
  if (t.nh == 1) {
    ld = sS;
    return base + t.b * sB + t.h0 * sH + t.i0 * sS;
  }
  const int64_t nr = t.nr();
  buf.resize(t.rows() * D);
  for (int64_t r = 0; r < t.rows(); ++r) {
    const T* src = base + t.b * sB + (t.h0 + r / nr) * sH + (t.i0 + r % nr) * sS;
    std::memcpy(buf.data() + r * D, src, sizeof(T) * D);
  }
  ld = D;
  return buf.data();
}

// ============================================================================ forward
template <typename T>
struct FwdState {
  using Acc = acc_t<T>;
  std::vector<Acc> S, acc, m, l;
  std::vector<T> P, qbuf;
  std::vector<RowInfo<Acc>> ri;
  std::vector<Piece> pieces;
  std::vector<uint8_t> cmbuf, any_buf, all_buf;
};

template <typename T>
void attention_fwd_impl(const Problem& P, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                        at::Tensor& out, at::Tensor& lse, const Isa& isa) {
  using Acc = acc_t<T>;
  const Gemm<T> gemm{isa.gemm};
  const Rows<Acc, T> rows{isa.avx512_rows};
  const Cfg<Acc> cf = make_cfg<Acc>(P);
  const Acc qk_alpha = static_cast<Acc>(P.scale * (cf.softcap ? 1.0 : kLog2e));
  const T* qp = q.const_data_ptr<T>();
  const T* kp = k.const_data_ptr<T>();
  const T* vp = v.const_data_ptr<T>();
  T* op = out.data_ptr<T>();
  float* lp = lse.data_ptr<float>();
  const int64_t qsB = q.stride(0), qsH = q.stride(1), qsS = q.stride(2);
  const int64_t ksB = k.stride(0), ksH = k.stride(1), ksS = k.stride(2);
  const int64_t vsB = v.stride(0), vsH = v.stride(1), vsS = v.stride(2);
  const int64_t D = P.D, BK = P.BK;
  const int64_t ldS = BK + 16;
  const std::vector<int64_t> order = tile_order(P);
  const int64_t ntile = static_cast<int64_t>(P.qtiles.size());

  auto tile_of = [&](int64_t item) {
    const int64_t tt = order[item % ntile];
    int64_t rest = item / ntile;
    const int64_t grp = rest % P.ngroups;
    rest /= P.ngroups;
    return P.tile(rest / P.Hkv, rest % P.Hkv, grp, tt);
  };
  // Online softmax of tile t over keys [L0, L1): leaves acc (unnormalised), m, l in st.
  auto compute = [&](const Tile& t, int64_t L0, int64_t L1, FwdState<T>& st) {
    const int64_t R = t.rows();
    st.S.resize(R * ldS);
    st.P.resize(R * ldS);
    st.acc.assign(R * D, Acc(0));
    st.m.assign(R, -std::numeric_limits<Acc>::infinity());
    st.l.assign(R, Acc(0));
    fill_rows<Acc>(P, t, st.ri);
    int64_t lda = 0;
    const T* A = tile_rows<T>(qp, qsB, qsH, qsS, t, D, st.qbuf, lda);
    tile_pieces(P, t, L0, L1, st.pieces, st.any_buf, st.all_buf);
    const T* kbase = kp + t.b * ksB + t.kvh * ksH;
    const T* vbase = vp + t.b * vsB + t.kvh * vsH;
    RowsArgs<Acc, T> ra;
    ra.rows = R;
    ra.ri = st.ri.data();
    ra.cf = &cf;
    ra.S = st.S.data();
    ra.ldS = ldS;
    ra.m = st.m.data();
    ra.l = st.l.data();
    ra.acc = st.acc.data();
    ra.ldacc = D;
    ra.D = D;
    ra.P = st.P.data();
    ra.ldP = ldS;
    // nearest keys first: with causal ALiBi the row max then comes with the first piece
    for (auto it = st.pieces.rbegin(); it != st.pieces.rend(); ++it) {
      const Piece& pc = *it;
      const int64_t n = pc.j1 - pc.j0;
      gemm(Op::NT, R, n, D, qk_alpha, A, lda, kbase + pc.j0 * ksS, ksS, Acc(0), st.S.data(), ldS);
      if (pc.partial) piece_colmasks<Acc>(P, t, pc, st.cmbuf, st.ri);
      ra.n = n;
      ra.j0 = pc.j0;
      ra.partial = pc.partial;
      rows.fwd(ra);
      gemm(Op::NN, R, D, n, Acc(1), ra.P, ldS, vbase + pc.j0 * vsS, vsS, Acc(1), st.acc.data(), D);
    }
  };
  // out = acc / l, lse = (m + log2 l) ln 2; a row without visible keys: zeros, -inf
  auto finish = [&](const Tile& t, const Acc* acc, const Acc* m, const Acc* l) {
    const int64_t nr = t.nr();
    for (int64_t r = 0; r < t.rows(); ++r) {
      const int64_t h = t.h0 + r / nr, i = t.i0 + r % nr;
      T* o = op + ((t.b * P.Hq + h) * P.Sq + i) * D;
      const Acc* a = acc + r * D;
      float* lo = lp + (t.b * P.Hq + h) * P.Sq + i;
      if (l[r] != Acc(0)) {  // (NaN: a NaN reached the row; it propagates)
        const Acc inv = Acc(1) / l[r];
        for (int64_t d = 0; d < D; ++d) o[d] = static_cast<T>(a[d] * inv);
        *lo = static_cast<float>((static_cast<double>(m[r]) + std::log2(static_cast<double>(l[r]))) * kLn2);
      } else {
        for (int64_t d = 0; d < D; ++d) o[d] = T(0);
        *lo = kNegInf;
      }
    }
  };

  // Few work items (decoding, one long head): split the keys too and merge the partial
  // softmaxes in a fixed order (flash-decoding). The split depends on the problem only, so
  // results do not depend on the thread count.
  const int64_t items = P.items_fwd();
  int64_t nsplit = 1;
  if (items < 64 && P.Sk >= 4 * BK) nsplit = std::min<int64_t>((64 + items - 1) / items, P.Sk / (2 * BK));
  nsplit = std::min<int64_t>(std::max<int64_t>(1, env_int("TRUTHGPT_ATTN_SPLITK", nsplit)), std::max<int64_t>(1, P.Sk));
  if (nsplit == 1) {
    run_items<FwdState<T>>(items, [&](int64_t item, FwdState<T>& st) {
      const Tile t = tile_of(item);
      compute(t, 0, P.Sk, st);
      finish(t, st.acc.data(), st.m.data(), st.l.data());
    });
    return;
  }
  int64_t rmax = 0;
  for (int64_t it = 0; it < std::min<int64_t>(items, ntile * P.ngroups); ++it) rmax = std::max(rmax, tile_of(it).rows());
  const int64_t slot = rmax * (D + 2);  // acc, m, l of one (item, split)
  std::vector<Acc> part(items * nsplit * slot);
  std::unique_ptr<std::atomic<int64_t>[]> done(new std::atomic<int64_t>[items]);
  for (int64_t it = 0; it < items; ++it) done[it].store(0);
  // One parallel region: the job finishing an item's last split merges that item's splits
  // (in split order, so the result does not depend on which thread merges).
  run_items<FwdState<T>>(items * nsplit, [&](int64_t job, FwdState<T>& st) {
    const int64_t item = job / nsplit, sp = job % nsplit;
    const Tile t = tile_of(item);
    const int64_t L0 = P.Sk * sp / nsplit, L1 = P.Sk * (sp + 1) / nsplit;
    compute(t, L0, L1, st);
    const int64_t R = t.rows();
    Acc* dst = part.data() + job * slot;
    std::copy(st.acc.begin(), st.acc.begin() + R * D, dst);
    std::copy(st.m.begin(), st.m.begin() + R, dst + rmax * D);
    std::copy(st.l.begin(), st.l.begin() + R, dst + rmax * (D + 1));
    if (done[item].fetch_add(1, std::memory_order_acq_rel) != nsplit - 1) return;
    st.acc.assign(R * D, Acc(0));
    st.m.assign(R, -std::numeric_limits<Acc>::infinity());
    st.l.assign(R, Acc(0));
    for (int64_t k2 = 0; k2 < nsplit; ++k2) {
      const Acc* src = part.data() + (item * nsplit + k2) * slot;
      for (int64_t r = 0; r < R; ++r) {
        const Acc ms = src[rmax * D + r], ls = src[rmax * (D + 1) + r];
        if (ls == Acc(0)) continue;  // no visible key in this split (NaN merges: it propagates)
        const Acc mn = max_nan(st.m[r], ms);
        const Acc a_old = std::exp2(st.m[r] - mn), a_new = std::exp2(ms - mn);
        st.l[r] = st.l[r] * a_old + ls * a_new;
        Acc* o = st.acc.data() + r * D;
        const Acc* x = src + r * D;
        for (int64_t d = 0; d < D; ++d) o[d] = o[d] * a_old + x[d] * a_new;
        st.m[r] = mn;
      }
    }
    finish(t, st.acc.data(), st.m.data(), st.l.data());
  });
}

// float16 operands as float32 (inner stride 1 kept; the kernels read the strides). The
// attention work is O(Sq Sk D) and this copy O((Sq + Sk) D), so float16 runs at the float32
// kernel's speed on every path (MKL / AVX-512 / portable), with P and dS kept in float32.
at::Tensor widen_half(const at::Tensor& t) { return rows_unit(t.to(at::kFloat)); }

std::tuple<at::Tensor, at::Tensor> attention_fwd(const at::Tensor& q_, const at::Tensor& k_, const at::Tensor& v_,
                                                 double scale, int64_t window_left, int64_t window_right,
                                                 const c10::optional<at::Tensor>& alibi_slopes,
                                                 const c10::optional<at::Tensor>& block_mask, int64_t block_size,
                                                 const c10::optional<at::Tensor>& key_mask, double softcap) {
  TORCH_CHECK(q_.scalar_type() == k_.scalar_type() && q_.scalar_type() == v_.scalar_type(),
              "attention: q, k, v must share a dtype");
  TORCH_CHECK(k_.sizes() == v_.sizes(), "attention: k and v must have the same shape");
  Problem P;
  at::Tensor bm_keep, km_keep;
  const at::Tensor q = rows_unit(q_), k = rows_unit(k_), v = rows_unit(v_);
  setup_problem(P, q, k, scale, window_left, window_right, alibi_slopes, block_mask, block_size, key_mask, softcap,
                bm_keep, km_keep);
  plan_tiles(P);
  at::Tensor out = at::empty({P.B, P.Hq, P.Sq, P.D}, q.options());
  at::Tensor lse = at::empty({P.B, P.Hq, P.Sq}, q.options().dtype(at::kFloat));
  if (out.numel() == 0) return {out, lse};
  switch (q.scalar_type()) {
    case at::kFloat: attention_fwd_impl<float>(P, q, k, v, out, lse, choose_isa<float>()); break;
    case at::kDouble: attention_fwd_impl<double>(P, q, k, v, out, lse, choose_isa<double>()); break;
    case at::kBFloat16: attention_fwd_impl<bf16>(P, q, k, v, out, lse, choose_isa<bf16>()); break;
    case at::kHalf: {  // float16: the float32 kernel on widened operands (see the header)
      at::Tensor of = at::empty(out.sizes(), out.options().dtype(at::kFloat));
      attention_fwd_impl<float>(P, widen_half(q), widen_half(k), widen_half(v), of, lse, choose_isa<float>());
      out.copy_(of);
      break;
    }
    default: TORCH_CHECK(false, "attention (cpu): dtype ", q.scalar_type(), " is not supported (float32, bfloat16, float16, float64)");
  }
  return {out, lse};
}

// ============================================================================ backward
template <typename T>
struct BwdState {
  using Acc = acc_t<T>;
  std::vector<Acc> S, dP, G, dq, dk, dv;
  std::vector<T> Pl, dSl, qbuf, dobuf;
  std::vector<RowInfo<Acc>> ri;
  std::vector<int64_t> one_key;  // per tile row: its only visible key, or -1
  std::vector<Piece> pieces;
  std::vector<uint8_t> cmbuf, any_buf, all_buf;
};

template <typename T>
struct BwdCtx {
  using Acc = acc_t<T>;
  const Problem* P;
  Gemm<T> gemm;
  Rows<Acc, T> rows;
  Cfg<Acc> cf;
  Acc qk_alpha, scale;
  const T *q, *k, *v, *dout, *out;
  int64_t qsB, qsH, qsS, ksB, ksH, ksS, vsB, vsH, vsS, dsB, dsH, dsS, osB, osH, osS;
  const float* lse;  // (B, Hq, Sq) contiguous
};

// The key a row sees when it sees exactly one, else -1 (none, or several). Such a row's
// softmax is the constant 1, so its dS is exactly 0: bwd_tile sets its delta to dP at that
// key (delta = rowsum(P dP) exactly, P being 1 there and 0 elsewhere), and dS = P (dP - delta)
// cancels bit for bit, whatever order the GEMM summed dP in. rowsum(dO O) would leave the
// rounding difference of two differently ordered sums (~1e-7 in dQ, dK). Costs O(1) per row
// (prefix counts of the key mask), plus a walk over the key blocks of the window with a block
// mask that stops at the second visible key.
int64_t single_visible_key(const Problem& P, int64_t b, int64_t h, int64_t i) {
  const int64_t lo = P.lo(i), hi = P.hi(i);
  if (lo > hi) return -1;
  const int32_t* kc = P.km ? P.kmc.data() + b * (P.Sk + 1) : nullptr;
  auto count = [&](int64_t a, int64_t e) { return kc ? int64_t{kc[e + 1] - kc[a]} : e - a + 1; };  // [a, e]
  auto first = [&](int64_t a, int64_t e) {  // the first visible key of [a, e] (which holds one)
    if (!kc) return a;
    while (a < e) {  // the first j with kc[j + 1] > kc[a_0]: binary search on the prefix counts
      const int64_t mid = a + (e - a) / 2;
      if (kc[mid + 1] - kc[a] > 0) e = mid; else a = mid + 1;
    }
    return a;
  };
  if (!P.bm) return count(lo, hi) == 1 ? first(lo, hi) : -1;
  int64_t total = 0, at = -1;
  for (int64_t kb = lo / P.bs; kb <= hi / P.bs && total < 2; ++kb) {
    if (!P.bmask(b, h, i / P.bs, kb)) continue;
    const int64_t a = std::max(lo, kb * P.bs), e = std::min(hi, (kb + 1) * P.bs - 1);
    const int64_t c = count(a, e);
    if (c == 1 && total == 0) at = first(a, e);
    total += c;
  }
  return total == 1 ? at : -1;
}

// Accumulates one tile's contributions over its pieces: dq (rows x D, if non-null), and
// dk/dv rows [j - kofs] (if non-null).
template <typename T>
void bwd_tile(const BwdCtx<T>& c, BwdState<T>& st, const Tile& t, int64_t L0, int64_t L1, acc_t<T>* dq,
              acc_t<T>* dk, acc_t<T>* dv, int64_t kofs) {
  using Acc = acc_t<T>;
  constexpr bool kLowP = !std::is_same<T, Acc>::value;
  const Problem& P = *c.P;
  tile_pieces(P, t, L0, L1, st.pieces, st.any_buf, st.all_buf);
  if (st.pieces.empty()) return;
  const int64_t R = t.rows(), nr = t.nr(), D = P.D, BK = P.BK;
  const int64_t ldS = BK + 16;
  st.S.resize(R * ldS);
  st.dP.resize(R * ldS);
  if (c.cf.softcap) st.G.resize(R * ldS);
  if (kLowP) {
    st.Pl.resize(R * ldS);
    st.dSl.resize(R * ldS);
  }
  fill_rows<Acc>(P, t, st.ri);
  st.one_key.resize(R);
  for (int64_t r = 0; r < R; ++r) {
    const int64_t h = t.h0 + r / nr, i = t.i0 + r % nr;
    const int64_t idx = (t.b * P.Hq + h) * P.Sq + i;
    const float l = c.lse[idx];
    st.ri[r].lse2 = std::isinf(l) && l < 0 ? -std::numeric_limits<Acc>::infinity() : static_cast<Acc>(l * kLog2e);
    // delta = rowsum(dO * O), in the accumulation precision (one-key rows: see below)
    const T* dor = c.dout + t.b * c.dsB + h * c.dsH + i * c.dsS;
    const T* orow = c.out + t.b * c.osB + h * c.osH + i * c.osS;
    Acc dl = 0;
    for (int64_t d = 0; d < D; ++d) dl += static_cast<Acc>(to_f(dor[d])) * static_cast<Acc>(to_f(orow[d]));
    st.ri[r].delta = dl;
    st.one_key[r] = single_visible_key(P, t.b, h, i);
  }
  int64_t lda = 0, ldo = 0;
  const T* A = tile_rows<T>(c.q, c.qsB, c.qsH, c.qsS, t, D, st.qbuf, lda);
  const T* dO = tile_rows<T>(c.dout, c.dsB, c.dsH, c.dsS, t, D, st.dobuf, ldo);
  const T* kbase = c.k + t.b * c.ksB + t.kvh * c.ksH;
  const T* vbase = c.v + t.b * c.vsB + t.kvh * c.vsH;
  RowsArgs<Acc, T> ra;
  ra.rows = R;
  ra.ri = st.ri.data();
  ra.cf = &c.cf;
  ra.S = st.S.data();
  ra.ldS = ldS;
  ra.dP = st.dP.data();
  ra.G = c.cf.softcap ? st.G.data() : nullptr;
  ra.P = kLowP ? st.Pl.data() : nullptr;
  ra.dSl = kLowP ? st.dSl.data() : nullptr;
  ra.ldP = ldS;
  const T* Pm = kLowP ? reinterpret_cast<const T*>(st.Pl.data()) : reinterpret_cast<const T*>(st.S.data());
  const T* dSm = kLowP ? reinterpret_cast<const T*>(st.dSl.data()) : reinterpret_cast<const T*>(st.dP.data());
  for (const Piece& pc : st.pieces) {
    const int64_t n = pc.j1 - pc.j0;
    const T* kp = kbase + pc.j0 * c.ksS;
    const T* vp = vbase + pc.j0 * c.vsS;
    c.gemm(Op::NT, R, n, D, c.qk_alpha, A, lda, kp, c.ksS, Acc(0), st.S.data(), ldS);
    if (pc.partial) piece_colmasks<Acc>(P, t, pc, st.cmbuf, st.ri);
    ra.n = n;
    ra.j0 = pc.j0;
    ra.partial = pc.partial;
    c.rows.bwd_p(ra);
    if (dv) c.gemm(Op::TN, n, D, R, Acc(1), Pm, ldS, dO, ldo, Acc(1), dv + (pc.j0 - kofs) * D, D);
    c.gemm(Op::NT, R, n, D, Acc(1), dO, ldo, vp, c.vsS, Acc(0), st.dP.data(), ldS);
    for (int64_t r = 0; r < R; ++r) {  // a row's only key is in this piece: delta = dP there
      const int64_t j = st.one_key[r];
      if (j >= pc.j0 && j < pc.j1) st.ri[r].delta = st.dP[r * ldS + (j - pc.j0)];
    }
    c.rows.bwd_ds(ra);
    if (dq) c.gemm(Op::NN, R, D, n, c.scale, dSm, ldS, kp, c.ksS, Acc(1), dq, D);
    if (dk) c.gemm(Op::TN, n, D, R, c.scale, dSm, ldS, A, lda, Acc(1), dk + (pc.j0 - kofs) * D, D);
  }
}

template <typename T>
void store_dq(const Problem& P, const Tile& t, const acc_t<T>* dq, T* out) {
  const int64_t nr = t.nr();
  for (int64_t r = 0; r < t.rows(); ++r) {
    const int64_t h = t.h0 + r / nr, i = t.i0 + r % nr;
    T* o = out + ((t.b * P.Hq + h) * P.Sq + i) * P.D;
    for (int64_t d = 0; d < P.D; ++d) o[d] = static_cast<T>(dq[r * P.D + d]);
  }
}

template <typename T>
void attention_bwd_impl(const Problem& P, const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k,
                        const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse, at::Tensor& dq,
                        at::Tensor& dk, at::Tensor& dv, const Isa& isa) {
  using Acc = acc_t<T>;
  BwdCtx<T> c{};
  c.P = &P;
  c.gemm = Gemm<T>{isa.gemm};
  c.rows = Rows<Acc, T>{isa.avx512_rows};
  c.cf = make_cfg<Acc>(P);
  c.qk_alpha = static_cast<Acc>(P.scale * (c.cf.softcap ? 1.0 : kLog2e));
  c.scale = static_cast<Acc>(P.scale);
  c.q = q.const_data_ptr<T>();
  c.k = k.const_data_ptr<T>();
  c.v = v.const_data_ptr<T>();
  c.dout = dout.const_data_ptr<T>();
  c.qsB = q.stride(0), c.qsH = q.stride(1), c.qsS = q.stride(2);
  c.ksB = k.stride(0), c.ksH = k.stride(1), c.ksS = k.stride(2);
  c.vsB = v.stride(0), c.vsH = v.stride(1), c.vsS = v.stride(2);
  c.dsB = dout.stride(0), c.dsH = dout.stride(1), c.dsS = dout.stride(2);
  c.out = out.const_data_ptr<T>();
  c.osB = out.stride(0), c.osH = out.stride(1), c.osS = out.stride(2);
  c.lse = lse.const_data_ptr<float>();
  T* dqp = dq.data_ptr<T>();
  T* dkp = dk.data_ptr<T>();
  T* dvp = dv.data_ptr<T>();
  const int64_t D = P.D, ntile = static_cast<int64_t>(P.qtiles.size());

  // One item per (batch, kv head) owns dK, dV and the dQ of its query heads: one pass.
  // With fewer such items than threads: dK/dV per key block, then dQ per query tile.
  const int64_t nthreads = at::get_num_threads();
  const int64_t n_single = P.B * P.Hkv;
  bool single = n_single >= 2 * nthreads || (n_single >= nthreads && n_single % nthreads == 0);
  const char* mode = std::getenv("TRUTHGPT_ATTN_BWD");
  if (mode && std::string(mode) == "single") single = true;
  if (mode && std::string(mode) == "split") single = false;

  auto write_kv = [&](int64_t b, int64_t kvh, int64_t j0, int64_t n, const Acc* dka, const Acc* dva) {
    T* ko = dkp + ((b * P.Hkv + kvh) * P.Sk + j0) * D;
    T* vo = dvp + ((b * P.Hkv + kvh) * P.Sk + j0) * D;
    for (int64_t x = 0; x < n * D; ++x) {
      ko[x] = static_cast<T>(dka[x]);
      vo[x] = static_cast<T>(dva[x]);
    }
  };

  if (single) {
    run_items<BwdState<T>>(n_single, [&](int64_t item, BwdState<T>& st) {
      const int64_t b = item / P.Hkv, kvh = item % P.Hkv;
      st.dk.assign(P.Sk * D, Acc(0));
      st.dv.assign(P.Sk * D, Acc(0));
      for (int64_t grp = 0; grp < P.ngroups; ++grp)
        for (int64_t tt = 0; tt < ntile; ++tt) {
          const Tile t = P.tile(b, kvh, grp, tt);
          st.dq.assign(t.rows() * D, Acc(0));
          bwd_tile<T>(c, st, t, 0, P.Sk, st.dq.data(), st.dk.data(), st.dv.data(), 0);
          store_dq<T>(P, t, st.dq.data(), dqp);
        }
      write_kv(b, kvh, 0, P.Sk, st.dk.data(), st.dv.data());
    });
    return;
  }
  const int64_t KB = P.BK;
  const int64_t nkb = (P.Sk + KB - 1) / KB;
  run_items<BwdState<T>>(P.B * P.Hkv * nkb, [&](int64_t item, BwdState<T>& st) {
    const int64_t kb = item % nkb, bh = item / nkb;
    const int64_t b = bh / P.Hkv, kvh = bh % P.Hkv;
    const int64_t j0 = kb * KB, j1 = std::min<int64_t>(j0 + KB, P.Sk);
    st.dk.assign((j1 - j0) * D, Acc(0));
    st.dv.assign((j1 - j0) * D, Acc(0));
    for (int64_t grp = 0; grp < P.ngroups; ++grp)
      for (int64_t tt = 0; tt < ntile; ++tt) {
        const Tile t = P.tile(b, kvh, grp, tt);
        bwd_tile<T>(c, st, t, j0, j1, nullptr, st.dk.data(), st.dv.data(), j0);
      }
    write_kv(b, kvh, j0, j1 - j0, st.dk.data(), st.dv.data());
  });
  const std::vector<int64_t> order = tile_order(P);
  run_items<BwdState<T>>(P.items_fwd(), [&](int64_t item, BwdState<T>& st) {
    const int64_t tt = order[item % ntile];
    int64_t rest = item / ntile;
    const int64_t grp = rest % P.ngroups;
    rest /= P.ngroups;
    const Tile t = P.tile(rest / P.Hkv, rest % P.Hkv, grp, tt);
    st.dq.assign(t.rows() * D, Acc(0));
    bwd_tile<T>(c, st, t, 0, P.Sk, st.dq.data(), nullptr, nullptr, 0);
    store_dq<T>(P, t, st.dq.data(), dqp);
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_bwd(
    const at::Tensor& grad_out_, const at::Tensor& q_, const at::Tensor& k_, const at::Tensor& v_,
    const at::Tensor& out_, const at::Tensor& lse_, double scale, int64_t window_left, int64_t window_right,
    const c10::optional<at::Tensor>& alibi_slopes, const c10::optional<at::Tensor>& block_mask, int64_t block_size,
    const c10::optional<at::Tensor>& key_mask, double softcap) {
  TORCH_CHECK(q_.scalar_type() == k_.scalar_type() && q_.scalar_type() == v_.scalar_type(),
              "attention: q, k, v must share a dtype");
  Problem P;
  at::Tensor bm_keep, km_keep;
  const at::Tensor q = rows_unit(q_), k = rows_unit(k_), v = rows_unit(v_);
  const at::Tensor dout = rows_unit(grad_out_.to(q.scalar_type()));
  setup_problem(P, q, k, scale, window_left, window_right, alibi_slopes, block_mask, block_size, key_mask, softcap,
                bm_keep, km_keep);
  plan_tiles(P);
  at::Tensor dq = at::empty({P.B, P.Hq, P.Sq, P.D}, q.options());
  at::Tensor dk = at::empty({P.B, P.Hkv, P.Sk, P.D}, k.options());
  at::Tensor dv = at::empty({P.B, P.Hkv, P.Sk, P.D}, v.options());
  if (dq.numel() == 0 || dk.numel() == 0) {
    dq.zero_();
    dk.zero_();
    dv.zero_();
    return {dq, dk, dv};
  }
  // (no torch ops with intra-op threads in here: on a busy machine each one costs milliseconds)
  const at::Tensor lse = lse_.scalar_type() == at::kFloat && lse_.is_contiguous() ? lse_ : lse_.to(at::kFloat).contiguous();
  const at::Tensor out = rows_unit(out_.to(q.scalar_type()));
  switch (q.scalar_type()) {
    case at::kFloat: attention_bwd_impl<float>(P, dout, q, k, v, out, lse, dq, dk, dv, choose_isa<float>()); break;
    case at::kDouble: attention_bwd_impl<double>(P, dout, q, k, v, out, lse, dq, dk, dv, choose_isa<double>()); break;
    case at::kBFloat16: attention_bwd_impl<bf16>(P, dout, q, k, v, out, lse, dq, dk, dv, choose_isa<bf16>()); break;
    case at::kHalf: {
      at::Tensor dqf = at::empty(dq.sizes(), dq.options().dtype(at::kFloat));
      at::Tensor dkf = at::empty(dk.sizes(), dk.options().dtype(at::kFloat));
      at::Tensor dvf = at::empty(dv.sizes(), dv.options().dtype(at::kFloat));
      attention_bwd_impl<float>(P, widen_half(dout), widen_half(q), widen_half(k), widen_half(v), widen_half(out),
                                lse, dqf, dkf, dvf, choose_isa<float>());
      dq.copy_(dqf);
      dk.copy_(dkf);
      dv.copy_(dvf);
      break;
    }
    default: TORCH_CHECK(false, "attention (cpu): dtype ", q.scalar_type(), " is not supported (float32, bfloat16, float16, float64)");
  }
  return {dq, dk, dv};
}

}  // namespace

TORCH_LIBRARY_IMPL(truthgpt, CPU, m) {
  m.impl("attention_fwd", &attention_fwd);
  m.impl("attention_bwd", &attention_bwd);
}

}  // namespace truthgpt
