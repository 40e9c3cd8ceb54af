// The CUDA backend's attention_with_kvcache (csrc/common/attention_kvcache_driver.h, which
// appends into the cache and runs the dense kernel per sequence) is device-independent code:
// registered here on the CPU, over the CPU dense kernel, so tests check its logic without a GPU.
#include <torch/library.h>

#include "common/attention_kvcache_driver.h"

namespace truthgpt::testing {

TORCH_LIBRARY_FRAGMENT(truthgpt_test, m) {
  m.def("attention_kvcache_driver(Tensor q, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor cache_seqlens, "
        "Tensor? block_table, Tensor? k_new, Tensor? v_new, Tensor? cache_batch_idx, "
        "Tensor? cache_leftpad, float scale, int window_left, int window_right, Tensor? alibi_slopes, "
        "float softcap, Tensor? rel_bias) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(truthgpt_test, CPU, m) {
  m.impl("attention_kvcache_driver", &truthgpt::kvcache::fwd);
}

}  // namespace truthgpt::testing
