// Gated-activation CUDA kernels and launchers shared by geglu.cu and swiglu.cu:
// out = act(gate) * up, and its backward recomputing act. fp32 math. Each thread moves V
// contiguous elements of a row (a 128-bit access when aligned), over a grid-stride loop of
// 64-bit indices. The per-element math is the op's, a type Op with
//   static TG_HD float fwd(float g, float u);                                   act(g) * u
//   static TG_HD void bwd(float dy, float g, float u, float& dg, float& du);    its gradients
// The vector width is swiglu::pick_vec's (the same operands and layout for every gated op).
#pragma once
#include "launch.h"
#include "pack.cuh"
#include "swiglu_math.cuh"

namespace truthgpt::cuda::gated {

template <typename Op, typename T, int V>
__global__ void fwd_kernel(int64_t rows, int64_t nv, const T* g, int64_t gs, const T* u,
                           int64_t us, T* out, int64_t os) {
  const int64_t total = rows * nv;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = idx / nv, c = (idx - r * nv) * V;
    float gv[V], uv[V], ov[V];
    load_floats<V>(g + r * gs + c, gv);
    load_floats<V>(u + r * us + c, uv);
#pragma unroll
    for (int i = 0; i < V; ++i) ov[i] = Op::fwd(gv[i], uv[i]);
    store_floats<V>(out + r * os + c, ov);
  }
}

template <typename Op, typename T, int V>
__global__ void bwd_kernel(int64_t rows, int64_t nv, const T* dy, int64_t ys, const T* g,
                           int64_t gs, const T* u, int64_t us, T* dg, int64_t dgs, T* du,
                           int64_t dus) {
  const int64_t total = rows * nv;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = idx / nv, c = (idx - r * nv) * V;
    float yv[V], gv[V], uv[V], dgv[V], duv[V];
    load_floats<V>(dy + r * ys + c, yv);
    load_floats<V>(g + r * gs + c, gv);
    load_floats<V>(u + r * us + c, uv);
#pragma unroll
    for (int i = 0; i < V; ++i) Op::bwd(yv[i], gv[i], uv[i], dgv[i], duv[i]);
    store_floats<V>(dg + r * dgs + c, dgv);
    store_floats<V>(du + r * dus + c, duv);
  }
}

constexpr int kThreads = 256;

template <typename Op>
cudaError_t fwd(DType dtype, int64_t rows, int64_t n, Rows gate, Rows up, Rows out,
                cudaStream_t stream) {
  if (rows * n == 0) return cudaSuccess;
  const void* ptrs[] = {gate.ptr, up.ptr, out.ptr};
  const int64_t strides[] = {gate.row_stride, up.row_stride, out.row_stride};
  const int v = swiglu::pick_vec(element_size(dtype), rows, n, ptrs, strides, 3);
  return dispatch_dtype(dtype, [&]<typename T>() {
    return dispatch_vec<T>(v, [&]<int V>() {
      fwd_kernel<Op, T, V><<<grid_1d(rows * (n / V), kThreads), kThreads, 0, stream>>>(
          rows, n / V, static_cast<const T*>(gate.ptr), gate.row_stride,
          static_cast<const T*>(up.ptr), up.row_stride, static_cast<T*>(out.ptr), out.row_stride);
      return cudaGetLastError();
    });
  });
}

template <typename Op>
cudaError_t bwd(DType dtype, int64_t rows, int64_t n, Rows grad, Rows gate, Rows up, Rows dgate,
                Rows dup, cudaStream_t stream) {
  if (rows * n == 0) return cudaSuccess;
  const void* ptrs[] = {grad.ptr, gate.ptr, up.ptr, dgate.ptr, dup.ptr};
  const int64_t strides[] = {grad.row_stride, gate.row_stride, up.row_stride, dgate.row_stride,
                             dup.row_stride};
  const int v = swiglu::pick_vec(element_size(dtype), rows, n, ptrs, strides, 5);
  return dispatch_dtype(dtype, [&]<typename T>() {
    return dispatch_vec<T>(v, [&]<int V>() {
      bwd_kernel<Op, T, V><<<grid_1d(rows * (n / V), kThreads), kThreads, 0, stream>>>(
          rows, n / V, static_cast<const T*>(grad.ptr), grad.row_stride,
          static_cast<const T*>(gate.ptr), gate.row_stride, static_cast<const T*>(up.ptr),
          up.row_stride, static_cast<T*>(dgate.ptr), dgate.row_stride, static_cast<T*>(dup.ptr),
          dup.row_stride);
      return cudaGetLastError();
    });
  });
}

}  // namespace truthgpt::cuda::gated
