// LayerNorm CUDA kernels. Forward: y = (x - mean) rstd w + b, mean and rstd saved as float32
// (corrected two-pass statistics, layer_norm_math.cuh). Backward with xhat = (x - mean) rstd,
// g = dy w: dx = rstd (g - mean(g) - xhat mean(g xhat)); dweight = sum over rows of dy xhat and
// dbias = sum over rows of dy, reduced deterministically as RMSNorm's dweight: each team of
// threads accumulates the rows it owns, in row order, into its own float32 rows of partial sums
// (shared memory, copied out at the end, or for long rows directly in global memory), and a
// second kernel sums those rows in a fixed order (norm_common.cuh). fp32 math; V-wide (128-bit)
// accesses when aligned; 64-bit indices. Geometry as RMSNorm's (rms_norm_math.cuh).
#include "layer_norm.h"
#include "norm_common.cuh"

namespace truthgpt::cuda {
namespace {

using namespace norm;

template <typename T, typename W, int V, bool HasW, bool HasB>
__global__ void ln_fwd_kernel(int64_t rows, int64_t n, const T* __restrict__ x, int64_t xs,
                              const W* __restrict__ w, const W* __restrict__ b, T* __restrict__ y,
                              int64_t ys, float* __restrict__ mean, float* __restrict__ rstd,
                              float eps) {
  __shared__ float red[rms::kMaxTeams * 32];
  const int tpr = blockDim.x, rpb = blockDim.y;
  const int64_t nv = n / V;
  const int64_t step = rms::row_step(gridDim.x, rpb);
  for (int64_t base = rms::first_row(blockIdx.x, 0, rpb); base < rows; base += step) {  // uniform
    const int64_t row = base + threadIdx.y;
    const bool active = row < rows;
    const T* xr = x + (active ? row : 0) * xs;
    float s = 0.f;
    if (active) {
#pragma unroll 4
      for (int64_t k = threadIdx.x; k < nv; k += tpr) {
        float e[V];
        load_floats<V>(xr + rms::vec_begin(k, V), e);
#pragma unroll
        for (int i = 0; i < V; ++i) s += e[i];
      }
    }
    const float mean0 = team_sum(s, red) / static_cast<float>(n);
    float ds = 0.f, qs = 0.f;
    if (active) {
#pragma unroll 4
      for (int64_t k = threadIdx.x; k < nv; k += tpr) {
        float e[V];
        load_floats<V>(xr + rms::vec_begin(k, V), e);
#pragma unroll
        for (int i = 0; i < V; ++i) {
          const float d = e[i] - mean0;
          ds += d;
          qs += d * d;
        }
      }
    }
    ds = team_sum(ds, red);
    qs = team_sum(qs, red);
    if (active) {
      const ln::Stats st = ln::stats(mean0, ds, qs, n, eps);
      if (threadIdx.x == 0) {
        mean[row] = st.mean;
        rstd[row] = st.rstd;
      }
      T* yr = y + row * ys;
#pragma unroll 4
      for (int64_t k = threadIdx.x; k < nv; k += tpr) {
        const int64_t col = rms::vec_begin(k, V);
        float e[V], wv[V], bv[V], o[V];
        load_floats<V>(xr + col, e);
        load_param<V, W, HasW>(w, col, 1.f, wv);
        load_param<V, W, HasB>(b, col, 0.f, bv);
#pragma unroll
        for (int i = 0; i < V; ++i) o[i] = ln::fwd(e[i], st, wv[i], bv[i]);
        store_floats<V>(yr + col, o);
      }
    }
  }
}

// partial: (P, teams, n) floats, P = 1 (dweight) or 2 (dweight, dbias); with SmemAcc the
// teams accumulate in shared memory (P, rpb, n) and copy their rows out at the end.
template <typename T, typename W, int V, bool HasW, bool HasB, bool SmemAcc>
__global__ void ln_bwd_kernel(int64_t rows, int64_t n, const T* __restrict__ dy, int64_t dys,
                              const T* __restrict__ x, int64_t xs, const W* __restrict__ w,
                              const float* __restrict__ mean, const float* __restrict__ rstd,
                              T* __restrict__ dx, int64_t dxs, float* __restrict__ partial,
                              int64_t teams) {
  static_assert(HasW || !HasB, "a bias comes with a weight (of ones when absent)");
  __shared__ float red[rms::kMaxTeams * 32];
  extern __shared__ __align__(32) float acc_smem[];
  const int tpr = blockDim.x, rpb = blockDim.y;
  const int64_t nv = n / V;
  const int64_t team = rms::first_row(blockIdx.x, threadIdx.y, rpb);
  float* acc_w = nullptr;
  float* acc_b = nullptr;
  if constexpr (HasW) {
    acc_w = SmemAcc ? acc_smem + static_cast<int64_t>(threadIdx.y) * n : partial + team * n;
    if constexpr (HasB) {
      acc_b = SmemAcc ? acc_smem + static_cast<int64_t>(rpb + threadIdx.y) * n
                      : partial + (teams + team) * n;
    }
    for (int64_t k = threadIdx.x; k < nv; k += tpr) {
      const float zero[V] = {};
      store_floats<V>(acc_w + rms::vec_begin(k, V), zero);
      if constexpr (HasB) store_floats<V>(acc_b + rms::vec_begin(k, V), zero);
    }
  }
  const int64_t step = rms::row_step(gridDim.x, rpb);
  for (int64_t base = rms::first_row(blockIdx.x, 0, rpb); base < rows; base += step) {  // uniform
    const int64_t row = base + threadIdx.y;
    const bool active = row < rows;
    const int64_t rr = active ? row : 0;
    const ln::Stats st{active ? mean[rr] : 0.f, active ? rstd[rr] : 0.f};
    const T* dyr = dy + rr * dys;
    const T* xr = x + rr * xs;
    float s1 = 0.f, s2 = 0.f;
    if (active) {
#pragma unroll 4
      for (int64_t k = threadIdx.x; k < nv; k += tpr) {
        const int64_t col = rms::vec_begin(k, V);
        float g[V], e[V], wv[V];
        load_floats<V>(dyr + col, g);
        load_floats<V>(xr + col, e);
        load_param<V, W, HasW>(w, col, 1.f, wv);
#pragma unroll
        for (int i = 0; i < V; ++i) {
          s1 += g[i] * wv[i];
          s2 += g[i] * wv[i] * ln::xhat(e[i], st);
        }
      }
    }
    const float c1 = team_sum(s1, red) / static_cast<float>(n);
    const float c2 = team_sum(s2, red) / static_cast<float>(n);
    if (active) {
      T* dxr = dx + row * dxs;
#pragma unroll 4
      for (int64_t k = threadIdx.x; k < nv; k += tpr) {
        const int64_t col = rms::vec_begin(k, V);
        float g[V], e[V], wv[V], o[V];
        load_floats<V>(dyr + col, g);
        load_floats<V>(xr + col, e);
        load_param<V, W, HasW>(w, col, 1.f, wv);
        float tw[V];
#pragma unroll
        for (int i = 0; i < V; ++i) {
          const float xh = ln::xhat(e[i], st);
          o[i] = ln::dx(g[i] * wv[i], xh, st.rstd, c1, c2);
          tw[i] = g[i] * xh;
        }
        store_floats<V>(dxr + col, o);
        if constexpr (HasW) add_floats<V>(acc_w + col, tw);
        if constexpr (HasB) add_floats<V>(acc_b + col, g);
      }
    }
  }
  if constexpr (HasW && SmemAcc) {
    for (int64_t k = threadIdx.x; k < nv; k += tpr) {
      const int64_t col = rms::vec_begin(k, V);
      copy_pack<V>(acc_w + col, partial + team * n + col);
      if constexpr (HasB) copy_pack<V>(acc_b + col, partial + (teams + team) * n + col);
    }
  }
}

// Calls f.template operator()<T, W, HasW, HasB>() for x's dtype and the parameters'.
template <typename F>
cudaError_t dispatch_types(DType dtype, const LnAffine& a, F&& f) {
  return dispatch_dtype(dtype, [&]<typename T>() -> cudaError_t {
    if (a.w == nullptr) return f.template operator()<T, T, false, false>();
    auto with = [&]<typename W>() -> cudaError_t {
      if (a.b == nullptr) return f.template operator()<T, W, true, false>();
      return f.template operator()<T, W, true, true>();
    };
    if (a.dtype == DType::F32) return with.template operator()<float>();
    if (a.dtype == dtype) return with.template operator()<T>();
    return cudaErrorInvalidValue;
  });
}

int param_size(const LnAffine& a) { return a.w ? element_size(a.dtype) : 1; }

}  // namespace

cudaError_t layer_norm_fwd(DType dtype, int64_t rows, int64_t n, Rows x, LnAffine a, Rows y,
                           float* mean, float* rstd, float eps, cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  const void* ptrs[] = {x.ptr, y.ptr, a.w, a.b};
  const int ps = param_size(a);
  const int sizes[] = {element_size(dtype), element_size(dtype), ps, ps};
  const int64_t strides[] = {x.row_stride, y.row_stride, 0, 0};
  const int v = rms::pick_vec(element_size(dtype), rows, n, ptrs, sizes, strides, 4);
  const rms::Geometry geo = rms::geometry(n, v);
  return dispatch_types(dtype, a, [&]<typename T, typename W, bool HasW, bool HasB>() {
    return dispatch_full_or_scalar<T>(v, [&]<int V>() {
      ln_fwd_kernel<T, W, V, HasW, HasB><<<grid_rows(rows, geo.rpb), dim3(geo.tpr, geo.rpb), 0, stream>>>(
          rows, n, static_cast<const T*>(x.ptr), x.row_stride, static_cast<const W*>(a.w),
          static_cast<const W*>(a.b), static_cast<T*>(y.ptr), y.row_stride, mean, rstd, eps);
      return cudaGetLastError();
    });
  });
}

namespace {

int bwd_vec(DType dtype, int64_t rows, int64_t n, Rows grad, Rows x, LnAffine a, Rows dx) {
  const void* ptrs[] = {grad.ptr, x.ptr, dx.ptr, a.w};
  const int es = element_size(dtype);
  const int sizes[] = {es, es, es, param_size(a)};
  const int64_t strides[] = {grad.row_stride, x.row_stride, dx.row_stride, 0};
  return rms::pick_vec(es, rows, n, ptrs, sizes, strides, 4);
}

// Calls f(kernel) with the backward kernel of these types and width.
template <typename T, typename W, int V, bool HasW, bool HasB, typename F>
cudaError_t with_bwd_kernel(bool smem_acc, F&& f) {
  if constexpr (HasW) {
    if (smem_acc) return f(ln_bwd_kernel<T, W, V, true, HasB, true>);
  }
  return f(ln_bwd_kernel<T, W, V, HasW, HasB, false>);
}

}  // namespace

cudaError_t layer_norm_bwd_plan(DType dtype, int64_t rows, int64_t n, Rows grad, Rows x, LnAffine a,
                                Rows dx, LnBwdPlan* plan) {
  const int v = bwd_vec(dtype, rows, n, grad, x, a, dx);
  plan->geo = rms::geometry(n, v);
  const size_t acc_bytes =
      static_cast<size_t>(a.b ? 2 : 1) * static_cast<size_t>(plan->geo.rpb) * n * sizeof(float);
  plan->smem_bytes = (a.w && acc_bytes <= kSmemAccBytes) ? acc_bytes : 0;
  return finish_bwd_plan(rows, plan, [&](int* per_sm) {
    return dispatch_types(dtype, a, [&]<typename T, typename W, bool HasW, bool HasB>() {
      return dispatch_full_or_scalar<T>(v, [&]<int V>() {
        return with_bwd_kernel<T, W, V, HasW, HasB>(plan->smem_bytes > 0, [&](auto kernel) {
          return cudaOccupancyMaxActiveBlocksPerMultiprocessor(
              per_sm, kernel, plan->geo.tpr * plan->geo.rpb, plan->smem_bytes);
        });
      });
    });
  });
}

cudaError_t layer_norm_bwd(DType dtype, int64_t rows, int64_t n, Rows grad, Rows x, LnAffine a,
                           const float* mean, const float* rstd, Rows dx, void* dweight,
                           void* dbias, float* partial, const LnBwdPlan& plan, cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  const int v = plan.geo.vec;
  if (v != bwd_vec(dtype, rows, n, grad, x, a, dx)) return cudaErrorInvalidValue;  // stale plan
  cudaError_t err = dispatch_types(dtype, a, [&]<typename T, typename W, bool HasW, bool HasB>() {
    return dispatch_full_or_scalar<T>(v, [&]<int V>() {
      return with_bwd_kernel<T, W, V, HasW, HasB>(plan.smem_bytes > 0, [&](auto kernel) {
        kernel<<<static_cast<unsigned>(plan.blocks), dim3(plan.geo.tpr, plan.geo.rpb),
                 plan.smem_bytes, stream>>>(
            rows, n, static_cast<const T*>(grad.ptr), grad.row_stride,
            static_cast<const T*>(x.ptr), x.row_stride, static_cast<const W*>(a.w), mean, rstd,
            static_cast<T*>(dx.ptr), dx.row_stride, partial, plan.teams);
        return cudaGetLastError();
      });
    });
  });
  if (err != cudaSuccess || a.w == nullptr || n == 0) return err;
  return dispatch_dtype(a.dtype, [&]<typename W>() {
    launch_sum(plan.teams, n, partial, static_cast<W*>(dweight), stream);
    if (a.b != nullptr) launch_sum(plan.teams, n, partial + plan.teams * n, static_cast<W*>(dbias), stream);
    return cudaGetLastError();
  });
}

}  // namespace truthgpt::cuda
