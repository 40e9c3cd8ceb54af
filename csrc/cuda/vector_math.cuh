// Vector-width choice shared by the elementwise-style kernels: a kernel moves V contiguous
// elements per load/store (V * element size <= 16 bytes) only when every address it forms is a
// multiple of V elements. Host and device code (TG_HD), so the CPU extension can test it.
#pragma once
#include <cstdint>

#include "common/host_device.h"

// `#pragma unroll` for nvcc; nothing for a host compiler (which would warn about it).
#if defined(__CUDACC__)
#define TG_UNROLL _Pragma("unroll")
#else
#define TG_UNROLL
#endif

namespace truthgpt::cuda::vec {

constexpr int kMaxBytes = 16;  // one 128-bit load/store

// The widest power-of-two V <= kMaxBytes / elem_size that passes `ok(V)`, else 1.
template <typename Ok>
TG_HD int widest(int elem_size, Ok ok) {
  for (int v = kMaxBytes / elem_size; v > 1; v /= 2)
    if (ok(v)) return v;
  return 1;
}

// A pointer whose V-element loads are aligned.
TG_HD bool aligned(const void* p, int v, int elem_size) {
  return reinterpret_cast<uintptr_t>(p) % static_cast<uintptr_t>(v * elem_size) == 0;
}

// A stride (in elements) that keeps V-element groups aligned; size-1 dims never use theirs.
TG_HD bool stride_ok(int64_t stride, int64_t size, int v) { return size <= 1 || stride % v == 0; }

}  // namespace truthgpt::cuda::vec
