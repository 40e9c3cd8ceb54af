// Vectorised loads/stores of V contiguous elements (one 128-bit access for V * sizeof(T) == 16),
// converting to/from float. Callers ensure alignment (csrc/cuda/vector_math.cuh). CUDA only.
#pragma once
#include "common.cuh"

namespace truthgpt::cuda {

template <typename T, int V>
struct alignas(sizeof(T) * V) Pack {
  T v[V];
};

template <int V, typename T>
__device__ __forceinline__ void load_floats(const T* p, float (&out)[V]) {
  const Pack<T, V> pk = *reinterpret_cast<const Pack<T, V>*>(p);
#pragma unroll
  for (int i = 0; i < V; ++i) out[i] = to_float(pk.v[i]);
}

template <int V, typename T>
__device__ __forceinline__ void store_floats(T* p, const float (&in)[V]) {
  Pack<T, V> pk;
#pragma unroll
  for (int i = 0; i < V; ++i) pk.v[i] = from_float<T>(in[i]);
  *reinterpret_cast<Pack<T, V>*>(p) = pk;
}

template <int V, typename T>
__device__ __forceinline__ void copy_pack(const T* src, T* dst) {
  *reinterpret_cast<Pack<T, V>*>(dst) = *reinterpret_cast<const Pack<T, V>*>(src);
}

// Calls f.template operator()<V>() with the vector width v (a power of two, v * sizeof(T) <= 16).
template <typename T, typename F>
cudaError_t dispatch_vec(int v, F&& f) {
  if constexpr (sizeof(T) <= 2) {
    if (v == 8) return f.template operator()<8>();
  }
  if (v == 4) return f.template operator()<4>();
  if (v == 2) return f.template operator()<2>();
  if (v == 1) return f.template operator()<1>();
  return cudaErrorInvalidValue;
}

}  // namespace truthgpt::cuda
