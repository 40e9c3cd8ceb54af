// Grouped linear on the CPU (tk.grouped_linear, ops/grouped_linear.py), the routed experts of
// an MoE layer: out[r] = x[r] weight[e]^T for the rows r of group e, offsets[e - 1] <= r <
// offsets[e] (offsets: the groups' cumulative ends, int32 / int64, as torch's grouped_mm takes
// them; rows past the last end are zero, and get zero gradients). Host code only: each group is
// one GEMM of tk.linear's (linear.h: oneDNN for float32 where it is faster), written into one
// output from the kernels' allocator (tensor_utils.h: cached blocks), instead of a GEMM per
// expert whose results autograd then concatenates and stacks into fresh tensors: the
// (E, 2I, H) weight gradient of a Mixtral-like layer is ~45 MB, whose first touch costs as
// much as the copies (AMD Zen 4: 19 ms for torch.stack of it, 4 ms into warm memory).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <vector>

#include "cpu/linear.h"
#include "cpu/tensor_utils.h"

namespace truthgpt {
namespace {

using namespace cpu;

// The group ends, checked (the Python side checks them too, but not in a compiled graph).
std::vector<int64_t> group_ends(const at::Tensor& offsets, int64_t rows) {
  TORCH_CHECK(offsets.dim() == 1, "grouped_linear: offsets must be 1-D");
  const at::Tensor o = offsets.to(at::kCPU, at::kLong).contiguous();
  const int64_t* p = o.const_data_ptr<int64_t>();
  std::vector<int64_t> ends(p, p + o.numel());
  int64_t prev = 0;
  for (int64_t e : ends) {
    TORCH_CHECK(e >= prev && e <= rows, "grouped_linear: offsets must be non-decreasing in [0, ", rows, "]");
    prev = e;
  }
  return ends;
}

void check_grouped(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& offsets) {
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 3 && x.size(1) == weight.size(2) && offsets.dim() == 1 &&
                  offsets.size(0) == weight.size(0),
              "grouped_linear: x (N, K), weight (E, M, K) and offsets (E,) expected, got ", x.sizes(), ", ",
              weight.sizes(), " and ", offsets.sizes());
  TORCH_CHECK(x.scalar_type() == weight.scalar_type(), "grouped_linear: x and weight must have one dtype");
}

at::Tensor grouped_linear_fwd(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& offsets) {
  check_grouped(x, weight, offsets);
  const int64_t N = x.size(0), M = weight.size(1);
  const std::vector<int64_t> ends = group_ends(offsets, N);
  at::Tensor out = new_output({N, M}, x.scalar_type());
  int64_t r0 = 0;
  for (size_t e = 0; e < ends.size(); ++e) {
    const int64_t n = ends[e] - r0;
    if (n > 0) {
      at::Tensor o = out.narrow(0, r0, n);
      const at::Tensor xe = x.narrow(0, r0, n), we = weight[static_cast<int64_t>(e)];
      if (n <= 8) {  // (decoding: the kernel that streams the weights once)
        o.copy_(linear_2d_any(xe, we, c10::nullopt));
      } else {
        gemm_2d_out(o, xe, we.t());
      }
    }
    r0 = ends[e];
  }
  if (r0 < N) out.narrow(0, r0, N - r0).zero_();
  return out;
}

// dx = grad_e weight[e] per group (zero past the last end), dweight[e] = grad_e^T x_e (zero for
// an empty group); each an empty tensor when its flag is false.
std::tuple<at::Tensor, at::Tensor> grouped_linear_bwd(const at::Tensor& grad_in, const at::Tensor& x,
                                                      const at::Tensor& weight, const at::Tensor& offsets,
                                                      bool need_x, bool need_weight) {
  check_grouped(x, weight, offsets);
  TORCH_CHECK(grad_in.dim() == 2 && grad_in.size(0) == x.size(0) && grad_in.size(1) == weight.size(1) &&
                  grad_in.scalar_type() == x.scalar_type(),
              "grouped_linear_bwd: grad (N, M) of x's dtype expected, got ", grad_in.sizes());
  const at::Tensor grad = grad_in.stride(1) == 1 ? grad_in : grad_in.contiguous();
  const int64_t N = x.size(0), K = x.size(1);
  const std::vector<int64_t> ends = group_ends(offsets, N);
  at::Tensor dx = need_x ? new_output({N, K}, x.scalar_type()) : x.new_empty({0});
  at::Tensor dw = need_weight ? new_output(weight.sizes(), weight.scalar_type()) : x.new_empty({0});
  int64_t r0 = 0;
  for (size_t e = 0; e < ends.size(); ++e) {
    const int64_t n = ends[e] - r0;
    const int64_t ei = static_cast<int64_t>(e);
    if (n > 0) {
      const at::Tensor g = grad.narrow(0, r0, n);
      if (need_x) {
        at::Tensor o = dx.narrow(0, r0, n);
        gemm_2d_out(o, g, weight[ei]);
      }
      if (need_weight) {
        at::Tensor o = dw[ei];
        gemm_2d_out(o, g.t(), x.narrow(0, r0, n));
      }
    } else if (need_weight) {
      dw[ei].zero_();
    }
    r0 = ends[e];
  }
  if (need_x && r0 < N) dx.narrow(0, r0, N - r0).zero_();
  return {dx, dw};
}

}  // namespace

TORCH_LIBRARY_IMPL(truthgpt, CPU, m) {
  m.impl("grouped_linear_fwd", &grouped_linear_fwd);
  m.impl("grouped_linear_bwd", &grouped_linear_bwd);
}

}  // namespace truthgpt
