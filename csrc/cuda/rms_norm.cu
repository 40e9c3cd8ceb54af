// RMSNorm CUDA kernels. Forward: y = x rstd w, rstd = rsqrt(mean(x^2) + eps) saved as float32.
// Backward: dx = rstd (dy w - x rstd^2 mean(dy w x)), and dweight = sum over rows of dy x rstd,
// reduced deterministically: each team of threads accumulates the rows it owns, in row order,
// into its own float32 row of partial sums (shared memory, copied out at the end, or for long
// rows directly in global memory), and a second kernel sums those rows in a fixed order.
// fp32 math; V-wide (128-bit) accesses when aligned; 64-bit indices. Geometry and per-element
// math in rms_norm_math.cuh.
#include "pack.cuh"
#include "rms_norm.h"

namespace truthgpt::cuda {
namespace {

constexpr size_t kSmemAccBytes = 48 * 1024;  // dweight accumulators in shared memory, at most

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

template <int V, typename W, bool HasW>
__device__ __forceinline__ void load_weight(const W* __restrict__ w, int64_t col, float (&out)[V]) {
  if constexpr (HasW) {
    load_floats<V>(w + col, out);
  } else {
#pragma unroll
    for (int i = 0; i < V; ++i) out[i] = 1.f;
  }
}

template <typename T, typename W, int V, bool HasW>
__global__ void rms_fwd_kernel(int64_t rows, int64_t n, const T* __restrict__ x, int64_t xs,
                               const W* __restrict__ w, T* __restrict__ y, int64_t ys,
                               float* __restrict__ rstd, float eps) {
  __shared__ float red[rms::kMaxTeams * 32];
  const int tpr = blockDim.x, rpb = blockDim.y;
  const int64_t nv = n / V;
  const int64_t step = rms::row_step(gridDim.x, rpb);
  for (int64_t base = rms::first_row(blockIdx.x, 0, rpb); base < rows; base += step) {  // uniform
    const int64_t row = base + threadIdx.y;
    const bool active = row < rows;
    float ss = 0.f;
    if (active) {
      const T* xr = x + row * xs;
#pragma unroll 4
      for (int64_t k = threadIdx.x; k < nv; k += tpr) {
        float e[V];
        load_floats<V>(xr + rms::vec_begin(k, V), e);
#pragma unroll
        for (int i = 0; i < V; ++i) ss += e[i] * e[i];
      }
    }
    ss = team_sum(ss, red);
    if (active) {
      const float r = rms::rstd(ss, n, eps);
      if (threadIdx.x == 0) rstd[row] = r;
      const T* xr = x + row * xs;
      T* yr = y + row * ys;
#pragma unroll 4
      for (int64_t k = threadIdx.x; k < nv; k += tpr) {
        const int64_t col = rms::vec_begin(k, V);
        float e[V], wv[V], o[V];
        load_floats<V>(xr + col, e);
        load_weight<V, W, HasW>(w, col, wv);
#pragma unroll
        for (int i = 0; i < V; ++i) o[i] = rms::fwd(e[i], r, wv[i]);
        store_floats<V>(yr + col, o);
      }
    }
  }
}

template <int V>
__device__ __forceinline__ void add_floats(float* p, const float (&v)[V]) {
  Pack<float, V> a = *reinterpret_cast<Pack<float, V>*>(p);
#pragma unroll
  for (int i = 0; i < V; ++i) a.v[i] += v[i];
  *reinterpret_cast<Pack<float, V>*>(p) = a;
}

template <typename T, typename W, int V, bool HasW, bool SmemAcc>
__global__ void rms_bwd_kernel(int64_t rows, int64_t n, const T* __restrict__ dy, int64_t dys,
                               const T* __restrict__ x, int64_t xs, const W* __restrict__ w,
                               const float* __restrict__ rstd, T* __restrict__ dx, int64_t dxs,
                               float* __restrict__ partial) {
  __shared__ float red[rms::kMaxTeams * 32];
  extern __shared__ __align__(32) float acc_smem[];
  const int tpr = blockDim.x, rpb = blockDim.y;
  const int64_t nv = n / V;
  const int64_t team = rms::first_row(blockIdx.x, threadIdx.y, rpb);
  // This team's dweight accumulators; each thread touches only the columns it owns.
  float* acc = nullptr;
  if constexpr (HasW) {
    acc = SmemAcc ? acc_smem + static_cast<int64_t>(threadIdx.y) * n : partial + team * n;
    for (int64_t k = threadIdx.x; k < nv; k += tpr) {
      const float zero[V] = {};
      store_floats<V>(acc + rms::vec_begin(k, V), zero);
    }
  }
  const int64_t step = rms::row_step(gridDim.x, rpb);
  for (int64_t base = rms::first_row(blockIdx.x, 0, rpb); base < rows; base += step) {  // uniform
    const int64_t row = base + threadIdx.y;
    const bool active = row < rows;
    float dot = 0.f;
    if (active) {
      const T* dyr = dy + row * dys;
      const T* xr = x + row * xs;
#pragma unroll 4
      for (int64_t k = threadIdx.x; k < nv; k += tpr) {
        const int64_t col = rms::vec_begin(k, V);
        float g[V], e[V], wv[V];
        load_floats<V>(dyr + col, g);
        load_floats<V>(xr + col, e);
        load_weight<V, W, HasW>(w, col, wv);
#pragma unroll
        for (int i = 0; i < V; ++i) dot += g[i] * wv[i] * e[i];
      }
    }
    dot = team_sum(dot, red);
    if (active) {
      const float r = rstd[row];
      const float c = rms::coef(r, dot, n);
      const T* dyr = dy + row * dys;
      const T* xr = x + row * xs;
      T* dxr = dx + row * dxs;
#pragma unroll 4
      for (int64_t k = threadIdx.x; k < nv; k += tpr) {
        const int64_t col = rms::vec_begin(k, V);
        float g[V], e[V], wv[V], o[V];
        load_floats<V>(dyr + col, g);
        load_floats<V>(xr + col, e);
        load_weight<V, W, HasW>(w, col, wv);
#pragma unroll
        for (int i = 0; i < V; ++i) o[i] = rms::dx(e[i], g[i] * wv[i], r, c);
        store_floats<V>(dxr + col, o);
        if constexpr (HasW) {
          float t[V];
#pragma unroll
          for (int i = 0; i < V; ++i) t[i] = rms::dw_term(g[i], e[i], r);
          add_floats<V>(acc + col, t);
        }
      }
    }
  }
  if constexpr (HasW && SmemAcc) {
    for (int64_t k = threadIdx.x; k < nv; k += tpr) {
      const int64_t col = rms::vec_begin(k, V);
      *reinterpret_cast<Pack<float, V>*>(partial + team * n + col) =
          *reinterpret_cast<const Pack<float, V>*>(acc + col);
    }
  }
}

// dweight[c] = sum over teams t of partial[t, c]: thread (x, y) of a 32 x 32 block sums the
// teams y, y + 32, ... of column c, then the 32 sums are added in y order. Fixed order.
constexpr int kRedCols = 32, kRedRows = 32;

template <typename W>
__global__ void rms_dw_kernel(int64_t teams, int64_t n, const float* __restrict__ partial,
                              W* __restrict__ dw) {
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
    dw[c] = from_float<W>(total);
  }
}

// Calls f.template operator()<T, W, HasW>() for x's dtype and the weight's.
template <typename F>
cudaError_t dispatch_types(DType dtype, const RmsWeight& w, F&& f) {
  return dispatch_dtype(dtype, [&]<typename T>() -> cudaError_t {
    if (w.ptr == nullptr) return f.template operator()<T, T, false>();
    if (w.dtype == DType::F32) return f.template operator()<T, float, true>();
    if (w.dtype == dtype) return f.template operator()<T, T, true>();
    return cudaErrorInvalidValue;
  });
}

// Calls f.template operator()<V>() with V = 1 or 16 bytes of T.
template <typename T, typename F>
cudaError_t dispatch_full_or_scalar(int v, F&& f) {
  constexpr int kMax = vec::kMaxBytes / sizeof(T);
  if (v == kMax) return f.template operator()<kMax>();
  if (v == 1) return f.template operator()<1>();
  return cudaErrorInvalidValue;
}

int weight_size(const RmsWeight& w) { return w.ptr ? element_size(w.dtype) : 1; }

unsigned grid_rows(int64_t rows, int rpb) {
  const int64_t blocks = (rows + rpb - 1) / rpb;
  return static_cast<unsigned>(blocks < (1 << 20) ? blocks : (1 << 20));
}

}  // namespace

