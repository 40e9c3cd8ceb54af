// The chunk loop of the fused linear cross-entropy (truthgpt::linear_cross_entropy_fwd), shared
// by the CPU kernel (csrc/cpu/linear_cross_entropy.cpp) and the CUDA binding
// (csrc/cuda/linear_cross_entropy_binding.cpp): host code on ATen only. Each backend supplies
// the row kernel; the GEMMs are ATen's (MKL/oneDNN on CPUs, cuBLAS on GPUs).
//
// For each chunk of rows [r0, r0 + nc):
//   L = x_c W^T                      (nc, V) logits: the only buffer that grows with V
//   rows(L, r0, nc)                  per row: loss, z-loss term, and with grad_scale
//                                    L <- grad_scale_r * d loss_r / d logits (in place)
//   dx_c = L W,  dW += L^T x_c,  db += sum_r L    (chunks in order: deterministic)
// (a low-precision dW takes kDwPasses passes, a slice of V each, to bound its accumulator)
// Accumulation: float32 (float64 for float64 inputs). With `upcast` (a CPU whose
// bfloat16/float16 GEMMs are slower than float32 ones), low-precision x and W are converted to
// float32 a block at a time and every GEMM runs in float32; otherwise (CUDA, and CPUs with fast
// low-precision GEMMs: Gemm::mixed_operands()) the GEMMs take the inputs' dtype (float32
// accumulation inside) and L has x's dtype, as the logits of F.linear under autocast.
// Mixed dtypes: a float32 weight (the master copy) with bfloat16/float16 x is converted to x's
// dtype once for the GEMMs, and dW is accumulated in float32 straight into its float32
// result (autocast would round it to x's dtype and convert it back).
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
#include <tuple>

namespace truthgpt {
namespace lce {

// The chunk's logits take about this much memory when chunk_size is 0 (auto).
constexpr int64_t kChunkBytes = int64_t(64) << 20;
// With upcast: W is converted to float32 in blocks of about this many bytes.
constexpr int64_t kBlockBytes = int64_t(16) << 20;
// Passes over the chunks that accumulate a low-precision dW, a slice of V each (see run()).
constexpr int64_t kDwPasses = 2;

inline at::ScalarType acc_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

// Every target is a class in [0, V) or ignore_index (reads the values: a sync on GPUs).
inline void check_targets(const at::Tensor& target, int64_t V, int64_t ignore_index) {
  const auto bad = ((target < 0) | (target >= V)) & (target != ignore_index);
  if (bad.any().item<bool>()) {
    const int64_t i = bad.nonzero()[0][0].item<int64_t>();
    TORCH_CHECK_VALUE(false, "target must hold class indices in [0, ", V, ") or ignore_index (",
                      ignore_index, "); got ", target[i].item<int64_t>(), " at position ", i);
  }
}

inline void check_args(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& bias,
                       const at::Tensor& target, const c10::optional<at::Tensor>& grad_scale,
                       int64_t ignore_index) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1),
              "linear_cross_entropy_fwd: x (N, d) and weight (V, d) expected, got ", x.sizes(),
              " and ", w.sizes());
  TORCH_CHECK(x.scalar_type() == w.scalar_type() ||
                  (w.scalar_type() == at::kFloat && (x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf)),
              "linear_cross_entropy_fwd: weight must have x's dtype, or be float32 with bfloat16/float16 x");
  TORCH_CHECK(target.dim() == 1 && target.size(0) == x.size(0) && target.scalar_type() == at::kLong,
              "linear_cross_entropy_fwd: target must be int64 (N,)");
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == w.size(0) && bias->scalar_type() == w.scalar_type(),
                "linear_cross_entropy_fwd: bias must be (V,) of weight's dtype");
  }
  if (grad_scale.has_value()) {
    TORCH_CHECK(grad_scale->numel() == x.size(0), "linear_cross_entropy_fwd: grad_scale must have N elements");
  }
  check_targets(target, w.size(0), ignore_index);
}

inline int64_t rows_per_chunk(int64_t chunk_size, int64_t N, int64_t V, int64_t elem) {
  const int64_t c = chunk_size > 0 ? chunk_size : kChunkBytes / std::max<int64_t>(1, V * elem);
  return std::clamp<int64_t>(c, 1, std::max<int64_t>(N, 1));
}

