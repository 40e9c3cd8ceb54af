// Fused linear cross-entropy on the CPU (truthgpt::linear_cross_entropy_fwd): the chunk loop
// is common/linear_cross_entropy_driver.h, its float32 GEMMs go to the engine of
// cpu/gemm_engine.h (torch's BLAS or oneDNN, whichever is faster here); this file has the
// row kernel, which runs in place on a chunk's logits, one row per task (at::parallel_for):
//   z' = softcap * tanh((z + b) / softcap)   (or z + b)
//   lse = log sum exp z',  loss = lse - (1 - eps) z'_t - eps/V sum z' + z_loss lse^2
//   with gradients: z <- s (p (1 + 2 z_loss lse) - eps/V - (1 - eps) [j == t]) (1 - (z'/cap)^2)
// (p = exp(z' - lse), s the row's grad_scale; ignored rows: loss 0, gradient 0.)
// Vectorised per instruction set (cpu/vec_utils.h); math in float (double for double).
// The same row kernel serves truthgpt::cross_entropy_fwd (given logits, no GEMM; below).
#ifndef TRUTHGPT_KERNEL_SECTION  // ================================================ host part

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstring>
#include <vector>

#include "common/linear_cross_entropy_driver.h"
#include "cpu/gemm_engine.h"
#include "cpu/tensor_utils.h"

namespace truthgpt {
namespace cpu {
namespace {

// The row kernel's arguments, per-row pointers at the chunk's first row.
template <class T>
struct LceRowArgs {
  const T* bias;  // (V,) or nullptr
  const int64_t* target;
  const T* scale;  // grad_scale, or nullptr: no gradient
  T* loss;
  T* zrows;
  int64_t V, ignore_index;
  T eps, z_loss, cap;
};

constexpr int64_t kOnePassDwBytes = int64_t(256) << 20;
// The default chunk's logits (see linear_cross_entropy_fwd).
constexpr int64_t kCpuChunkBytes = int64_t(128) << 20;

// acc = src (first) or acc += src, n float32 / low-precision elements (the kernel section)
template <class S>
using AccumulateFn = void (*)(float* acc, const S* src, int64_t n, bool first);

// The driver's GEMMs. float32 ones go through the float32 engine; a result computed by oneDNN
// is copied or added into place (oneDNN's linear has no out= form; the copy is ~5% of the
// GEMM's time). With `lowp` (bfloat16 / float16 inputs where torch's GEMM for that dtype is
// fast: 2-4x float32's) every GEMM takes its operands in that dtype, as plain PyTorch under
// autocast does, and writes the logits / dx in it (the row kernel reads and writes them in
// place); a dW chunk product lands in one reused buffer and is added into the float32
// accumulator by our own kernel (torch's mixed-dtype add_ runs at a fifth of the bandwidth).
struct EngineGemm {
  c10::optional<at::ScalarType> lowp;
  AccumulateFn<bf16> add_bf16 = nullptr;
  AccumulateFn<f16> add_f16 = nullptr;
  mutable at::Tensor ws;  // the dW chunk product, reused across chunks
  mutable at::Tensor wt;  // the transposed dx chunk product, reused across chunks

