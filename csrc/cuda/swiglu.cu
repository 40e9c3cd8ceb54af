// SwiGLU CUDA kernels: out = silu(gate) * up; backward recomputes silu. fp32 math.
#include "common.cuh"

namespace truthgpt::cuda {
namespace {

template <typename T>
__global__ void swiglu_fwd_kernel(int64_t rows, int64_t n, const T* g, int64_t gs, const T* u,
                                  int64_t us, T* out, int64_t os) {
  const int64_t total = rows * n;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = idx / n, c = idx - r * n;
    const float x = to_float(g[r * gs + c]);
    const float silu = x / (1.f + __expf(-x));
    out[r * os + c] = from_float<T>(silu * to_float(u[r * us + c]));
  }
}

template <typename T>
__global__ void swiglu_bwd_kernel(int64_t rows, int64_t n, const T* dy, int64_t ys, const T* g,
                                  int64_t gs, const T* u, int64_t us, T* dg, int64_t dgs, T* du,
                                  int64_t dus) {
  const int64_t total = rows * n;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = idx / n, c = idx - r * n;
    const float x = to_float(g[r * gs + c]);
    const float y = to_float(dy[r * ys + c]);
    const float sig = 1.f / (1.f + __expf(-x));
    du[r * dus + c] = from_float<T>(y * x * sig);
    dg[r * dgs + c] = from_float<T>(y * to_float(u[r * us + c]) * sig * (1.f + x * (1.f - sig)));
  }
}

}  // namespace

cudaError_t swiglu_fwd(DType dtype, int64_t rows, int64_t n, Rows gate, Rows up, Rows out,
                       cudaStream_t stream) {
  if (rows * n == 0) return cudaSuccess;
  return dispatch_dtype(dtype, [&]<typename T>() {
    constexpr int threads = 256;
    swiglu_fwd_kernel<T><<<grid_1d(rows * n, threads), threads, 0, stream>>>(
        rows, n, static_cast<const T*>(gate.ptr), gate.row_stride, static_cast<const T*>(up.ptr),
        up.row_stride, static_cast<T*>(out.ptr), out.row_stride);
    return cudaGetLastError();
  });
}

cudaError_t swiglu_bwd(DType dtype, int64_t rows, int64_t n, Rows grad, Rows gate, Rows up,
                       Rows dgate, Rows dup, cudaStream_t stream) {
  if (rows * n == 0) return cudaSuccess;
  return dispatch_dtype(dtype, [&]<typename T>() {
    constexpr int threads = 256;
    swiglu_bwd_kernel<T><<<grid_1d(rows * n, threads), threads, 0, stream>>>(
        rows, n, static_cast<const T*>(grad.ptr), grad.row_stride,
        static_cast<const T*>(gate.ptr), gate.row_stride, static_cast<const T*>(up.ptr),
        up.row_stride, static_cast<T*>(dgate.ptr), dgate.row_stride, static_cast<T*>(dup.ptr),
        dup.row_stride);
    return cudaGetLastError();
  });
}

}  // namespace truthgpt::cuda
