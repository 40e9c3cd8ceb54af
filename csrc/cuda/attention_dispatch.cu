// Entry points of the CUDA attention kernels: head-dim bucket dispatch (the buckets' kernels
// live in attention_{fwd,bwd}_<D>.cu, the backward's delta pre-pass included).
#include "attention_kernel.cuh"

namespace truthgpt::cuda {

namespace detail {
// Instantiated in their own translation units only.
#define TRUTHGPT_ATTENTION_BUCKET(D)                                                      \
  extern template cudaError_t attention_fwd_bucket<D>(const AttentionParams&, cudaStream_t); \
  extern template cudaError_t attention_bwd_bucket<D>(const AttentionParams&, cudaStream_t);
TRUTHGPT_ATTENTION_BUCKET(32)
TRUTHGPT_ATTENTION_BUCKET(64)
TRUTHGPT_ATTENTION_BUCKET(96)
TRUTHGPT_ATTENTION_BUCKET(128)
TRUTHGPT_ATTENTION_BUCKET(192)
TRUTHGPT_ATTENTION_BUCKET(256)
#undef TRUTHGPT_ATTENTION_BUCKET

}  // namespace detail

cudaError_t attention_fwd(const AttentionParams& p, cudaStream_t stream) {
  switch (attention_head_dim_bucket(p.prob.D)) {
    case 32: return detail::attention_fwd_bucket<32>(p, stream);
    case 64: return detail::attention_fwd_bucket<64>(p, stream);
    case 96: return detail::attention_fwd_bucket<96>(p, stream);
    case 128: return detail::attention_fwd_bucket<128>(p, stream);
    case 192: return detail::attention_fwd_bucket<192>(p, stream);
    case 256: return detail::attention_fwd_bucket<256>(p, stream);
    default: return cudaErrorInvalidValue;
  }
}

cudaError_t attention_bwd(const AttentionParams& p, cudaStream_t stream) {
  const int bucket = attention_head_dim_bucket(p.prob.D);
  if (bucket == 0) return cudaErrorInvalidValue;
  switch (bucket) {
    case 32: return detail::attention_bwd_bucket<32>(p, stream);
    case 64: return detail::attention_bwd_bucket<64>(p, stream);
    case 96: return detail::attention_bwd_bucket<96>(p, stream);
    case 128: return detail::attention_bwd_bucket<128>(p, stream);
    case 192: return detail::attention_bwd_bucket<192>(p, stream);
    default: return detail::attention_bwd_bucket<256>(p, stream);
  }
}

}  // namespace truthgpt::cuda