cudaError_t rms_norm_fwd(DType dtype, int64_t rows, int64_t n, Rows x, RmsWeight w, Rows y,
                         float* rstd, float eps, cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  const void* ptrs[] = {x.ptr, y.ptr, w.ptr};
  const int sizes[] = {element_size(dtype), element_size(dtype), weight_size(w)};
  const int64_t strides[] = {x.row_stride, y.row_stride, 0};
  const int v = rms::pick_vec(element_size(dtype), rows, n, ptrs, sizes, strides, 3);
  const rms::Geometry geo = rms::geometry(n, v);
  return dispatch_types(dtype, w, [&]<typename T, typename W, bool HasW>() {
    return dispatch_full_or_scalar<T>(v, [&]<int V>() {
      rms_fwd_kernel<T, W, V, HasW><<<grid_rows(rows, geo.rpb), dim3(geo.tpr, geo.rpb), 0, stream>>>(
          rows, n, static_cast<const T*>(x.ptr), x.row_stride, static_cast<const W*>(w.ptr),
          static_cast<T*>(y.ptr), y.row_stride, rstd, eps);
      return cudaGetLastError();
    });
  });
}

namespace {

int bwd_vec(DType dtype, int64_t rows, int64_t n, Rows grad, Rows x, RmsWeight w, Rows dx) {
  const void* ptrs[] = {grad.ptr, x.ptr, dx.ptr, w.ptr};
  const int es = element_size(dtype);
  const int sizes[] = {es, es, es, weight_size(w)};
  const int64_t strides[] = {grad.row_stride, x.row_stride, dx.row_stride, 0};
  return rms::pick_vec(es, rows, n, ptrs, sizes, strides, 4);
}

// Calls f(kernel) with the backward kernel of these types and width.
template <typename T, typename W, int V, bool HasW, typename F>
cudaError_t with_bwd_kernel(bool smem_acc, F&& f) {
  if constexpr (HasW) {
    if (smem_acc) return f(rms_bwd_kernel<T, W, V, true, true>);
  }
  return f(rms_bwd_kernel<T, W, V, HasW, false>);
}

}  // namespace

