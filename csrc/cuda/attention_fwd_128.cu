// Attention forward kernels for head dims in bucket 128 (one translation unit per bucket and direction).
#include "attention_kernel.cuh"

namespace truthgpt::cuda::detail {
template cudaError_t attention_fwd_bucket<128>(const AttentionParams& p, cudaStream_t stream);
}  // namespace truthgpt::cuda::detail
