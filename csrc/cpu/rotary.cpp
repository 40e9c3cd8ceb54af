// Rotary embedding on the CPU: the first R = 2 * cos.shape[-1] dims of every head vector of
// x (B, H, S, D) rotate by the angle of the token's position p = position_ids[b, s]:
//   pairs (x[d], x[d + R/2]) (GPT-NeoX/Llama) or, interleaved, (x[2d], x[2d + 1]) (GPT-J),
//   (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin) with cos/sin = cos[p, d], sin[p, d];
// dims R..D-1 are copied through. rotary_qk_fwd rotates q and k (their head counts may
// differ) in one parallel pass. The backward is this kernel with sin negated (ops/rotary.py).
// x may have any strides (unit inner stride is viewed, else copied); position_ids (B, S)
// int64 may be a broadcast view; cos/sin are float32 or x's dtype. Outputs are contiguous.
// Vectorised per instruction set (cpu/vec_utils.h), threaded over head vectors.
#ifndef TRUTHGPT_KERNEL_SECTION  // ================================================ host part

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <atomic>

#include "cpu/tensor_utils.h"

namespace truthgpt {
namespace cpu {

// Arguments of the kernel (shared by the host part and every instruction set's kernel).
template <class T>
struct RotaryTensor {
  const T* x;
  T* out;  // (B, H, S, D), unit inner stride
  int64_t H, sb, sh, ss;  // x's strides
  int64_t osb, osh, oss;  // out's
  bool s_major;           // rows visited in (b, s, h) order (both laid out (B, S, H, D)), else (b, h, s)
};

template <class T, class C>
struct RotaryArgs {
  RotaryTensor<T> t[2];
  int n_tensors;
  int64_t B, S, D, half, P;
  bool interleaved;
  const C* cos;
  const C* sin;
  int64_t cs, sns;          // row strides of cos, sin
  const int64_t* pos;
  int64_t psb, pss;         // strides of position_ids (B, S)
};

constexpr int64_t kAheadTokens = 4;  // rotary_rows prefetches rows this many tokens ahead

}  // namespace cpu
}  // namespace truthgpt

#define TRUTHGPT_KERNELS_FILE "cpu/rotary.cpp"
#include "cpu/foreach_isa.h"

