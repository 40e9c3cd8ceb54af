// Host build of the SwiGLU CUDA kernels' logic (csrc/cuda/swiglu_math.cuh): a test-only op that
// walks the kernels' flat index space (rows x n/V vectors) with the same vector width choice and
// per-element math on the CPU. Every output element must be written exactly once.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "cuda/swiglu_math.cuh"

namespace truthgpt::testing {
namespace {

at::Tensor rows_of(const at::Tensor& t) {
  auto r = t.reshape({-1, t.size(-1)});
  return r.stride(1) == 1 ? r : r.contiguous();
}

// (out, dgate, dup, V) for float32 gate/up/grad of one shape.
std::tuple<at::Tensor, at::Tensor, at::Tensor, int64_t> swiglu_host(const at::Tensor& gate,
                                                                    const at::Tensor& up,
                                                                    const at::Tensor& grad) {
  TORCH_CHECK(gate.scalar_type() == at::kFloat && up.scalar_type() == at::kFloat &&
              grad.scalar_type() == at::kFloat && gate.sizes() == up.sizes() &&
              gate.sizes() == grad.sizes());
  const at::Tensor g = rows_of(gate), u = rows_of(up), dy = rows_of(grad);
  const int64_t rows = g.size(0), n = g.size(1);
  at::Tensor out = at::full({rows, n}, NAN, g.options());
  at::Tensor dg = at::full({rows, n}, NAN, g.options()), du = at::full({rows, n}, NAN, g.options());
  at::Tensor writes = at::zeros({rows, n}, g.options().dtype(at::kInt));
  const void* ptrs[] = {dy.data_ptr(), g.data_ptr(), u.data_ptr(), out.data_ptr(), dg.data_ptr()};
  const int64_t strides[] = {dy.stride(0), g.stride(0), u.stride(0), n, n};
  const int v = truthgpt::cuda::swiglu::pick_vec(4, rows, n, ptrs, strides, 5);
  const int64_t nv = n / v;
  for (int64_t idx = 0; idx < rows * nv; ++idx) {
    const int64_t r = idx / nv, c = (idx - r * nv) * v;
    for (int i = 0; i < v; ++i) {
      const float gv = g.const_data_ptr<float>()[r * g.stride(0) + c + i];
      const float uv = u.const_data_ptr<float>()[r * u.stride(0) + c + i];
      const float yv = dy.const_data_ptr<float>()[r * dy.stride(0) + c + i];
      out.data_ptr<float>()[r * n + c + i] = truthgpt::cuda::swiglu::fwd(gv, uv);
      truthgpt::cuda::swiglu::bwd(yv, gv, uv, dg.data_ptr<float>()[r * n + c + i],
                                  du.data_ptr<float>()[r * n + c + i]);
      ++writes.data_ptr<int32_t>()[r * n + c + i];
    }
  }
  TORCH_CHECK(writes.eq(1).all().item<bool>(), "swiglu_host: not written exactly once");
  return {out.view(gate.sizes()), dg.view(gate.sizes()), du.view(gate.sizes()), v};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(truthgpt_test, m) {
  m.def("swiglu_host(Tensor gate, Tensor up, Tensor grad) -> (Tensor, Tensor, Tensor, int)");
}

TORCH_LIBRARY_IMPL(truthgpt_test, CPU, m) { m.impl("swiglu_host", &swiglu_host); }

}  // namespace truthgpt::testing
