// Launch geometry, work partition and per-element math of the RMSNorm CUDA kernels
// (csrc/cuda/rms_norm.cu), for host and device (TG_HD), so the CPU extension can test them
// (csrc/testing/rms_norm.cpp).
//
// A "team" of `tpr` threads (a multiple of 32) handles one row at a time; a block holds `rpb`
// teams (blockDim = (tpr, rpb)). Thread t of a team owns the vectors t, t + tpr, t + 2 tpr, ...
// of V contiguous elements of the row (columns v V .. v V + V - 1). Team j of block b handles the
// rows b rpb + j, b rpb + j + grid rpb, ... (a grid-stride loop over rows), so that in the
// backward each team accumulates the dweight contributions of a fixed set of rows, in row
// order, for the columns its threads own: no atomics, and the team's partial sums go to row
// (b rpb + j) of a float32 (teams, n) buffer, summed over teams in index order by a second
// kernel. The result is reproducible run to run on a given device (the team count depends only on
// the shape and the device's SM count and occupancy).
#pragma once
#include <cmath>
#include <cstdint>

#include "common/host_device.h"
#include "vector_math.cuh"

namespace truthgpt::cuda::rms {

constexpr int kMinBlockThreads = 256;
constexpr int kMaxTeamThreads = 1024;
constexpr int kMaxTeams = kMinBlockThreads / 32;  // teams per block, at most

struct Geometry {
  int vec;  // V
  int tpr;  // threads per row (team size), a multiple of 32
  int rpb;  // rows (teams) per block
};

TG_HD int64_t next_pow2(int64_t x) {
  int64_t p = 1;
  while (p < x) p *= 2;
  return p;
}

// About 4 vectors per thread, teams of 32..1024 threads, blocks of at least 256 threads.
TG_HD Geometry geometry(int64_t n, int v) {
  Geometry g;
  g.vec = v;
  const int64_t per_thread = 4;
  const int64_t want = next_pow2((n / v + per_thread - 1) / per_thread);
  g.tpr = static_cast<int>(want < 32 ? 32 : (want > kMaxTeamThreads ? kMaxTeamThreads : want));
  g.rpb = g.tpr >= kMinBlockThreads ? 1 : kMinBlockThreads / g.tpr;
  return g;
}

// V = 16 bytes of x's element type (elem_size) when n and the row strides are multiples of V and
// every pointer is V-aligned, else 1 (the kernels are built for these two widths only). Pointer
// ptrs[i] holds elements of elem_sizes[i] bytes (the weight may be float32 while x is 16-bit);
// null pointers are ignored.
TG_HD int pick_vec(int elem_size, int64_t rows, int64_t n, const void* const* ptrs,
                   const int* elem_sizes, const int64_t* row_strides, int count) {
  const int v = vec::kMaxBytes / elem_size;
  if (n % v) return 1;
  for (int i = 0; i < count; ++i) {
    if (ptrs[i] == nullptr) continue;
    if (!vec::aligned(ptrs[i], v, elem_sizes[i]) || !vec::stride_ok(row_strides[i], rows, v))
      return 1;
  }
  return v;
}

// Rows of team `team` (= block * rpb + j): team, team + teams, team + 2 teams, ...
TG_HD int64_t first_row(int64_t block, int j, int rpb) { return block * rpb + j; }
TG_HD int64_t row_step(int64_t grid, int rpb) { return grid * rpb; }

// Columns of vector k (k = t, t + tpr, ...) of a team's thread t.
TG_HD int64_t vec_begin(int64_t k, int v) { return k * v; }

TG_HD float rstd(float sum_squares, int64_t n, float eps) {
  return 1.f / sqrtf(sum_squares / static_cast<float>(n) + eps);
}

// y = x r w (w = 1 without a weight)
TG_HD float fwd(float x, float r, float w) { return x * r * w; }

// dx = r (dy w - x c), c = r^2 mean(dy w x) = coef(r, sum(dy w x), n)
TG_HD float coef(float r, float dot, int64_t n) { return r * r * dot / static_cast<float>(n); }
TG_HD float dx(float x, float dyw, float r, float c) { return r * (dyw - x * c); }
TG_HD float dw_term(float dy, float x, float r) { return dy * x * r; }

}  // namespace truthgpt::cuda::rms
