// The relative-bias and dropout arguments of truthgpt::attention_fwd / _bwd (schema:
// csrc/registration.cpp) checked and written into an attn::Problem: shared by the CUDA binding
// (csrc/cuda/attention_binding.cpp) and its host mirror (csrc/testing/attention.cpp).
#pragma once
#include <ATen/ATen.h>

#include <optional>

#include "common/philox.h"
#include "cuda/attention_math.cuh"

namespace truthgpt::attn {

inline void set_rel_and_dropout(Problem& pr, const at::Device& device, const std::optional<at::Tensor>& rel_bias,
                                double dropout_p, const std::optional<at::Tensor>& dropout_seed) {
  if (rel_bias.has_value()) {
    const at::Tensor& r = *rel_bias;
    const int64_t L = std::max<int64_t>(pr.Sq + pr.Sk - 1, 0);  // (0 when Sq = Sk = 0)
    TORCH_CHECK(r.device() == device && r.scalar_type() == at::kFloat && r.dim() == 2 && r.size(0) == pr.Hq &&
                    r.size(1) == L && r.stride(1) == 1,
                "truthgpt attention: rel_bias must be float32 (", pr.Hq, ", ", L,
                ") with unit inner stride on ", device, ", got ", r.scalar_type(), " ", r.sizes(), " on ",
                r.device());
    pr.rel = r.data_ptr<float>();
    pr.rel_sh = r.stride(0);
  }
  TORCH_CHECK(dropout_p >= 0.0 && dropout_p < 1.0, "truthgpt attention: dropout_p must be in [0, 1), got ",
              dropout_p);
  pr.dropout = dropout_p > 0.0;
  pr.keep_scale = 1.f;
  if (pr.dropout) {
    TORCH_CHECK(dropout_seed.has_value() && dropout_seed->numel() == 1 && dropout_seed->device().is_cpu(),
                "truthgpt attention: dropout needs dropout_seed, a one-element CPU tensor");
    pr.seed = static_cast<uint64_t>(dropout_seed->item<int64_t>());
    pr.drop_threshold = philox::threshold(dropout_p);
    pr.keep_scale = static_cast<float>(1.0 / (1.0 - dropout_p));
  }
}

}  // namespace truthgpt::attn
