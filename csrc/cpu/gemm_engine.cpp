// The float32 GEMM engine of the CPU kernels: see gemm_engine.h.
#include "cpu/gemm_engine.h"

#include <ATen/Context.h>
#include <ATen/Parallel.h>
#include <ATen/core/stack.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <optional>

#include "cpu/transpose_avx512.h"
#include "cpu/vec_utils.h"

namespace truthgpt {
namespace cpu {
namespace {

// The engine expected to win keeps the choice unless the other beats it by this much: the
// calibration is one small product, and two engines measured within ~20% of each other flip
// between processes (seen on an AMD Zen 4: BLAS 173, oneDNN 210 GFLOP/s).
constexpr double kMinSpeedup = 1.2;
constexpr int64_t kM = 256, kK = 512, kN = 512;
constexpr int kReps = 5;

// mkldnn::_linear_pointwise(X, W, B?, attr, scalars, algorithm): y = X W^T (+ B), X (..., K),
// W (N, K); registered by torch builds with oneDNN (all x86 wheels). nullptr where absent.
const c10::OperatorHandle* onednn_linear_op() {
  static const c10::OperatorHandle* op = []() -> const c10::OperatorHandle* {
    if (!at::hasMKLDNN()) return nullptr;
    auto h = c10::Dispatcher::singleton().findSchema({"mkldnn::_linear_pointwise", ""});
    return h.has_value() ? new c10::OperatorHandle(*h) : nullptr;
  }();
  return op;
}

at::Tensor onednn_linear(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& bias) {
  torch::jit::Stack stack;
  stack.reserve(6);
  stack.emplace_back(x);
  stack.emplace_back(w);
  stack.emplace_back(bias.has_value() && bias->defined() ? c10::IValue(*bias) : c10::IValue());
  stack.emplace_back(std::string("none"));
  stack.emplace_back(c10::List<std::optional<at::Scalar>>());
  stack.emplace_back(c10::IValue());
  onednn_linear_op()->callBoxed(stack);
  return std::move(stack[0]).toTensor();
}

bool has_avx512() {
#if TRUTHGPT_X86
  return hardware_isa() >= Isa::avx512;
#else
  return false;
#endif
}

GemmCalibration measure() {
  GemmCalibration c;
  if (!has_avx512() || onednn_linear_op() == nullptr) return c;
  at::NoGradGuard no_grad;
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  // deterministic data (the global random generator is the user's)
  const at::Tensor a = at::linspace(-1.0, 1.0, kM * kK, at::kFloat).reshape({kM, kK});
  const at::Tensor w = at::linspace(1.0, -1.0, kN * kK, at::kFloat).reshape({kN, kK});
  using clock = std::chrono::steady_clock;
  auto seconds = [](clock::time_point t0) { return std::chrono::duration<double>(clock::now() - t0).count(); };
  double blas = 1e30, dnn = 1e30;
  for (int rep = 0; rep <= kReps; ++rep) {  // rep 0 warms up (oneDNN builds its primitive)
    auto t0 = clock::now();
    at::Tensor y0 = at::mm(a, w.t());
    const double tb = seconds(t0);
    t0 = clock::now();
    at::Tensor y1 = onednn_linear(a, w, c10::nullopt);
    const double td = seconds(t0);
    if (rep > 0) {
      blas = std::min(blas, tb);
      dnn = std::min(dnn, td);
    }
  }
  const double flops = 2.0 * kM * kK * kN;
  c.measured = true;
  c.blas_gflops = flops / blas / 1e9;
  c.onednn_gflops = flops / dnn / 1e9;
  // MKL's fast code paths are Intel's; elsewhere it runs generic AVX2 kernels, so oneDNN is
  // the expected winner there and BLAS must beat it by kMinSpeedup to be kept.
  c.blas_is_slow = cpu_is_intel() ? blas >= kMinSpeedup * dnn : kMinSpeedup * blas > dnn;
  return c;
}

// TRUTHGPT_CPU_GEMM: "" (unset or auto), "blas" or "onednn"; anything else is an error.
std::string engine_env() {
  const char* env = std::getenv("TRUTHGPT_CPU_GEMM");
  std::string v = env ? env : "";
  TORCH_CHECK(v.empty() || v == "auto" || v == "blas" || v == "onednn",
              "TRUTHGPT_CPU_GEMM must be auto, blas or onednn, got '", v, "'");
  return v == "auto" ? "" : v;
}

}  // namespace

bool cpu_is_intel() {
#if TRUTHGPT_X86
  static const bool intel = [] {
    __builtin_cpu_init();
    return __builtin_cpu_is("intel") != 0;
  }();
  return intel;
#else
  return false;
#endif
}

bool torch_has_fast_gemm(at::ScalarType t) {
#if TRUTHGPT_X86
  static const bool bf16 = [] {
    __builtin_cpu_init();
    return (__builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
            __builtin_cpu_supports("avx512dq")) || __builtin_cpu_supports("amx-bf16");
  }();
  static const bool fp16 = [] {
    __builtin_cpu_init();
    return static_cast<bool>(__builtin_cpu_supports("avx512fp16"));
  }();
  if (t == at::kBFloat16) return bf16;
  if (t == at::kHalf) return fp16;
#endif
  (void)t;
  return true;
}

const GemmCalibration& calibration() {
  static const GemmCalibration c = measure();
  return c;
}

bool use_onednn_fp32() {
  const std::string env = engine_env();
  if (env == "blas") return false;
  if (env == "onednn") return onednn_linear_op() != nullptr;
  return calibration().blas_is_slow;
}

std::string gemm_engine_description() {
  const bool dnn = use_onednn_fp32();
  const GemmCalibration& c = calibration();
  std::string s = dnn ? "oneDNN" : "torch BLAS (at::mm)";
  if (!engine_env().empty()) {
    s += " (TRUTHGPT_CPU_GEMM)";
  } else if (c.measured) {
    s += " (measured float32 GFLOP/s: BLAS " + std::to_string(static_cast<int>(c.blas_gflops)) + ", oneDNN " +
         std::to_string(static_cast<int>(c.onednn_gflops)) + ")";
  } else {
    s += onednn_linear_op() == nullptr ? " (torch has no oneDNN)" : " (no AVX-512: not compared)";
  }
  return s;
}

at::Tensor linear_f32(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);  // float32 stays float32
  const bool biased = bias.has_value() && bias->defined();
  if (x.scalar_type() != at::kFloat || weight.scalar_type() != at::kFloat ||
      (biased && bias->scalar_type() != at::kFloat) || x.numel() == 0 || weight.numel() == 0 ||
      !use_onednn_fp32()) {
    return at::linear(x, weight, bias);
  }
  // oneDNN's linear reads the bias as dense memory: a strided or expanded (stride-0) bias would
  // be read past its elements (silently wrong values, reads outside its storage)
  if (biased && !bias->is_contiguous()) return onednn_linear(x, weight, bias->contiguous());
  return onednn_linear(x, weight, bias);
}

// s^T as a new contiguous (C, R) tensor, for a float32 s (R, C) with contiguous rows, in
// parallel over blocks of 16 rows of the result: 16 x 16 blocks through AVX-512 registers where
// the CPU has it (transpose_avx512.h), else at::Tensor's copy. torch's copy of a transposed view
// takes 0.54 ms for a warm (512, 1536) float32 on an AMD Zen 4 (2 threads), ~5x a plain copy.
#if TK_TRANSPOSE_X86
TK_TRANSPOSE_AVX512 static void transposed_f32_rows(const float* s, int64_t R, int64_t ls, float* d, int64_t c0,
                                                    int64_t c1) {
  transpose_f32(R, c1 - c0, s + c0, ls, d + c0 * R, R);  // d[c0:c1, :] = s[:, c0:c1]^T
}
#endif

static at::Tensor transposed_f32(const at::Tensor& s) {
#if TK_TRANSPOSE_X86
  if (s.dim() == 2 && s.scalar_type() == at::kFloat && s.stride(1) == 1 && s.numel() >= 4096 && has_avx512()) {
    const int64_t R = s.size(0), C = s.size(1), ls = s.stride(0);
    at::Tensor d = at::empty({C, R}, s.options());
    const float* sp = s.const_data_ptr<float>();
    float* dp = d.data_ptr<float>();
    const int64_t nb = (C + 15) / 16;
    at::parallel_for(0, nb, 1, [&](int64_t b0, int64_t b1) {
      transposed_f32_rows(sp, R, ls, dp, b0 * 16, std::min(C, b1 * 16));
    });
    return d;
  }
#endif
  return s.t().contiguous();
}

at::Tensor mm_f32(const at::Tensor& a, const at::Tensor& b, bool contiguous) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  if (a.scalar_type() != at::kFloat || b.scalar_type() != at::kFloat || a.numel() == 0 || b.numel() == 0 ||
      !use_onednn_fp32()) {
    return at::mm(a, b);
  }
  // oneDNN's linear reads its weight through any strides but copies a strided input whole. So
  // a @ b with a (M, K) a transposed view (dweight = grad^T x: a = grad^T, M = out features)
  // is computed as (b^T a^T)^T when that copies less: b^T (N, K) is the input then, a the
  // weight, and the (N, M) result is read transposed (copied when `contiguous`).
  const int64_t M = a.size(0), N = b.size(1);
  if (a.stride(1) != 1 && b.numel() + (contiguous ? M * N : 0) < a.numel()) {
    at::Tensor out_t = onednn_linear(transposed_f32(b), a, c10::nullopt);  // (N, M)
    return contiguous ? transposed_f32(out_t) : out_t.t();
  }
  // a transposed view a would be copied by oneDNN element by element: transpose it by blocks
  const at::Tensor ar = a.stride(1) != 1 && a.stride(0) == 1 ? transposed_f32(a.t()) : a;
  return onednn_linear(ar, b.t(), c10::nullopt);  // a @ b = a (b^T)^T
}

}  // namespace cpu
}  // namespace truthgpt
