// Linear for a few rows on the CPU: y = x W^T (+ b), x (M, K), W (N, K), y (M, N), for M up to
// kMaxRows (decoding: one token per sequence), where a GEMM library's kernel is tuned for large
// M and, for M = 1..8, reads the weights at a fraction of the memory bandwidth (measured in
// BENCHMARKS.md: MKL's sgemm at M = 8 streams a 65 MB weight at 3 GB/s). Larger M goes to the
// float32 GEMM engine of cpu/gemm_engine.h (torch's BLAS, or oneDNN where it measured faster).
//
// The kernel streams W once: per block of kRowsPerTask weight rows (one thread's task, small
// enough to stay in L2), each chunk of up to 4 x rows is multiplied against R weight rows at a
// time, R * (chunk) accumulators of one vector each along K, reduced across lanes at the end,
// so the second and later chunks read the block from cache, not memory. Math in float (double
// for double); the sum over K runs in lane-strided partial sums, then a lane reduction (an
// order that differs from at::linear's by rounding only).
//
// bfloat16 / float16 GEMMs (more rows, and the backward, linear_bwd): torch's CPU GEMM for
// these dtypes is fast only where oneDNN has a kernel for them (bfloat16: AVX-512 BW/VL/DQ or
// AMX; float16: AVX512-FP16 or AMX); elsewhere (AVX2 machines) it runs at 1-15 GFLOP/s, where
// float32 runs at ~100 (measured in BENCHMARKS.md). There the GEMMs take float32 copies of the
// operands (exact: a product of two bf16/fp16 values is exact in float32) and round the float32
// result once, as a GEMM with float32 accumulation does.
#ifndef TRUTHGPT_KERNEL_SECTION  // ================================================ host part

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "cpu/gemm_engine.h"
#include "cpu/linear.h"
#include "cpu/tensor_utils.h"
#define TRUTHGPT_KERNELS_FILE "cpu/linear.cpp"
#include "cpu/foreach_isa.h"

namespace truthgpt {
namespace {

using namespace cpu;

constexpr int64_t kMaxRows = 8;         // more rows: at::linear
constexpr int64_t kRowsPerTask = 48;    // weight rows per parallel task (a multiple of each R below)
constexpr int64_t kGrainElems = 1 << 16;  // weight elements per thread at least

// a @ b (2-D), float32 inside where torch_has_fast_gemm(dtype) is false; the result in a's dtype.
// (Autocast is off inside: the op may run under torch.autocast, which would cast the float32
// copies back to the autocast dtype.)
at::Tensor gemm(const at::Tensor& a, const at::Tensor& b) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  if (torch_has_fast_gemm(a.scalar_type())) return mm_f32(a, b);
  return mm_f32(a.to(at::kFloat), b.to(at::kFloat)).to(a.scalar_type());
}

at::Tensor gemm_linear(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  if (torch_has_fast_gemm(x.scalar_type())) return linear_f32(x, weight, bias);
  c10::optional<at::Tensor> bf;
  if (bias.has_value() && bias->defined()) bf = bias->to(at::kFloat);
  return linear_f32(x.to(at::kFloat), weight.to(at::kFloat), bf).to(x.scalar_type());
}

at::Tensor linear_2d(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.scalar_type() == weight.scalar_type(), "linear_fwd: x and weight must have one dtype");
  const bool has_bias = bias.has_value() && bias->defined();
  if (has_bias) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == weight.size(0) && bias->scalar_type() == x.scalar_type(),
                "linear_fwd: bias must be (N,) of x's dtype");
  }
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0);
  if (M > kMaxRows || M == 0 || N == 0 || K == 0) return gemm_linear(x, weight, bias);
  const at::Tensor xr = x.stride(1) == 1 ? x : x.contiguous();
  const at::Tensor wr = weight.stride(1) == 1 ? weight : weight.contiguous();
  const at::Tensor br = has_bias ? bias->contiguous() : at::Tensor();
  at::Tensor y = at::empty({M, N}, x.options());
  const Isa isa = active_isa();
  dispatch_kernel_types(x.scalar_type(), "linear_fwd", [&](auto tag) {
    using T = typename decltype(tag)::type;
    const auto fn = TRUTHGPT_ISA_FN(isa, linear_rows<T>);
    const T* xp = cptr<T>(xr);
    const T* wp = cptr<T>(wr);
    const T* bp = has_bias ? cptr<T>(br) : nullptr;
    T* yp = mptr<T>(y);
    const int64_t sx = M <= 1 ? K : xr.stride(0), sw = N <= 1 ? K : wr.stride(0);
    const int64_t tasks = (N + kRowsPerTask - 1) / kRowsPerTask;
    const int64_t grain = std::max<int64_t>(1, kGrainElems / (kRowsPerTask * K));
    at::parallel_for(0, tasks, grain, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t n0 = t * kRowsPerTask, n1 = std::min(N, n0 + kRowsPerTask);
        fn(xp, sx, M, wp, sw, bp, yp, N, K, n0, n1);
      }
    });
  });
  return y;
}

// x (..., K) -> (..., N): the leading dims are flattened here rather than by the caller (a view
// in C++ costs a fraction of a Python-side reshape + view, which matters at one token a call).
at::Tensor linear_fwd(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() >= 1 && weight.dim() == 2 && x.size(-1) == weight.size(1),
              "linear_fwd: x (..., K) and weight (N, K) expected, got ", x.sizes(), " and ", weight.sizes());
  if (x.dim() == 2) return linear_2d(x, weight, bias);
  std::vector<int64_t> out_sizes(x.sizes().begin(), x.sizes().end());
  int64_t rows = 1;  // (not -1 in the reshape: K may be 0)
  for (size_t i = 0; i + 1 < out_sizes.size(); ++i) rows *= out_sizes[i];
  out_sizes.back() = weight.size(0);
  return linear_2d(x.reshape({rows, x.size(-1)}), weight, bias).view(out_sizes);
}

