// Host build of the RMSNorm CUDA kernels' logic (csrc/cuda/rms_norm_math.cuh): test-only ops that
// run the kernels' geometry (teams of threads, the columns each thread owns, the grid-stride row
// loop, the per-team dweight partial sums and their fixed-order reduction) on the CPU, one
// emulated thread at a time, so tests/ops/test_cuda_host_logic.py can compare them with the
// reference. Every output element must be written exactly once.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <vector>

#include "cuda/rms_norm_math.cuh"

namespace truthgpt::testing {
namespace {

namespace rms = truthgpt::cuda::rms;

at::Tensor rows_view(const at::Tensor& t) {
  auto r = t.reshape({-1, t.size(-1)});
  return r.stride(1) == 1 ? r : r.contiguous();
}

int pick(const at::Tensor& a, const at::Tensor& b, const at::Tensor& c, const at::Tensor* w,
         int64_t vec) {
  if (vec > 0) return static_cast<int>(vec);
  const void* ptrs[] = {a.data_ptr(), b.data_ptr(), c.data_ptr(), w ? w->data_ptr() : nullptr};
  const int es = static_cast<int>(a.element_size());
  const int sizes[] = {es, es, es, w ? static_cast<int>(w->element_size()) : 1};
  const int64_t strides[] = {a.stride(0), b.stride(0), c.stride(0), 0};
  return rms::pick_vec(es, a.size(0), a.size(1), ptrs, sizes, strides, 4);
}

std::vector<float> weight_floats(const c10::optional<at::Tensor>& weight, int64_t n) {
  if (!weight.has_value() || !weight->defined()) return std::vector<float>(n, 1.f);
  at::Tensor w = weight->to(at::kFloat).contiguous();
  return std::vector<float>(w.const_data_ptr<float>(), w.const_data_ptr<float>() + n);
}

// (y, rstd, [V, tpr, rpb]) computed as rms_fwd_kernel with `blocks` blocks would.
std::tuple<at::Tensor, at::Tensor, std::vector<int64_t>> rms_norm_host_fwd(
    const at::Tensor& x, const c10::optional<at::Tensor>& weight, double eps, int64_t vec,
    int64_t blocks) {
  const at::Tensor x2 = rows_view(x.to(at::kFloat));
  const int64_t rows = x2.size(0), n = x2.size(1);
  at::Tensor y = at::full({rows, n}, NAN, x2.options());
  at::Tensor rstd = at::full({rows}, NAN, x2.options());
  at::Tensor writes = at::zeros({rows, n + 1}, x2.options().dtype(at::kInt));
  const at::Tensor* wp = (weight.has_value() && weight->defined()) ? &*weight : nullptr;
  const int v = pick(x2, x2, y, wp, vec);
  TORCH_CHECK(n % v == 0, "vector width ", v, " does not divide ", n);
  const rms::Geometry g = rms::geometry(n, v);
  const std::vector<float> w = weight_floats(weight, n);
  const float* xp = x2.const_data_ptr<float>();
  float* yp = y.data_ptr<float>();
  int32_t* wr = writes.data_ptr<int32_t>();
  const int64_t nv = n / v, step = rms::row_step(blocks, g.rpb);
  for (int64_t b = 0; b < blocks; ++b) {
    for (int64_t base = rms::first_row(b, 0, g.rpb); base < rows; base += step) {
      for (int j = 0; j < g.rpb; ++j) {
        const int64_t row = base + j;
        if (row >= rows) continue;
        std::vector<float> part(g.tpr, 0.f);  // each thread's sum of squares
        for (int t = 0; t < g.tpr; ++t)
          for (int64_t k = t; k < nv; k += g.tpr)
            for (int i = 0; i < v; ++i) {
              const float e = xp[row * x2.stride(0) + rms::vec_begin(k, v) + i];
              part[t] += e * e;
            }
        float ss = 0.f;
        for (float p : part) ss += p;
        const float r = rms::rstd(ss, n, static_cast<float>(eps));
        rstd.data_ptr<float>()[row] = r;
        ++wr[row * (n + 1) + n];
        for (int t = 0; t < g.tpr; ++t)
          for (int64_t k = t; k < nv; k += g.tpr)
            for (int i = 0; i < v; ++i) {
              const int64_t col = rms::vec_begin(k, v) + i;
              yp[row * n + col] = rms::fwd(xp[row * x2.stride(0) + col], r, w[col]);
              ++wr[row * (n + 1) + col];
            }
      }
    }
  }
  TORCH_CHECK(writes.eq(1).all().item<bool>(), "rms_norm_host_fwd: not written exactly once");
  std::vector<int64_t> lead(x.sizes().begin(), x.sizes().end() - 1);
  return {y.view(x.sizes()), rstd.view(lead), {v, g.tpr, g.rpb}};
}

// (dx, dweight) computed as rms_bwd_kernel with `blocks` blocks, then rms_dw_kernel, would.
std::tuple<at::Tensor, at::Tensor> rms_norm_host_bwd(const at::Tensor& grad, const at::Tensor& x,
                                                     const c10::optional<at::Tensor>& weight,
                                                     const at::Tensor& rstd, int64_t vec,
                                                     int64_t blocks) {
  const at::Tensor x2 = rows_view(x.to(at::kFloat)), dy2 = rows_view(grad.to(at::kFloat));
  const at::Tensor r = rstd.to(at::kFloat).contiguous();
  const int64_t rows = x2.size(0), n = x2.size(1);
  const bool has_w = weight.has_value() && weight->defined();
  at::Tensor dx = at::full({rows, n}, NAN, x2.options());
  at::Tensor writes = at::zeros({rows, n}, x2.options().dtype(at::kInt));
  const at::Tensor* wp = has_w ? &*weight : nullptr;
  const int v = pick(dy2, x2, dx, wp, vec);
  TORCH_CHECK(n % v == 0, "vector width ", v, " does not divide ", n);
  const rms::Geometry g = rms::geometry(n, v);
  const std::vector<float> w = weight_floats(weight, n);
  const int64_t teams = blocks * g.rpb;
  std::vector<float> partial(teams * n, NAN);
  const float *xp = x2.const_data_ptr<float>(), *gp = dy2.const_data_ptr<float>();
  float* dxp = dx.data_ptr<float>();
  int32_t* wr = writes.data_ptr<int32_t>();
  const int64_t nv = n / v, step = rms::row_step(blocks, g.rpb);
  for (int64_t b = 0; b < blocks; ++b) {
    for (int j = 0; j < g.rpb; ++j) {  // zero this team's accumulators (each thread its columns)
      const int64_t team = rms::first_row(b, j, g.rpb);
      for (int t = 0; t < g.tpr; ++t)
        for (int64_t k = t; k < nv; k += g.tpr)
          for (int i = 0; i < v; ++i) partial[team * n + rms::vec_begin(k, v) + i] = 0.f;
    }
    for (int64_t base = rms::first_row(b, 0, g.rpb); base < rows; base += step) {
      for (int j = 0; j < g.rpb; ++j) {
        const int64_t row = base + j, team = rms::first_row(b, j, g.rpb);
        if (row >= rows) continue;
        const float* dyr = gp + row * dy2.stride(0);
        const float* xr = xp + row * x2.stride(0);
        float dot = 0.f;
        for (int t = 0; t < g.tpr; ++t) {
          float part = 0.f;
          for (int64_t k = t; k < nv; k += g.tpr)
            for (int i = 0; i < v; ++i) {
              const int64_t col = rms::vec_begin(k, v) + i;
              part += dyr[col] * w[col] * xr[col];
            }
          dot += part;
        }
        const float rr = r.const_data_ptr<float>()[row];
        const float c = rms::coef(rr, dot, n);
        for (int t = 0; t < g.tpr; ++t)
          for (int64_t k = t; k < nv; k += g.tpr)
            for (int i = 0; i < v; ++i) {
              const int64_t col = rms::vec_begin(k, v) + i;
              dxp[row * n + col] = rms::dx(xr[col], dyr[col] * w[col], rr, c);
              ++wr[row * n + col];
              if (has_w) partial[team * n + col] += rms::dw_term(dyr[col], xr[col], rr);
            }
      }
    }
  }
  TORCH_CHECK(writes.eq(1).all().item<bool>(), "rms_norm_host_bwd: not written exactly once");
  at::Tensor dw = at::empty({has_w ? n : 0}, x2.options());
  if (has_w) {  // rms_dw_kernel: 32 strided sums per column, then added in order
    constexpr int kRedRows = 32;
    for (int64_t c = 0; c < n; ++c) {
      float total = 0.f;
      for (int y = 0; y < kRedRows; ++y) {
        float s = 0.f;
        for (int64_t t = y; t < teams; t += kRedRows) s += partial[t * n + c];
        total += s;
      }
      dw.data_ptr<float>()[c] = total;
    }
  }
  return {dx.view(x.sizes()), dw};
}

// The vector width the kernels pick for x (any dtype, any layout) and weight.
int64_t rms_norm_vec(const at::Tensor& x, const c10::optional<at::Tensor>& weight) {
  const at::Tensor x2 = rows_view(x);
  const at::Tensor y = at::empty(x2.sizes(), x2.options());
  return pick(x2, x2, y, (weight.has_value() && weight->defined()) ? &*weight : nullptr, 0);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(truthgpt_test, m) {
  m.def("rms_norm_host_fwd(Tensor x, Tensor? weight, float eps, int vec, int blocks) "
        "-> (Tensor, Tensor, int[])");
  m.def("rms_norm_host_bwd(Tensor grad, Tensor x, Tensor? weight, Tensor rstd, int vec, "
        "int blocks) -> (Tensor, Tensor)");
  m.def("rms_norm_vec(Tensor x, Tensor? weight) -> int");
}

TORCH_LIBRARY_IMPL(truthgpt_test, CPU, m) {
  m.impl("rms_norm_host_fwd", &rms_norm_host_fwd);
  m.impl("rms_norm_host_bwd", &rms_norm_host_bwd);
  m.impl("rms_norm_vec", &rms_norm_vec);
}

}  // namespace truthgpt::testing