  bool mixed_operands() const { return lowp.has_value(); }
  // large buffers through the kernels' output allocator (cpu/tensor_utils.h: huge pages, and
  // blocks cached across calls, so a training step's LM head pays no page faults)
  at::Tensor empty(at::IntArrayRef sizes, const at::TensorOptions& opts) const {
    return new_output(sizes, opts.dtype().toScalarType());
  }
  bool own(const at::Tensor& out) const {
    return out.scalar_type() == at::kFloat && use_onednn_fp32();
  }
  void mm_out(at::Tensor& out, const at::Tensor& a, const at::Tensor& b) const {
    if (own(out)) {
      out.copy_(mm_f32(a, b, /*contiguous=*/false));
    } else {
      c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
      at::mm_out(out, a, b);
    }
  }
  // dx_c = L W, K = V. In low precision as (W^T L^T)^T: oneDNN's bfloat16 GEMM runs the
  // long-K product 6-9% faster with the (d, nc) result (AMD Zen 5: 2048 x 32000 x 512 in 76-77
  // ms against 82-84, best of 7; the transpose back, tiled, ~0.2 ms).
  void dx_out(at::Tensor& out, const at::Tensor& L, const at::Tensor& w) const {
    if (!lowp.has_value() || out.scalar_type() != *lowp || L.scalar_type() != *lowp) {
      mm_out(out, L, w);
      return;
    }
    const int64_t n = out.numel();
    if (!wt.defined() || wt.numel() < n || wt.scalar_type() != out.scalar_type()) {
      wt = empty({n}, out.options());
    }
    at::Tensor t = wt.narrow(0, 0, n).view({out.size(1), out.size(0)});  // (d, nc)
    {
      c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
      at::mm_out(t, w.t(), L.t());
    }
    if (out.stride(1) == 1) {
      transpose_2byte(t, out);
    } else {
      out.copy_(t.t());
    }
  }
  void addmm_(at::Tensor& acc, const at::Tensor& a, const at::Tensor& b) const {
    if (own(acc)) {
      acc.add_(mm_f32(a, b, /*contiguous=*/false));
    } else {
      acc.addmm_(a, b);
    }
  }
  void accumulate(at::Tensor& acc, const at::Tensor& a, const at::Tensor& b, bool first) const {
    TORCH_INTERNAL_ASSERT(acc.scalar_type() == at::kFloat && acc.is_contiguous());
    const int64_t n = acc.numel();
    if (!ws.defined() || ws.numel() < n || ws.scalar_type() != a.scalar_type()) {
      ws = empty({n}, a.options());
    }
    at::Tensor prod = ws.narrow(0, 0, n).view(acc.sizes());
    {
      c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
      at::mm_out(prod, a, b);
    }
    float* dst = acc.mutable_data_ptr<float>();
    const void* src = prod.const_data_ptr();
    const bool half = prod.scalar_type() == at::kHalf;
    at::parallel_for(0, n, int64_t(1) << 16, [&](int64_t i0, int64_t i1) {
      if (half) {
        add_f16(dst + i0, static_cast<const f16*>(src) + i0, i1 - i0, first);
      } else {
        add_bf16(dst + i0, static_cast<const bf16*>(src) + i0, i1 - i0, first);
      }
    });
  }
};

}  // namespace
}  // namespace cpu
}  // namespace truthgpt

#define TRUTHGPT_KERNELS_FILE "cpu/linear_cross_entropy.cpp"
#include "cpu/foreach_isa.h"