cudaError_t rms_norm_bwd_plan(DType dtype, int64_t rows, int64_t n, Rows grad, Rows x,
                              RmsWeight w, Rows dx, RmsBwdPlan* plan) {
  const int v = bwd_vec(dtype, rows, n, grad, x, w, dx);
  plan->geo = rms::geometry(n, v);
  const size_t acc_bytes = static_cast<size_t>(plan->geo.rpb) * n * sizeof(float);
  plan->smem_bytes = (w.ptr && acc_bytes <= kSmemAccBytes) ? acc_bytes : 0;
  const int64_t wanted = (rows + plan->geo.rpb - 1) / plan->geo.rpb;
  int device = 0, sms = 0, per_sm = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  if (err != cudaSuccess) return err;
  err = dispatch_types(dtype, w, [&]<typename T, typename W, bool HasW>() {
    return dispatch_full_or_scalar<T>(v, [&]<int V>() {
      return with_bwd_kernel<T, W, V, HasW>(plan->smem_bytes > 0, [&](auto kernel) {
        return cudaOccupancyMaxActiveBlocksPerMultiprocessor(
            &per_sm, kernel, plan->geo.tpr * plan->geo.rpb, plan->smem_bytes);
      });
    });
  });
  if (err != cudaSuccess) return err;
  const int64_t resident = static_cast<int64_t>(sms) * (per_sm > 0 ? per_sm : 1);
  plan->blocks = wanted < resident ? (wanted > 0 ? wanted : 1) : resident;
  plan->teams = plan->blocks * plan->geo.rpb;
  return cudaSuccess;
}

cudaError_t rms_norm_bwd(DType dtype, int64_t rows, int64_t n, Rows grad, Rows x, RmsWeight w,
                         const float* rstd, Rows dx, void* dweight, float* partial,
                         const RmsBwdPlan& plan, cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  const int v = plan.geo.vec;
  if (v != bwd_vec(dtype, rows, n, grad, x, w, dx)) return cudaErrorInvalidValue;  // stale plan
  cudaError_t err = dispatch_types(dtype, w, [&]<typename T, typename W, bool HasW>() {
    return dispatch_full_or_scalar<T>(v, [&]<int V>() {
      return with_bwd_kernel<T, W, V, HasW>(plan.smem_bytes > 0, [&](auto kernel) {
        kernel<<<static_cast<unsigned>(plan.blocks), dim3(plan.geo.tpr, plan.geo.rpb),
                 plan.smem_bytes, stream>>>(
            rows, n, static_cast<const T*>(grad.ptr), grad.row_stride,
            static_cast<const T*>(x.ptr), x.row_stride, static_cast<const W*>(w.ptr), rstd,
            static_cast<T*>(dx.ptr), dx.row_stride, partial);
        return cudaGetLastError();
      });
    });
  });
  if (err != cudaSuccess || w.ptr == nullptr || n == 0) return err;
  const unsigned blocks = static_cast<unsigned>((n + kRedCols - 1) / kRedCols);
  return dispatch_dtype(w.dtype, [&]<typename W>() {
    rms_dw_kernel<W><<<blocks, dim3(kRedCols, kRedRows), 0, stream>>>(
        plan.teams, n, partial, static_cast<W*>(dweight));
    return cudaGetLastError();
  });
}

}  // namespace truthgpt::cuda