namespace truthgpt {
namespace {

using namespace cpu;

constexpr int64_t kGrainElems = 16384;  // minimum elements per thread

// Unit inner stride, else a contiguous copy.
at::Tensor inner_contiguous(const at::Tensor& t) {
  return (t.size(-1) <= 1 || t.stride(-1) == 1) ? t : t.contiguous();
}

struct Prepared {
  at::Tensor cos, sin, pos;
};

// Checks the shared arguments and brings cos/sin/position_ids into the kernel's layout:
// cos/sin float32 or x's dtype with unit inner stride, position_ids int64 (B, S).
Prepared prepare(const char* op, const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin,
                 const at::Tensor& position_ids) {
  TORCH_CHECK(x.dim() == 4, op, ": x must be (B, H, S, D), got ", x.sizes());
  TORCH_CHECK(cos.dim() == 2 && sin.sizes() == cos.sizes(), op,
              ": cos and sin must be (P, R/2) of one shape, got ", cos.sizes(), " and ", sin.sizes());
  TORCH_CHECK(cos.size(1) >= 1 && 2 * cos.size(1) <= x.size(3), op, ": rotary dim 2 * ",
              cos.size(1), " must lie in [2, head dim ", x.size(3), "]");
  const int64_t B = x.size(0), S = x.size(2);
  TORCH_CHECK(position_ids.scalar_type() == at::kLong || position_ids.scalar_type() == at::kInt,
              op, ": position_ids must be int64, got ", position_ids.scalar_type());
  TORCH_CHECK((position_ids.dim() == 2 && position_ids.size(1) == S &&
               (position_ids.size(0) == B || position_ids.size(0) == 1)) ||
                  (position_ids.dim() == 1 && position_ids.size(0) == S),
              op, ": position_ids must be (", B, ", ", S, "), got ", position_ids.sizes());
  // cos/sin in float32 or x's dtype (anything else becomes float32, or float64 for x fp64)
  const auto xt = x.scalar_type();
  auto ct = cos.scalar_type();
  if (ct != at::kFloat && ct != xt) ct = xt == at::kDouble ? at::kDouble : at::kFloat;
  return {inner_contiguous(cos.to(ct)), inner_contiguous(sin.to(ct)),
          position_ids.to(at::kLong).expand({B, S})};
}

// Calls f(Tag<C>{}) with C the kernel type of cos/sin: float or T.
template <class T, class F>
void dispatch_cos_type(const at::Tensor& cos, F&& f) {
  if (cos.scalar_type() == at::kFloat) {
    f(Tag<float>{});
  } else {
    f(Tag<T>{});
  }
}

// Rotates `heads` of one or two (B, H, S, D) tensors into outputs (unit inner stride) in one pass.
void run(const char* op, std::initializer_list<std::pair<const at::Tensor*, at::Tensor*>> io,
         const Prepared& p, bool interleaved) {
  const at::Tensor& x0 = *io.begin()->first;
  const int64_t B = x0.size(0), S = x0.size(2), D = x0.size(3);
  const int64_t half = p.cos.size(1), P = p.cos.size(0);
  const Isa isa = active_isa();
  std::atomic<bool> in_range{true};
  dispatch_kernel_types(x0.scalar_type(), op, [&](auto tag) {
    using T = typename decltype(tag)::type;
    dispatch_cos_type<T>(p.cos, [&](auto ctag) {
      using C = typename decltype(ctag)::type;
      RotaryArgs<T, C> a{};
      a.n_tensors = 0;
      for (const auto& [in, out] : io) {
        auto& t = a.t[a.n_tensors++];
        t.x = cptr<T>(*in);
        t.out = mptr<T>(*out);
        t.H = in->size(1);
        t.sb = in->stride(0);
        t.sh = in->stride(1);
        t.ss = in->stride(2);
        t.osb = out->stride(0);
        t.osh = out->stride(1);
        t.oss = out->stride(2);
        // (B, S, H, D) memory (new_output_bhsd gave out x's order): walk it in memory order
        t.s_major = t.H > 1 && S > 1 && out->stride(1) < out->stride(2) && in->stride(1) < in->stride(2);
      }
      a.B = B;
      a.S = S;
      a.D = D;
      a.half = half;
      a.P = P;
      a.interleaved = interleaved;
      a.cos = cptr<C>(p.cos);
      a.sin = cptr<C>(p.sin);
      a.cs = p.cos.stride(0);
      a.sns = p.sin.stride(0);
      a.pos = p.pos.const_data_ptr<int64_t>();
      a.psb = p.pos.stride(0);
      a.pss = p.pos.stride(1);
      int64_t total = 0;
      for (int i = 0; i < a.n_tensors; ++i) total += B * a.t[i].H * S;
      const auto fn = TRUTHGPT_ISA_FN(isa, rotary_rows<T, C>);
      at::parallel_for(0, total, std::max<int64_t>(1, kGrainElems / D), [&](int64_t r0, int64_t r1) {
        if (!fn(a, r0, r1)) in_range = false;
      });
    });
  });
  TORCH_CHECK(in_range.load(), op, ": position_ids must lie in [0, ", P,
              ") (the rows of cos/sin)");
}

at::Tensor rotary_fwd(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin,
                      const at::Tensor& position_ids, bool interleaved) {
  const auto p = prepare("rotary_fwd", x, cos, sin, position_ids);
  TORCH_CHECK(p.cos.scalar_type() == at::kFloat || p.cos.scalar_type() == x.scalar_type(),
              "rotary_fwd: cos/sin dtype");
  auto out = new_output_bhsd(x.sizes(), x.scalar_type(), x);
  if (out.numel() == 0) return out;
  const auto xc = inner_contiguous(x);
  run("rotary_fwd", {{&xc, &out}}, p, interleaved);
  return out;
}

std::tuple<at::Tensor, at::Tensor> rotary_qk_fwd(const at::Tensor& q, const at::Tensor& k,
                                                 const at::Tensor& cos, const at::Tensor& sin,
                                                 const at::Tensor& position_ids, bool interleaved) {
  const auto p = prepare("rotary_qk_fwd", q, cos, sin, position_ids);
  TORCH_CHECK(k.dim() == 4 && k.size(0) == q.size(0) && k.size(2) == q.size(2) &&
                  k.size(3) == q.size(3),
              "rotary_qk_fwd: k must match q in batch, seq and head dim: q ", q.sizes(), ", k ",
              k.sizes());
  TORCH_CHECK(k.scalar_type() == q.scalar_type(), "rotary_qk_fwd: q (", q.scalar_type(),
              ") and k (", k.scalar_type(), ") must have the same dtype");
  auto oq = new_output_bhsd(q.sizes(), q.scalar_type(), q);
  auto ok = new_output_bhsd(k.sizes(), k.scalar_type(), k);
  const auto qc = inner_contiguous(q), kc = inner_contiguous(k);
  if (oq.numel() && ok.numel()) {
    run("rotary_qk_fwd", {{&qc, &oq}, {&kc, &ok}}, p, interleaved);
  } else if (oq.numel()) {
    run("rotary_qk_fwd", {{&qc, &oq}}, p, interleaved);
  } else if (ok.numel()) {
    run("rotary_qk_fwd", {{&kc, &ok}}, p, interleaved);
  }
  return {oq, ok};
}

}  // namespace

TORCH_LIBRARY_IMPL(truthgpt, CPU, m) {
  m.impl("rotary_fwd", &rotary_fwd);
  m.impl("rotary_qk_fwd", &rotary_qk_fwd);
}

}  // namespace truthgpt

