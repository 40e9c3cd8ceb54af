// truthgpt::attention_varlen_fwd / _bwd on the CPU: the packed sequences through the CPU
// attention kernel, one sequence after another (csrc/common/attention_varlen_driver.h).
#include <torch/library.h>

#include "common/attention_varlen_driver.h"

namespace truthgpt {

TORCH_LIBRARY_IMPL(truthgpt, CPU, m) {
  m.impl("attention_varlen_fwd", &varlen::fwd);
  m.impl("attention_varlen_bwd", &varlen::bwd);
}

}  // namespace truthgpt