// The driver's GEMM forms; the CPU kernel passes its own (csrc/cpu/linear_cross_entropy.cpp).
struct AtenGemm {
  // true: the GEMMs take x and W in their own dtype next to float32 logits (no float32 blocks)
  bool mixed_operands() const { return false; }
  void mm_out(at::Tensor& out, const at::Tensor& a, const at::Tensor& b) const { at::mm_out(out, a, b); }
  void addmm_(at::Tensor& acc, const at::Tensor& a, const at::Tensor& b) const { acc.addmm_(a, b); }
  // dx_c = L W (the chunk's input gradient: K = V, long)
  void dx_out(at::Tensor& out, const at::Tensor& L, const at::Tensor& w) const { at::mm_out(out, L, w); }
  // the large buffers and outputs (logits, dx, dW, W converted)
  at::Tensor empty(at::IntArrayRef sizes, const at::TensorOptions& opts) const { return at::empty(sizes, opts); }
  // acc (float32) = a b (first) or += a b, with a and b low precision: the GEMM in their dtype
  // (float32 accumulation inside), the sum over chunks in float32
  void accumulate(at::Tensor& acc, const at::Tensor& a, const at::Tensor& b, bool first) const {
    const at::Tensor prod = at::mm(a, b);
    if (first) {
      acc.copy_(prod);
    } else {
      acc.add_(prod);
    }
  }
};