#else  // ========================================== kernel section (once per instruction set)

// Head vectors [r0, r1) of the concatenation [t[0] rows..., t[1] rows...], each tensor's
// rows in (b, h, s) order, or (b, s, h) for a tensor laid out (B, S, H, D) (s_major). Returns false if a position was out of range (its row is skipped).
template <class T, class C>
bool rotary_rows(const RotaryArgs<T, C>& a, int64_t r0, int64_t r1) {
  using V = VecFor<T>;
  constexpr int W = V::W;
  const int64_t S = a.S, D = a.D, half = a.half, R = 2 * half;
  bool ok = true;
  int64_t r = r0;
  int64_t first = 0;  // global row index of the current tensor's row 0
  for (int ti = 0; ti < a.n_tensors && r < r1; ++ti) {
    const RotaryTensor<T>& t = a.t[ti];
    const int64_t n_rows = a.B * t.H * S, end = std::min(r1, first + n_rows);
    if (r >= end) {
      first += n_rows;
      continue;
    }
    const int64_t local = r - first;
    int64_t s, h, b = local / (S * t.H);
    if (t.s_major) {
      h = local % t.H;
      s = (local / t.H) % S;
    } else {
      s = local % S;
      h = (local / S) % t.H;
    }
    // this head's row kAheadTokens tokens on is fetched with each row: q / k are usually views of a fused
    // (B, S, (Hq + 2 Hkv) D) projection, rows of a few hundred bytes at a stride of kilobytes,
    // which the hardware prefetchers lose at every page; from memory this runs 3x faster
    // (0.63 -> 0.21 ms for q, k of B2 S1024 H8 D64 bf16, BENCHMARKS.md fifteenth session)
    const int64_t ahead = kAheadTokens * t.ss * static_cast<int64_t>(sizeof(T));  // bytes
    for (; r < end; ++r) {
      const int64_t p = a.pos[b * a.psb + s * a.pss];
      const T* xr = t.x + b * t.sb + h * t.sh + s * t.ss;
      T* orow = t.out + b * t.osb + h * t.osh + s * t.oss;
      const uintptr_t far = reinterpret_cast<uintptr_t>(xr) + ahead;  // (prefetches never fault)
      for (int64_t x = 0; x < D * static_cast<int64_t>(sizeof(T)); x += 64)
        prefetch(reinterpret_cast<const void*>(far + x));
      if (p < 0 || p >= a.P) {
        ok = false;
      } else {
        const C* cr = a.cos + p * a.cs;
        const C* sr = a.sin + p * a.sns;
        if (!a.interleaved) {
          for (int64_t d = 0; d < half; d += W) {
            const int64_t m = half - d;
            const V c = V::load(cr + d, m), sn = V::load(sr + d, m);
            const V x1 = V::load(xr + d, m), x2 = V::load(xr + half + d, m);
            (x1 * c - x2 * sn).store(orow + d, m);
            (x2 * c + x1 * sn).store(orow + half + d, m);
          }
        } else {
          for (int64_t d = 0; d < R; d += W) {
            const int64_t m = R - d;
            const V c = V::load_dup(cr + d / 2, m), sn = V::load_dup(sr + d / 2, m);
            const V v = V::load(xr + d, m);
            // even lanes x0 c - x1 s, odd lanes x1 c + x0 s
            V::fmaddsub(v, c, V::swap_pairs(v) * sn).store(orow + d, m);
          }
        }
        if (D > R) std::memcpy(orow + R, xr + R, static_cast<size_t>(D - R) * sizeof(T));
      }
      if (t.s_major) {
        if (++h == t.H) {
          h = 0;
          if (++s == S) {
            s = 0;
            ++b;
          }
        }
      } else if (++s == S) {
        s = 0;
        if (++h == t.H) {
          h = 0;
          ++b;
        }
      }
    }
    first += n_rows;
  }
  return ok;
}

#endif  // TRUTHGPT_KERNEL_SECTION