// Gradients of y = x weight^T + bias for grad = dL/dy (M, N): dx = grad weight (M, K),
// dweight = grad^T x (N, K), dbias = sum of grad's rows (N,), summed in float32 (float64 for
// float64); each is an empty tensor when its flag is false.
std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_bwd(const at::Tensor& grad, const at::Tensor& x,
                                                          const at::Tensor& weight, bool need_x,
                                                          bool need_weight, bool need_bias) {
  TORCH_CHECK(grad.dim() == 2 && x.dim() == 2 && weight.dim() == 2 && x.size(1) == weight.size(1) &&
                  grad.size(0) == x.size(0) && grad.size(1) == weight.size(0),
              "linear_bwd: grad (M, N), x (M, K) and weight (N, K) expected, got ", grad.sizes(), ", ",
              x.sizes(), " and ", weight.sizes());
  TORCH_CHECK(grad.scalar_type() == x.scalar_type() && x.scalar_type() == weight.scalar_type(),
              "linear_bwd: grad, x and weight must have one dtype");
  at::Tensor dx = need_x ? gemm(grad, weight) : x.new_empty({0});
  at::Tensor dw = need_weight ? gemm(grad.t(), x) : x.new_empty({0});
  at::Tensor db = x.new_empty({0});
  if (need_bias) {
    const auto acc = grad.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
    db = grad.sum(0, false, acc).to(grad.scalar_type());
  }
  return {dx, dw, db};
}

}  // namespace

namespace cpu {
at::Tensor linear_2d_any(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias) {
  return linear_2d(x, weight, bias);
}
void gemm_2d_out(at::Tensor& out, const at::Tensor& a, const at::Tensor& b) {
  const bool onednn = a.scalar_type() == at::kFloat && use_onednn_fp32();
  if (!onednn && torch_has_fast_gemm(a.scalar_type())) {
    c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
    at::mm_out(out, a, b);
  } else {
    out.copy_(gemm(a, b));
  }
}
}  // namespace cpu

TORCH_LIBRARY_IMPL(truthgpt, CPU, m) {
  m.impl("linear_fwd", &linear_fwd);
  m.impl("linear_bwd", &linear_bwd);
}

}  // namespace truthgpt

#else  // ========================================== kernel section (once per instruction set)

// y[m, n] for m in [0, MC) (rows of x from x, stride sx) and n in [n0, n1), R weight rows at a
// time; the last group of a range repeats its last row (computed, not stored).
template <class T, int MC, int R>
void linear_chunk(const T* x, int64_t sx, const T* w, int64_t sw, const T* bias, T* y, int64_t sy,
                  int64_t K, int64_t n0, int64_t n1) {
  using V = VecFor<T>;
  using A = acc_t<T>;
  constexpr int64_t W = V::W;
  for (int64_t n = n0; n < n1; n += R) {
    const int64_t nr = std::min<int64_t>(R, n1 - n);
    const T* wr[R];
    for (int r = 0; r < R; ++r) wr[r] = w + (n + std::min<int64_t>(r, nr - 1)) * sw;
    V acc[MC][R];
    for (int m = 0; m < MC; ++m)
      for (int r = 0; r < R; ++r) acc[m][r] = V::set1(A(0));
    for (int64_t k = 0; k < K; k += W) {
      const int64_t mk = K - k;
      V xv[MC];
      for (int m = 0; m < MC; ++m) xv[m] = V::load(x + m * sx + k, mk);
      for (int r = 0; r < R; ++r) {
        prefetch(wr[r] + k + R * sw);  // the same place R rows on: the next group
        const V wv = V::load(wr[r] + k, mk);
        for (int m = 0; m < MC; ++m) acc[m][r] = V::fma(wv, xv[m], acc[m][r]);
      }
    }
    for (int m = 0; m < MC; ++m) {
      for (int r = 0; r < R; ++r) {  // (constant bounds: acc stays in registers)
        if (r >= nr) break;
        A s = acc[m][r].hsum();
        if (bias != nullptr) s += to_acc<A>(bias[n + r]);
        y[m * sy + n + r] = from_acc<T>(s);
      }
    }
  }
}

// y (M, N) rows n0..n1 of x (M, K) W^T (+ bias), M <= 8: chunks of up to 4 rows of x, each over
// the whole range (the range stays in cache for the chunks after the first).
template <class T>
void linear_rows(const T* x, int64_t sx, int64_t M, const T* w, int64_t sw, const T* bias, T* y,
                 int64_t N, int64_t K, int64_t n0, int64_t n1) {
  for (int64_t m0 = 0; m0 < M; m0 += 4) {
    const T* xm = x + m0 * sx;
    T* ym = y + m0 * N;
    switch (std::min<int64_t>(4, M - m0)) {
      case 1: linear_chunk<T, 1, 8>(xm, sx, w, sw, bias, ym, N, K, n0, n1); break;
      case 2: linear_chunk<T, 2, 4>(xm, sx, w, sw, bias, ym, N, K, n0, n1); break;
      case 3: linear_chunk<T, 3, 3>(xm, sx, w, sw, bias, ym, N, K, n0, n1); break;
      default: linear_chunk<T, 4, 2>(xm, sx, w, sw, bias, ym, N, K, n0, n1); break;
    }
  }
}

#endif  // TRUTHGPT_KERNEL_SECTION
