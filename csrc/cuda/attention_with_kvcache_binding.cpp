// truthgpt::attention_with_kvcache_fwd on CUDA: per sequence, append into the cache in place,
// gather its keys and run the CUDA dense attention kernel (csrc/common/attention_kvcache_driver.h;
// its logic is tested on the CPU through the test-only extension). A fused paged-decode CUDA
// kernel is future work; this keeps every backend serving the op.
#include <torch/library.h>

#include "common/attention_kvcache_driver.h"

namespace truthgpt {

TORCH_LIBRARY_IMPL(truthgpt, CUDA, m) {
  m.impl("attention_with_kvcache_fwd", &kvcache::fwd);
}

}  // namespace truthgpt
