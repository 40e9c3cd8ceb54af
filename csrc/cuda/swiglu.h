// Launchers of the SwiGLU CUDA kernels (csrc/cuda/swiglu.cu).
#pragma once
#include "launch.h"

namespace truthgpt::cuda {

cudaError_t swiglu_fwd(DType dtype, int64_t rows, int64_t n, Rows gate, Rows up, Rows out,
                       cudaStream_t stream);
cudaError_t swiglu_bwd(DType dtype, int64_t rows, int64_t n, Rows grad, Rows gate, Rows up,
                       Rows dgate, Rows dup, cudaStream_t stream);

}  // namespace truthgpt::cuda
