// Attention forward kernels for head dims in bucket 96 (one translation unit per bucket and direction).
#include "attention_kernel.cuh"

namespace truthgpt::cuda::detail {
template cudaError_t attention_fwd_bucket<96>(const AttentionParams& p, cudaStream_t stream);
}  // namespace truthgpt::cuda::detail
