// Launchers of the GeGLU CUDA kernels (csrc/cuda/geglu.cu). tanh: the "tanh" form of gelu,
// else the erf form ("none").
#pragma once
#include "launch.h"

namespace truthgpt::cuda {

cudaError_t geglu_fwd(DType dtype, bool tanh, int64_t rows, int64_t n, Rows gate, Rows up, Rows out,
                      cudaStream_t stream);
cudaError_t geglu_bwd(DType dtype, bool tanh, int64_t rows, int64_t n, Rows grad, Rows gate, Rows up,
                      Rows dgate, Rows dup, cudaStream_t stream);

}  // namespace truthgpt::cuda