// rows(L, r0, nc): L is the (nc, V) chunk (unit inner stride, row stride L.stride(0)).
// Returns (loss, z, dx, dweight, dbias); loss and z (N,) in the accumulation dtype.
template <class RowFn, class Gemm = AtenGemm>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> run(
    const at::Tensor& x_in, const at::Tensor& w_in, const c10::optional<at::Tensor>& bias,
    const at::Tensor& target, const c10::optional<at::Tensor>& grad_scale, int64_t ignore_index,
    bool need_dweight, int64_t chunk_size, bool upcast, at::Tensor& loss, at::Tensor& zrows,
    RowFn&& rows, const Gemm& gemm = Gemm(), int64_t dw_passes = kDwPasses) {
  check_args(x_in, w_in, bias, target, grad_scale, ignore_index);
  const at::Tensor x = x_in.stride(1) == 1 ? x_in : x_in.contiguous();
  const bool mixed = w_in.scalar_type() != x.scalar_type();  // float32 weight, low-precision x
  const at::Tensor w = mixed ? gemm.empty(w_in.sizes(), x.options()).copy_(w_in)
                       : w_in.stride(1) == 1 ? w_in : w_in.contiguous();
  const int64_t N = x.size(0), d = x.size(1), V = w.size(0);
  const auto acc = acc_type(x.scalar_type());
  const bool low = x.scalar_type() != acc;
  const bool conv = upcast && low && !gemm.mixed_operands();  // x and W blocks to acc for the GEMMs
  const auto ldt = conv || !low ? acc : x.scalar_type();
  const auto aopt = x.options().dtype(acc);
  loss = at::empty({N}, aopt);
  zrows = at::empty({N}, aopt);
  const bool grad = grad_scale.has_value();
  const bool dwb = grad && need_dweight;
  // Low-precision dW: the float32 accumulator of all V rows would be twice the size of dW
  // itself, and both exist when it is converted. So dW is accumulated in kDwPasses passes over
  // the chunks, each for a slice of V (the logits and the row kernel run again per pass; dx
  // and the loss come from the first): the accumulator is then dW's size / kDwPasses * 2.
  // (dw_passes: the caller's cap; the CPU kernel passes 1 when the accumulator is small.)
  // (a float32 dW is its own accumulator: one pass)
  const bool low_dw = dwb && low && !mixed;
  const int64_t passes = low_dw ? std::clamp<int64_t>(dw_passes, 1, std::max<int64_t>(V, 1)) : 1;
  at::Tensor dx = grad ? gemm.empty({N, d}, x.options()) : x.new_empty({0});
  at::Tensor dw = dwb ? gemm.empty({V, d}, w_in.options()) : x.new_empty({0});
  at::Tensor db_acc = dwb && bias.has_value() ? at::zeros({V}, aopt) : x.new_empty({0});
  if (N == 0) {
    if (dwb) dw.zero_();
    auto db = db_acc.numel() ? db_acc.to(bias->scalar_type()) : db_acc;
    return {loss, zrows, dx, dw, db};
  }
  const int64_t nc_max = rows_per_chunk(chunk_size, N, V, at::elementSize(acc));
  at::Tensor Lbuf = gemm.empty({nc_max, V}, x.options().dtype(ldt));
  // W blocks (rows [v0, v0 + vb)) in the GEMM dtype
  const int64_t vb = conv ? std::clamp<int64_t>(kBlockBytes / (d * 4), 1, V) : V;
  auto wblock = [&](int64_t v0) {
    auto b = w.narrow(0, v0, std::min(vb, V - v0));
    return conv ? b.to(acc) : b;
  };
  for (int64_t pass = 0; pass < passes; ++pass) {
    const int64_t p0 = V * pass / passes, p1 = V * (pass + 1) / passes;  // this pass's dW rows
    // (the first chunk writes the accumulator, the later ones add to it)
    at::Tensor dw_acc = !dwb ? at::Tensor() : low_dw ? gemm.empty({p1 - p0, d}, aopt) : dw;
    for (int64_t r0 = 0; r0 < N; r0 += nc_max) {
      const int64_t nc = std::min(nc_max, N - r0);
      at::Tensor L = Lbuf.narrow(0, 0, nc);
      at::Tensor xc = x.narrow(0, r0, nc);
      if (conv) xc = xc.to(acc);
      for (int64_t v0 = 0; v0 < V; v0 += vb) {
        auto wb = wblock(v0);
        at::Tensor Lv = L.narrow(1, v0, wb.size(0));
        gemm.mm_out(Lv, xc, wb.t());
      }
      rows(L, r0, nc);
      if (!grad) continue;
      if (pass == 0) {
        at::Tensor dxc = dx.narrow(0, r0, nc);
        if (conv) {
          at::Tensor acc_dx = at::zeros({nc, d}, aopt);
          for (int64_t v0 = 0; v0 < V; v0 += vb) {
            auto wb = wblock(v0);
            gemm.addmm_(acc_dx, L.narrow(1, v0, wb.size(0)), wb);
          }
          dxc.copy_(acc_dx);
        } else {
          gemm.dx_out(dxc, L, w);
        }
        if (db_acc.numel()) db_acc.add_(L.sum(0, false, acc));
      }
      if (dwb) {
        at::Tensor Lp = L.narrow(1, p0, p1 - p0);
        if (ldt == acc) {
          if (r0 == 0) {
            gemm.mm_out(dw_acc, Lp.t(), xc);
          } else {
            gemm.addmm_(dw_acc, Lp.t(), xc);
          }
        } else {  // GEMM in the inputs' dtype (float32 inside), the sum over chunks in float32
          gemm.accumulate(dw_acc, Lp.t(), xc, r0 == 0);
        }
      }
    }
    if (low_dw) dw.narrow(0, p0, p1 - p0).copy_(dw_acc);
  }
  at::Tensor db = db_acc.numel() ? db_acc.to(bias->scalar_type()) : db_acc;
  return {loss, zrows, dx, dw, db};
}

// The two kernel ops of tk.cross_entropy on one device, from its row runner
// Rows(logits, target, grad_scale, ignore_index, label_smoothing, z_loss, softcap, inplace):
// truthgpt::cross_entropy_fwd (the gradient, with grad_scale, into a new buffer) and
// truthgpt::cross_entropy_grad_ (the gradient written over the logits).
template <auto Rows>
std::tuple<at::Tensor, at::Tensor, at::Tensor> cross_entropy_fwd(
    const at::Tensor& logits, const at::Tensor& target, const c10::optional<at::Tensor>& grad_scale,
    int64_t ignore_index, double label_smoothing, double z_loss, double softcap) {
  return Rows(logits, target, grad_scale, ignore_index, label_smoothing, z_loss, softcap, false);
}

template <auto Rows>
void cross_entropy_grad_(at::Tensor& logits, const at::Tensor& target, const at::Tensor& grad_scale,
                         int64_t ignore_index, double label_smoothing, double z_loss, double softcap) {
  Rows(logits, target, grad_scale, ignore_index, label_smoothing, z_loss, softcap, true);
}

}  // namespace lce
}  // namespace truthgpt
