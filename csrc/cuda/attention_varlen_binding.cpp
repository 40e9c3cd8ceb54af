// truthgpt::attention_varlen_fwd / _bwd on CUDA: the packed sequences through the CUDA
// attention kernels, one launch per sequence (csrc/common/attention_varlen_driver.h); the
// cumulative lengths are read on the host once per call.
#include <torch/library.h>

#include "common/attention_varlen_driver.h"

namespace truthgpt {

TORCH_LIBRARY_IMPL(truthgpt, CUDA, m) {
  m.impl("attention_varlen_fwd", &varlen::fwd);
  m.impl("attention_varlen_bwd", &varlen::bwd);
}

}  // namespace truthgpt
