// RMSNorm CUDA kernels. Forward: y = x rstd w, rstd = rsqrt(mean(x^2) + eps) saved as float32.
// Backward: dx = rstd (dy w - x rstd^2 mean(dy w x)), and dweight = sum over rows of dy x rstd,
// reduced deterministically: each team of threads accumulates the rows it owns, in row order,
// into its own float32 row of partial sums (shared memory, copied out at the end, or for long
// rows directly in global memory), and a second kernel sums those rows in a fixed order
// (norm_common.cuh). fp32 math; V-wide (128-bit) accesses when aligned; 64-bit indices.
// Geometry and per-element math in rms_norm_math.cuh.
#include "norm_common.cuh"
#include "rms_norm.h"

namespace truthgpt::cuda {
namespace {

using namespace norm;

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
        load_param<V, W, HasW>(w, col, 1.f, wv);
#pragma unroll
        for (int i = 0; i < V; ++i) o[i] = rms::fwd(e[i], r, wv[i]);
        store_floats<V>(yr + col, o);
      }
    }
  }
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
        load_param<V, W, HasW>(w, col, 1.f, wv);
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
        load_param<V, W, HasW>(w, col, 1.f, wv);
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
      copy_pack<V>(acc + col, partial + team * n + col);
    }
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

int weight_size(const RmsWeight& w) { return w.ptr ? element_size(w.dtype) : 1; }

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
  return finish_bwd_plan(rows, plan, [&](int* per_sm) {
    return dispatch_types(dtype, w, [&]<typename T, typename W, bool HasW>() {
      return dispatch_full_or_scalar<T>(v, [&]<int V>() {
        return with_bwd_kernel<T, W, V, HasW>(plan->smem_bytes > 0, [&](auto kernel) {
          return cudaOccupancyMaxActiveBlocksPerMultiprocessor(
              per_sm, kernel, plan->geo.tpr * plan->geo.rpb, plan->smem_bytes);
        });
      });
    });
  });
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
  return dispatch_dtype(w.dtype, [&]<typename W>() {
    launch_sum(plan.teams, n, partial, static_cast<W*>(dweight), stream);
    return cudaGetLastError();
  });
}

}  // namespace truthgpt::cuda
