// Attention backward kernels (dK/dV and dQ) for head dims in bucket 64 (one translation unit per bucket and direction).
#include "attention_kernel.cuh"

namespace truthgpt::cuda::detail {
template cudaError_t attention_bwd_bucket<64>(const AttentionParams& p, cudaStream_t stream);
}  // namespace truthgpt::cuda::detail
