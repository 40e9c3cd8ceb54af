// Pieces shared by the row-norm CUDA kernels (layer_norm.cu, rms_norm.cu): the team sum, the
// optional-parameter loads, the deterministic reduction of the backward's partial parameter
// gradients (each team of threads accumulates the rows it owns, in row order, into its own
// float32 row of partial sums; sum_kernel adds those rows in a fixed order), and the
// launch helpers. Geometry in rms_norm_math.cuh. In an anonymous namespace: each kernel file
// gets its own copy, as when these lived in the files.
#pragma once
#include "pack.cuh"
#include "rms_norm_math.cuh"

namespace truthgpt::cuda::norm {
namespace {

// Partial-sum accumulators in shared memory, at most: the 48 KiB a launch may take without
// opting in, less the backward kernels' static team-sum buffer (red[kMaxTeams * 32]): the
// limit counts static and dynamic shared memory together (a 16-bit LayerNorm backward at
// n = 768 asked for exactly 48 KiB of accumulators and failed to launch).
constexpr size_t kSmemAccBytes = 48 * 1024 - rms::kMaxTeams * 32 * sizeof(float);

// Sum of v over the tpr = blockDim.x threads of this thread's team (threadIdx.y), in a fixed
// order. Every thread of the block must call it (it synchronises when a team spans warps).
__device__ __forceinline__ float team_sum(float v, float* red) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  if (blockDim.x == 32) return v;
  float* mine = red + threadIdx.y * 32;
  if ((threadIdx.x & 31) == 0) mine[threadIdx.x >> 5] = v;
  __syncthreads();
  float s = 0.f;
  for (int w = 0; w < static_cast<int>(blockDim.x >> 5); ++w) s += mine[w];
  __syncthreads();
  return s;
}

// V elements of an optional parameter at col (fill when absent)
template <int V, typename W, bool Has>
__device__ __forceinline__ void load_param(const W* __restrict__ p, int64_t col, float fill,
                                           float (&out)[V]) {
  if constexpr (Has) {
    load_floats<V>(p + col, out);
  } else {
#pragma unroll
    for (int i = 0; i < V; ++i) out[i] = fill;
  }
}

template <int V>
__device__ __forceinline__ void add_floats(float* p, const float (&v)[V]) {
  Pack<float, V> a = *reinterpret_cast<Pack<float, V>*>(p);
#pragma unroll
  for (int i = 0; i < V; ++i) a.v[i] += v[i];
  *reinterpret_cast<Pack<float, V>*>(p) = a;
}

// out[c] = sum over teams t of partial[t, c]: thread (x, y) of a 32 x 32 block sums the
// teams y, y + 32, ... of column c, then the 32 sums are added in y order. Fixed order.
constexpr int kRedCols = 32, kRedRows = 32;

template <typename W>
__global__ void sum_kernel(int64_t teams, int64_t n, const float* __restrict__ partial,
                           W* __restrict__ out) {
  __shared__ float sums[kRedRows][kRedCols + 1];
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kRedCols + threadIdx.x;
  float s = 0.f;
  if (c < n)
    for (int64_t t = threadIdx.y; t < teams; t += kRedRows) s += partial[t * n + c];
  sums[threadIdx.y][threadIdx.x] = s;
  __syncthreads();
  if (threadIdx.y == 0 && c < n) {
    float total = 0.f;
    for (int r = 0; r < kRedRows; ++r) total += sums[r][threadIdx.x];
    out[c] = from_float<W>(total);
  }
}

// Launches sum_kernel (n > 0).
template <typename W>
void launch_sum(int64_t teams, int64_t n, const float* partial, W* out, cudaStream_t stream) {
  const unsigned blocks = static_cast<unsigned>((n + kRedCols - 1) / kRedCols);
  sum_kernel<W><<<blocks, dim3(kRedCols, kRedRows), 0, stream>>>(teams, n, partial, out);
}

// Calls f.template operator()<V>() with V = 1 or 16 bytes of T.
template <typename T, typename F>
cudaError_t dispatch_full_or_scalar(int v, F&& f) {
  constexpr int kMax = vec::kMaxBytes / sizeof(T);
  if (v == kMax) return f.template operator()<kMax>();
  if (v == 1) return f.template operator()<1>();
  return cudaErrorInvalidValue;
}

unsigned grid_rows(int64_t rows, int rpb) {
  const int64_t blocks = (rows + rpb - 1) / rpb;
  return static_cast<unsigned>(blocks < (1 << 20) ? blocks : (1 << 20));
}

// Completes a backward plan (RmsBwdPlan, LnBwdPlan) whose geo and smem_bytes are set: as many
// blocks as are resident at once (occupancy(&per_sm) asks for the kernel's blocks per SM), at
// most one per rpb rows, and their teams.
template <typename Plan, typename F>
cudaError_t finish_bwd_plan(int64_t rows, Plan* plan, F&& occupancy) {
  const int64_t wanted = (rows + plan->geo.rpb - 1) / plan->geo.rpb;
  int device = 0, sms = 0, per_sm = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  if (err != cudaSuccess) return err;
  err = occupancy(&per_sm);
  if (err != cudaSuccess) return err;
  const int64_t resident = static_cast<int64_t>(sms) * (per_sm > 0 ? per_sm : 1);
  plan->blocks = wanted < resident ? (wanted > 0 ? wanted : 1) : resident;
  plan->teams = plan->blocks * plan->geo.rpb;
  return cudaSuccess;
}

}  // namespace
}  // namespace truthgpt::cuda::norm
