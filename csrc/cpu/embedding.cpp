// The weight gradient of an embedding lookup on the CPU (truthgpt::embedding_bwd): what
// aten::embedding_dense_backward computes, into the kernels' output allocator
// (cpu/tensor_utils.h). torch's version zero-fills a freshly allocated (num_weights, d) tensor
// each step, and for an LM's vocabulary that allocation is tens of MiB paid in page faults
// (V 32000, d 512 float32: 15 ms of a 16.5 ms fwd+bwd); here the block comes back from the
// allocator's cache each step and is zeroed in parallel (~1.3 ms), then the rows of grad are
// added in token order per column block (threads own columns: deterministic, no atomics).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstring>

#include "cpu/tensor_utils.h"

namespace truthgpt {
namespace {

at::Tensor embedding_bwd(const at::Tensor& grad, const at::Tensor& indices, int64_t num_weights,
                         int64_t padding_idx) {
  TORCH_CHECK(grad.scalar_type() == at::kFloat || grad.scalar_type() == at::kDouble,
              "embedding_bwd: grad must be float32 or float64, got ", grad.scalar_type());
  TORCH_CHECK(indices.scalar_type() == at::kLong || indices.scalar_type() == at::kInt,
              "embedding_bwd: indices must be int64 or int32, got ", indices.scalar_type());
  TORCH_CHECK(grad.dim() >= 1 && num_weights >= 0, "embedding_bwd: grad (*, d) and num_weights >= 0 expected");
  const int64_t d = grad.size(-1);
  const at::Tensor g = grad.reshape({-1, d}).contiguous();
  const at::Tensor idx = indices.reshape({-1}).to(at::kLong).contiguous();
  TORCH_CHECK(idx.numel() == g.size(0), "embedding_bwd: ", idx.numel(), " indices for ", g.size(0),
              " rows of grad");
  const int64_t n = idx.numel();
  const int64_t* ix = idx.const_data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i) {  // (the forward's lookup checked them; cheap to recheck)
    TORCH_CHECK_INDEX(ix[i] >= 0 && ix[i] < num_weights, "embedding_bwd: index ", ix[i],
                      " out of range for ", num_weights, " embeddings");
  }
  at::Tensor out = cpu::new_output({num_weights, d}, grad.scalar_type());
  AT_DISPATCH_FLOATING_TYPES(grad.scalar_type(), "embedding_bwd", [&] {
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    const scalar_t* gp = g.const_data_ptr<scalar_t>();
    at::parallel_for(0, num_weights, std::max<int64_t>(1, (int64_t(1) << 16) / std::max<int64_t>(d, 1)),
                     [&](int64_t r0, int64_t r1) {
      std::memset(o + r0 * d, 0, static_cast<size_t>((r1 - r0) * d) * sizeof(scalar_t));
    });
    at::parallel_for(0, d, 16, [&](int64_t c0, int64_t c1) {
      for (int64_t i = 0; i < n; ++i) {
        if (ix[i] == padding_idx) continue;
        scalar_t* dst = o + ix[i] * d;
        const scalar_t* src = gp + i * d;
        for (int64_t c = c0; c < c1; ++c) dst[c] += src[c];
      }
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(truthgpt, CPU, m) { m.impl("embedding_bwd", &embedding_bwd); }

}  // namespace truthgpt