namespace truthgpt {
namespace {

using namespace cpu;

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_cross_entropy_fwd(
    const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
    const at::Tensor& target, const c10::optional<at::Tensor>& grad_scale, int64_t ignore_index,
    double label_smoothing, double z_loss, double softcap, bool need_dweight, int64_t chunk_size) {
  const auto acc = lce::acc_type(x.scalar_type());
  const at::Tensor tgt = target.contiguous();
  // (a float32 bias beside low-precision x is rounded to x's dtype first, as the weight is for
  // the GEMMs and as F.linear under autocast rounds both)
  const at::Tensor bias_acc = !bias.has_value() ? at::Tensor()
                              : bias->scalar_type() != x.scalar_type()
                                  ? bias->to(x.scalar_type()).to(acc).contiguous()
                                  : bias->to(acc).contiguous();
  const at::Tensor scale =
      grad_scale.has_value() ? grad_scale->to(acc).contiguous() : at::Tensor();
  at::Tensor loss, zrows;
  const Isa isa = active_isa();
  EngineGemm gemm;
  const auto xt = x.scalar_type();
  if ((xt == at::kBFloat16 || xt == at::kHalf) && torch_has_fast_gemm(xt)) gemm.lowp = xt;
  gemm.add_bf16 = TRUTHGPT_ISA_FN(isa, lce_accumulate<bf16>);
  gemm.add_f16 = TRUTHGPT_ISA_FN(isa, lce_accumulate<f16>);
  // a low-precision dW in one pass over the chunks (not lce::kDwPasses, each of which computes
  // the logits again) when its float32 accumulator takes at most kOnePassDwBytes
  const int64_t dw_passes = weight.numel() * 4 <= kOnePassDwBytes ? 1 : lce::kDwPasses;
  // Default chunk: logits of about kCpuChunkBytes in the dtype they are kept in (x's with
  // low-precision GEMMs). Every chunk adds a (V, d) dW product into the float32 dW (through a
  // fresh oneDNN output in float32 there), so fewer, larger chunks cost less once buffers come
  // from the cached output allocator (no page faults): d 512, V 32000, N 2048 fwd+bwd, fp32:
  // 67 MiB chunks 701-729 ms, 134 MiB 614-643; bf16 x: 275 ms either way. With low-precision
  // GEMMs at large d the chunk grows to d / 512 x 64 MiB (at most 4x: d 2048, V 32000, N 8192,
  // 6.3 -> 5.2 s).
  const int64_t grow = gemm.lowp.has_value() ? std::clamp<int64_t>(weight.size(1) / 512, 1, 4) : 1;
  const int64_t lbytes = at::elementSize(gemm.lowp.has_value() ? xt : acc);
  const int64_t chunk = chunk_size > 0 ? chunk_size
                                       : std::max<int64_t>(1, std::max(kCpuChunkBytes, grow * lce::kChunkBytes) /
                                                                  std::max<int64_t>(1, weight.size(0) * lbytes));
  auto run = [&](auto tag) {
    using T = typename decltype(tag)::type;
    return lce::run(x, weight, bias, tgt, grad_scale, ignore_index, need_dweight, chunk,
                    /*upcast=*/true, loss, zrows, [&](at::Tensor& L, int64_t r0, int64_t nc) {
      LceRowArgs<T> a{bias_acc.defined() ? cptr<T>(bias_acc) : nullptr,
                   tgt.const_data_ptr<int64_t>() + r0,
                   scale.defined() ? cptr<T>(scale) + r0 : nullptr,
                   mptr<T>(loss) + r0,
                   mptr<T>(zrows) + r0,
                   L.size(1),
                   ignore_index,
                   static_cast<T>(label_smoothing),
                   static_cast<T>(z_loss),
                   static_cast<T>(softcap)};
      const int64_t ld = L.stride(0);
      auto rows = [&](auto stag) {  // L in T, or in x's low-precision dtype (lowp)
        using S = typename decltype(stag)::type;
        const auto fn = TRUTHGPT_ISA_FN(isa, lce_rows<T, S>);
        S* base = mptr<S>(L);
        at::parallel_for(0, nc, 1, [&](int64_t i0, int64_t i1) { fn(base, ld, a, i0, i1); });
      };
      if (L.scalar_type() == at::kBFloat16) {
        rows(Tag<bf16>{});
      } else if (L.scalar_type() == at::kHalf) {
        rows(Tag<f16>{});
      } else {
        rows(Tag<T>{});
      }
    }, gemm, dw_passes);
  };
  if (acc == at::kDouble) return run(Tag<double>{});
  return run(Tag<float>{});
}

// truthgpt::cross_entropy_fwd: the same row kernel on given logits (N, V) (tk.cross_entropy).
// Per row, in one task: with a gradient the row is copied into its row of the new gradient
// buffer (logits' dtype and shape; the user's logits are never written) and the kernel runs in
// place there, while the row is in cache; without one it reads the logits themselves (it writes
// a row only with a gradient or a softcap: then into a per-thread scratch row). No bias.
// inplace (truthgpt::cross_entropy_grad_): the kernel runs on the logits' own rows (unit inner
// stride, checked) and leaves the gradient there; no (N, V) buffer is allocated.
std::tuple<at::Tensor, at::Tensor, at::Tensor> cross_entropy_rows(
    const at::Tensor& logits_in, const at::Tensor& target, const c10::optional<at::Tensor>& grad_scale,
    int64_t ignore_index, double label_smoothing, double z_loss, double softcap, bool inplace) {
  TORCH_CHECK(logits_in.dim() == 2, "cross_entropy_fwd: logits must be (N, V), got ", logits_in.sizes());
  const auto xt = logits_in.scalar_type();
  TORCH_CHECK(xt == at::kFloat || xt == at::kDouble || xt == at::kBFloat16 || xt == at::kHalf,
              "cross_entropy_fwd: logits must be float32, float64, bfloat16 or float16, got ", xt);
  const int64_t N = logits_in.size(0), V = logits_in.size(1);
  TORCH_CHECK(target.dim() == 1 && target.size(0) == N && target.scalar_type() == at::kLong,
              "cross_entropy_fwd: target must be int64 (N,)");
  if (grad_scale.has_value()) {
    TORCH_CHECK(grad_scale->numel() == N, "cross_entropy_fwd: grad_scale must have N elements");
  }
  lce::check_targets(target, V, ignore_index);
  const auto acc = lce::acc_type(xt);
  TORCH_CHECK(!inplace || ((logits_in.stride(1) == 1 || V <= 1) && grad_scale.has_value()),
              "cross_entropy_grad_: logits must have unit inner stride, and grad_scale is required");
  const at::Tensor logits = logits_in.stride(1) == 1 || V <= 1 ? logits_in : logits_in.contiguous();
  const at::Tensor tgt = target.contiguous();
  const at::Tensor scale = grad_scale.has_value() ? grad_scale->to(acc).contiguous() : at::Tensor();
  at::Tensor loss = at::empty({N}, logits.options().dtype(acc));
  at::Tensor zrows = at::empty({N}, logits.options().dtype(acc));
  const bool grad = scale.defined();
  at::Tensor dlogits = grad && !inplace ? new_output({N, V}, xt) : at::empty({0}, logits.options());
  if (N == 0 || V == 0) return {loss, zrows, dlogits};
  const Isa isa = active_isa();
  const int64_t ld = logits.stride(0);
  const bool copy = grad || softcap > 0;  // the kernel writes the row
  auto run = [&](auto ttag, auto stag) {
    using T = typename decltype(ttag)::type;
    using S = typename decltype(stag)::type;
    const auto fn = TRUTHGPT_ISA_FN(isa, lce_rows<T, S>);
    const S* src = cptr<S>(logits);
    S* dst = inplace ? const_cast<S*>(src) : grad ? mptr<S>(dlogits) : nullptr;
    const int64_t ldd = inplace ? ld : V;
    at::parallel_for(0, N, 1, [&](int64_t i0, int64_t i1) {
      std::vector<S> scratch(copy && !grad ? V : 0);
      for (int64_t i = i0; i < i1; ++i) {
        LceRowArgs<T> a{nullptr,
                        tgt.const_data_ptr<int64_t>() + i,
                        grad ? cptr<T>(scale) + i : nullptr,
                        mptr<T>(loss) + i,
                        mptr<T>(zrows) + i,
                        V,
                        ignore_index,
                        static_cast<T>(label_smoothing),
                        static_cast<T>(z_loss),
                        static_cast<T>(softcap)};
        const S* row = src + i * ld;
        S* z = grad ? dst + i * ldd : copy ? scratch.data() : const_cast<S*>(row);  // (only read)
        if (z != row) std::memcpy(z, row, sizeof(S) * V);
        fn(z, 0, a, 0, 1);
      }
    });
  };
  if (xt == at::kDouble) {
    run(Tag<double>{}, Tag<double>{});
  } else if (xt == at::kBFloat16) {
    run(Tag<float>{}, Tag<bf16>{});
  } else if (xt == at::kHalf) {
    run(Tag<float>{}, Tag<f16>{});
  } else {
    run(Tag<float>{}, Tag<float>{});
  }
  return {loss, zrows, dlogits};
}

}  // namespace

TORCH_LIBRARY_IMPL(truthgpt, CPU, m) {
  m.impl("linear_cross_entropy_fwd", &linear_cross_entropy_fwd);
  m.impl("cross_entropy_fwd", &lce::cross_entropy_fwd<cross_entropy_rows>);
  m.impl("cross_entropy_grad_", &lce::cross_entropy_grad_<cross_entropy_rows>);
}

}  // namespace truthgpt

