// Shared declarations of the CPU attention kernel (csrc/cpu/attention.cpp and its parts):
// headers, the x86 target-attribute macros, the bf16 alias and the log2/ln constants.
// The parts, in include order (each under ~600 lines, all compiled into attention.cpp's one
// translation unit, so the split changes no generated code):
//   attention_gemm.h      tile GEMMs and their runtime dispatch (MKL symbols, AVX-512 and
//                         AVX512-BF16 micro-kernels, portable)
//   attention_rows.h      row transforms (softcap, ALiBi, masks) and the online softmax
//   attention_rows_avx2.h the same rows on AVX2+FMA, and the row-path dispatch (`Rows`)
//   attention_schedule.h  the work-item schedule: tiles, visible key runs, work order, setup
//   attention_extras.h    rel_bias and Philox dropout, as passes beside the row kernels
//   attention.cpp         the forward and backward drivers and the op registration
#pragma once
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
#define TK_AVX2 __attribute__((target("avx2,fma")))
#define TK_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma")))
#define TK_AVX512BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma,avx512bf16")))
#else
#define TK_X86 0
#endif

namespace truthgpt {
namespace {  // internal to the CPU attention kernel (one translation unit: attention.cpp)

using bf16 = c10::BFloat16;

// The flags a row kernel is instantiated for: partial tile (column mask), ALiBi, softcap.
template <bool M, bool A, bool S>
struct RowFlags {
  static constexpr bool mask = M, alibi = A, softcap = S;
};

// The one switch over the 8 RowFlags: `pick(RowFlags<...>{})` returns that instantiation of a
// row kernel family (every family's pick_* goes through here).
template <typename Pick>
auto pick_row_kernel(bool mask, bool alibi, bool softcap, Pick pick) {
  switch ((mask ? 4 : 0) | (alibi ? 2 : 0) | (softcap ? 1 : 0)) {
    case 0: return pick(RowFlags<false, false, false>{});
    case 1: return pick(RowFlags<false, false, true>{});
    case 2: return pick(RowFlags<false, true, false>{});
    case 3: return pick(RowFlags<false, true, true>{});
    case 4: return pick(RowFlags<true, false, false>{});
    case 5: return pick(RowFlags<true, false, true>{});
    case 6: return pick(RowFlags<true, true, false>{});
    default: return pick(RowFlags<true, true, true>{});
  }
}
constexpr double kLog2e = 1.4426950408889634;
constexpr double kLn2 = 0.6931471805599453;

}  // namespace
}  // namespace truthgpt
