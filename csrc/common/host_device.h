// Lets `__host__ __device__` helpers (csrc/cuda/*_math.cuh) compile with a host compiler too,
// so the CPU extension can build them as test-only ops (csrc/testing/) and CI can check the CUDA
// kernels' index arithmetic, masks and softmax steps without a GPU.
#pragma once
#if defined(__CUDACC__)
#define TG_HD __host__ __device__ __forceinline__
#else
#define TG_HD inline
#endif