#else  // ========================================== kernel section (once per instruction set)

// A thread's scratch row of n elements (reused across calls).
template <class T>
T* scratch_row(int64_t n) {
  thread_local std::vector<T> buf;
  if (static_cast<int64_t>(buf.size()) < n) buf.resize(n);
  return buf.data();
}

// Rows [i0, i1) of a chunk: L row i at L + i * ld (V elements of S: T, or bf16 / f16 holding
// the logits of low-precision GEMMs, read into T and their gradient rounded back), its
// arguments at index i of a's per-row pointers.
template <class T, class S>
void lce_rows(S* L, int64_t ld, const LceRowArgs<T>& a, int64_t i0, int64_t i1) {
  using V = VecFor<T>;
  const int64_t n = a.V;
  const bool capped = a.cap > 0;
  const T inv_cap = capped ? T(1) / a.cap : T(0);
  const V vcap = V::set1(a.cap), vinv2 = V::set1(2 * inv_cap), one = V::set1(1), two = V::set1(2);
  for (int64_t i = i0; i < i1; ++i) {
    S* z = L + i * ld;
    const int64_t t = a.target[i];
    if (t == a.ignore_index) {
      a.loss[i] = 0;
      a.zrows[i] = 0;
      if (a.scale != nullptr) {
        for (int64_t j = 0; j < n; ++j) z[j] = from_acc<S>(T(0));
      }
      continue;
    }
    // z' = softcap(z + b), in place
    if (a.bias != nullptr || capped) {
      for (int64_t j = 0; j < n; j += V::W) {
        const int64_t m = n - j;
        V y = V::load(z + j, m);
        if (a.bias != nullptr) y = y + V::load(a.bias + j, m);
        if (capped) y = vcap * (one - two / (V::exp(y * vinv2) + one));  // cap tanh(y / cap)
        y.store(z + j, m);
      }
    }
    // row max (a NaN logit is skipped here and reaches the loss through the sum below)
    V vm = V::set1(-INFINITY);
    int64_t j = 0;
    for (; j + V::W <= n; j += V::W) vm = vmax(V::load(z + j, V::W), vm);
    T lanes[V::W];
    vm.store(lanes, V::W);
    T mx = -INFINITY;
    for (; j < n; ++j) {
      const T y = to_acc<T>(z[j]);
      mx = y > mx ? y : mx;
    }
    for (int l = 0; l < V::W; ++l) mx = lanes[l] > mx ? lanes[l] : mx;
    // sum exp(z' - max) and sum z'; with a gradient to write, each exp(z' - max) is kept (in
    // T, a row of the thread's scratch, in cache) for it: one exp per logit, not two
    const bool keep = a.scale != nullptr;
    T* e = keep ? scratch_row<T>(n) : nullptr;
    const V vmx = V::set1(mx);
    V vse = V::zero(), vsz = V::zero();
    int64_t k = 0;
    for (; k + V::W <= n; k += V::W) {
      const V y = V::load(z + k, V::W);
      const V ey = V::exp(y - vmx);
      if (keep) ey.store(e + k, V::W);
      vse = vse + ey;
      vsz = vsz + y;
    }
    T se = static_cast<T>(vse.hsum()), sz = static_cast<T>(vsz.hsum());
    for (; k < n; ++k) {  // the tail: padding lanes would add exp(0 - max)
      const T y = to_acc<T>(z[k]);
      const T ey = std::exp(y - mx);
      if (keep) e[k] = ey;
      se += ey;
      sz += y;
    }
    const T lse = mx + std::log(se);
    const T zt = to_acc<T>(z[t]);
    const T zterm = a.z_loss * lse * lse;
    a.zrows[i] = zterm;
    // (the smoothing term only with smoothing: a -inf logit makes sz -inf, and 0 * -inf is NaN)
    const T smooth = a.eps != 0 ? a.eps / static_cast<T>(n) * sz : T(0);
    a.loss[i] = lse - (1 - a.eps) * zt - smooth + zterm;
    if (a.scale == nullptr) continue;
    // gradient, in place
    const T s = a.scale[i];
    const T coef = s * (1 + 2 * a.z_loss * lse), off = s * a.eps / static_cast<T>(n);
    // p = exp(z' - lse) = exp(z' - max) / se
    const V vpcoef = V::set1(coef / se), voff = V::set1(off), vinv = V::set1(inv_cap);
    for (k = 0; k < n; k += V::W) {
      const int64_t m = n - k;
      V g = V::fma(V::load(e + k, m), vpcoef, V::zero() - voff);
      if (capped) {
        const V u = V::load(z + k, m) * vinv;
        g = g * (one - u * u);
      }
      g.store(z + k, m);
    }
    T gt = std::exp(zt - lse) * coef - off - s * (1 - a.eps);
    if (capped) gt *= 1 - (zt * inv_cap) * (zt * inv_cap);
    z[t] = from_acc<S>(gt);
  }
}

// acc[i] = src[i] (first) or acc[i] += src[i], src low precision: a dW chunk product.
template <class S>
void lce_accumulate(float* acc, const S* src, int64_t n, bool first) {
  using V = VecFor<float>;
  int64_t i = 0;
  for (; i + V::W <= n; i += V::W) {
    const V y = V::load(src + i, V::W);
    (first ? y : y + V::load(acc + i, V::W)).store(acc + i, V::W);
  }
  if (i < n) {
    const int64_t m = n - i;
    const V y = V::load(src + i, m);
    (first ? y : y + V::load(acc + i, m)).store(acc + i, m);
  }
}

#endif  // TRUTHGPT_KERNEL_SECTION
