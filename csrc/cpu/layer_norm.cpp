// LayerNorm on the CPU: y = (x - mean) * r * w + b with mean and r = rsqrt(var + eps) per
// row (biased variance by the corrected two-pass algorithm: accurate when |mean| >> std), in
// float32 for float/bf16 and double for double; mean and r are saved in that type. Backward,
// with xhat = (x - mean) r and g = dy w:
//   dx = r * (g - mean(g) - xhat * mean(g xhat)),  dw = sum over rows of dy xhat,  db = sum dy.
// dw and db are deterministic (cpu/norm_common.h: per-chunk partial rows added in chunk
// order).
// Vectorised per instruction set (cpu/vec_utils.h), threaded with at::parallel_for; rows of
// any length and any row stride.
#ifndef TRUTHGPT_KERNEL_SECTION  // ================================================ host part

#include <ATen/ATen.h>
#include <torch/library.h>

#include <limits>

#include "cpu/norm_common.h"
#include "cpu/tensor_utils.h"
#define TRUTHGPT_KERNELS_FILE "cpu/layer_norm.cpp"
#include "cpu/foreach_isa.h"

namespace truthgpt {
namespace {

using namespace cpu;

// The affine parameters as the kernels take them: none, weight, or weight and bias, both of
// one type (x's or float32) and contiguous. A bias without a weight gets a weight of ones;
// a float32 weight with an x-dtype bias (or the reverse) makes both the wider of the two.
struct Affine {
  int mode = 0;  // 0: none, 1: weight, 2: weight and bias
  at::Tensor w, b;
};

Affine affine_of(const char* op, const at::Tensor& x, const c10::optional<at::Tensor>& weight,
                 const c10::optional<at::Tensor>& bias) {
  norm::check_x(op, x);
  norm::check_param(op, "weight", x, weight);
  norm::check_param(op, "bias", x, bias);
  Affine a;
  if (!weight.has_value() && !bias.has_value()) return a;
  at::ScalarType st = weight.has_value() ? weight->scalar_type() : bias->scalar_type();
  if (weight.has_value() && bias.has_value() && weight->scalar_type() != bias->scalar_type()) {
    st = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;  // the wider: exact
  }
  a.w = weight.has_value() ? weight->to(st).contiguous()
                           : at::ones({x.size(-1)}, x.options().dtype(st));
  if (bias.has_value()) {
    a.b = bias->to(st).contiguous();
    a.mode = 2;
  } else {
    a.mode = 1;
  }
  return a;
}

// Calls f(Tag<Wt>{}, std::integral_constant<int, Mode>{}) with Wt the affine parameters'
// kernel type (T when there are none).
template <class T, class F>
void dispatch_affine(const Affine& a, F&& f) {
  auto with_type = [&](auto wtag) {
    if (a.mode == 0) {
      f(wtag, std::integral_constant<int, 0>{});
    } else if (a.mode == 1) {
      f(wtag, std::integral_constant<int, 1>{});
    } else {
      f(wtag, std::integral_constant<int, 2>{});
    }
  };
  if (a.mode != 0 && a.w.scalar_type() == at::kFloat) {
    with_type(Tag<float>{});
  } else {
    with_type(Tag<T>{});
  }
}

// mean and rstd: float32, float64 for float64 x (so that gradcheck sees float64 statistics)
at::ScalarType stat_type(at::ScalarType st) { return st == at::kDouble ? at::kDouble : at::kFloat; }

c10::optional<at::Tensor> to_float(const c10::optional<at::Tensor>& p) {
  return p.has_value() ? c10::optional<at::Tensor>(p->to(at::kFloat)) : c10::nullopt;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_fwd(
    const at::Tensor& x, const c10::optional<at::Tensor>& weight,
    const c10::optional<at::Tensor>& bias, double eps) {
  const Affine a = affine_of("layer_norm_fwd", x, weight, bias);
  if (x.scalar_type() == at::kHalf) {  // no fp16 kernel: compute in float
    auto [y, mean, rstd] = layer_norm_fwd(x.to(at::kFloat), to_float(weight), to_float(bias), eps);
    return {y.to(at::kHalf), mean, rstd};
  }
  auto out = new_output(x.sizes(), x.scalar_type());
  const auto sopt = x.options().dtype(stat_type(x.scalar_type()));
  auto mean = at::empty(x.sizes().slice(0, x.dim() - 1), sopt);
  auto rstd = at::empty(x.sizes().slice(0, x.dim() - 1), sopt);
  const int64_t n = x.size(-1);
  if (x.numel() == 0) {
    mean.fill_(std::numeric_limits<float>::quiet_NaN());  // statistics of no elements
    rstd.fill_(std::numeric_limits<float>::quiet_NaN());
    return {out, mean, rstd};
  }
  auto xr = as_rows(x);
  const int64_t rows = xr.size(0);
  const Isa isa = active_isa();
  dispatch_kernel_types(x.scalar_type(), "layer_norm_fwd", [&](auto tag) {
    using T = typename decltype(tag)::type;
    using A = acc_t<T>;
    dispatch_affine<T>(a, [&](auto wtag, auto mode) {
      using Wt = typename decltype(wtag)::type;
      constexpr int Mode = decltype(mode)::value;
      const auto fn = TRUTHGPT_ISA_FN(isa, layer_norm_fwd_rows<T, Wt, Mode>);
      const T* xp = cptr<T>(xr);
      const Wt* wp = Mode >= 1 ? cptr<Wt>(a.w) : nullptr;
      const Wt* bp = Mode == 2 ? cptr<Wt>(a.b) : nullptr;
      T* yp = mptr<T>(out);
      A* mp = mean.mutable_data_ptr<A>();
      A* rp = rstd.mutable_data_ptr<A>();
      const int64_t xs = row_stride(xr);
      norm::for_rows(rows, n, [&](int64_t r0, int64_t r1) {
        fn(xp, xs, wp, bp, yp, mp, rp, n, eps, r0, r1);
      });
    });
  });
  return {out, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_bwd(
    const at::Tensor& grad, const at::Tensor& x, const c10::optional<at::Tensor>& weight,
    const c10::optional<at::Tensor>& bias, const at::Tensor& mean, const at::Tensor& rstd) {
  const Affine a = affine_of("layer_norm_bwd", x, weight, bias);
  norm::check_grad("layer_norm_bwd", grad, x);
  const int64_t n = x.size(-1);
  const auto st = stat_type(x.scalar_type() == at::kHalf ? at::kFloat : x.scalar_type());
  TORCH_CHECK(mean.scalar_type() == st && rstd.scalar_type() == st &&
                  mean.numel() * n == x.numel() && rstd.numel() * n == x.numel(),
              "layer_norm_bwd: mean and rstd must be ", st, " with one value per row of x");
  // dweight / dbias of absent parameters: empty, and distinct (outputs must not alias)
  auto empty = [&] { return x.new_empty({0}); };
  if (x.scalar_type() == at::kHalf) {
    auto [dx, dw, db] = layer_norm_bwd(grad.to(at::kFloat), x.to(at::kFloat), to_float(weight),
                                       to_float(bias), mean, rstd);
    return {dx.to(at::kHalf), weight.has_value() ? dw.to(weight->scalar_type()) : empty(),
            bias.has_value() ? db.to(bias->scalar_type()) : empty()};
  }
  auto dx = new_output(x.sizes(), x.scalar_type());
  auto dw = a.mode >= 1 ? at::empty({n}, a.w.options()) : empty();
  auto db = a.mode == 2 ? at::empty({n}, a.b.options()) : empty();
  // back to the caller's dtypes (affine_of may have made them float32 or made up a weight)
  auto finish = [&]() -> std::tuple<at::Tensor, at::Tensor, at::Tensor> {
    return {dx, weight.has_value() ? dw.to(weight->scalar_type()) : empty(),
            bias.has_value() ? db.to(bias->scalar_type()) : empty()};
  };
  if (x.numel() == 0) {
    dw.zero_();  // sums over no rows
    db.zero_();
    return finish();
  }
  auto yr = as_rows(grad), xr = as_rows(x);
  const auto ms = mean.reshape({-1}).contiguous(), rs = rstd.reshape({-1}).contiguous();
  const int64_t rows = xr.size(0);
  const auto [chunk, nchunks] = norm::chunks_of(rows);
  const Isa isa = active_isa();
  dispatch_kernel_types(x.scalar_type(), "layer_norm_bwd", [&](auto tag) {
    using T = typename decltype(tag)::type;
    using A = acc_t<T>;
    dispatch_affine<T>(a, [&](auto wtag, auto mode) {
      using Wt = typename decltype(wtag)::type;
      constexpr int Mode = decltype(mode)::value;
      // partial rows: (nchunks, n) for dweight, then (nchunks, n) for dbias
      at::Tensor part;
      if (Mode >= 1) part = at::empty({Mode, nchunks, n}, x.options().dtype(stat_type(x.scalar_type())));
      A* pp = Mode >= 1 ? part.mutable_data_ptr<A>() : nullptr;
      const auto fn = TRUTHGPT_ISA_FN(isa, layer_norm_bwd_chunks<T, Wt, Mode>);
      const T* yp = cptr<T>(yr);
      const T* xp = cptr<T>(xr);
      const Wt* wp = Mode >= 1 ? cptr<Wt>(a.w) : nullptr;
      const A* mp = ms.const_data_ptr<A>();
      const A* rp = rs.const_data_ptr<A>();
      T* dxp = mptr<T>(dx);
      const int64_t ys = row_stride(yr), xs = row_stride(xr);
      norm::for_chunks(nchunks, chunk, n, [&](int64_t c0, int64_t c1) {
        fn(yp, ys, xp, xs, wp, mp, rp, dxp, pp, rows, n, chunk, c0, c1);
      });
      if constexpr (Mode >= 1) {
        const auto reduce = TRUTHGPT_ISA_FN(isa, norm_reduce_cols<A, Wt>);
        Wt* dwp = mptr<Wt>(dw);
        Wt* dbp = Mode == 2 ? mptr<Wt>(db) : nullptr;
        norm::for_reduce_cols(Mode, nchunks, n, [&](int64_t j0, int64_t j1) {
          reduce(pp, nchunks, n, dwp, j0, j1);
          if (Mode == 2) reduce(pp + nchunks * n, nchunks, n, dbp, j0, j1);
        });
      }
    });
  });
  return finish();
}

}  // namespace

TORCH_LIBRARY_IMPL(truthgpt, CPU, m) {
  m.impl("layer_norm_fwd", &layer_norm_fwd);
  m.impl("layer_norm_bwd", &layer_norm_bwd);
}

}  // namespace truthgpt

#else  // ========================================== kernel section (once per instruction set)

#include "cpu/norm_kernels.h"

// W ones then zeros: V::load(kLaneOnes<A>, m) is 1 on the first m lanes and 0 on the others.
template <class A>
constexpr A kLaneOnes[16] = {1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1};

// Rows [r0, r1) of x (unit inner stride, row stride xs) into y (contiguous), mean and rstd.
// Three passes over each row (sum, deviations, output); the second and third read
// it from cache, and the third prefetches the next row so memory stays busy.
template <class T, class Wt, int Mode>
void layer_norm_fwd_rows(const T* x, int64_t xs, const Wt* w, const Wt* b, T* y,
                         acc_t<T>* mean, acc_t<T>* rstd, int64_t n, double eps, int64_t r0,
                         int64_t r1) {
  using V = VecFor<T>;
  using A = acc_t<T>;
  constexpr int W = V::W;
  for (int64_t r = r0; r < r1; ++r) {
    const T* xr = x + r * xs;
    const T* next = r + 1 < r1 ? xr + xs : xr;
    T* yr = y + r * n;
    V s0 = V::zero(), s1 = V::zero();
    int64_t i = 0;
    for (; i + 2 * W <= n; i += 2 * W) {
      s0 = s0 + V::load(xr + i, W);
      s1 = s1 + V::load(xr + i + W, W);
    }
    for (; i < n; i += W) s0 = s0 + V::load(xr + i, n - i);
    const A mu0 = (s0 + s1).hsum() / A(n);
    const V m0 = V::set1(mu0);
    // deviations from mu0: their sum corrects mu0's rounding error (which grows with |mean|
    // and n), their squares give the variance (the "corrected two-pass" algorithm)
    V d0 = V::zero(), d1 = V::zero(), q0 = V::zero(), q1 = V::zero();
    for (i = 0; i + 2 * W <= n; i += 2 * W) {
      const V a = V::load(xr + i, W) - m0, b = V::load(xr + i + W, W) - m0;
      d0 = d0 + a;
      d1 = d1 + b;
      q0 = V::fma(a, a, q0);
      q1 = V::fma(b, b, q1);
    }
    for (; i < n; i += W) {  // the lanes past the row's end load 0: mask their deviation
      const int64_t m = n - i;
      const V a = (V::load(xr + i, m) - m0) * V::load(kLaneOnes<A>, m);
      d0 = d0 + a;
      q0 = V::fma(a, a, q0);
    }
    const A dm = (d0 + d1).hsum() / A(n);
    const A var = std::max(A(0), (q0 + q1).hsum() / A(n) - dm * dm);
    const A mu = mu0 + dm;
    const A rs = A(1) / std::sqrt(var + A(eps));
    mean[r] = mu;
    rstd[r] = rs;
    const V mv = V::set1(mu), rv = V::set1(rs);
    for (i = 0; i < n; i += W) {
      const int64_t m = n - i;
      prefetch(next + i);
      V v = (V::load(xr + i, m) - mv) * rv;
      if constexpr (Mode == 1) v = v * V::load(w + i, m);
      if constexpr (Mode == 2) v = V::fma(v, V::load(w + i, m), V::load(b + i, m));
      v.store(yr + i, m);
    }
  }
}

// G rows of the backward together (so the partial rows and the weight are loaded and stored
// once per G rows): dx of each row, and part_w += dy * xhat, part_b += dy row after row.
// Lanes past the row's end load dy = 0, so they add nothing to any sum.
template <class T, class Wt, int Mode, int G>
inline void layer_norm_bwd_group(const T* const* dy, const T* const* x, T* const* dx,
                                 const acc_t<T>* mu, const acc_t<T>* rs, const Wt* w,
                                 acc_t<T>* part_w, acc_t<T>* part_b, const T* next_dy,
                                 const T* next_x, int64_t n) {
  using V = VecFor<T>;
  using A = acc_t<T>;
  constexpr int W = V::W;
  V sg[G], sgx[G], mv[G], rv[G];
  for (int g = 0; g < G; ++g) {
    sg[g] = sgx[g] = V::zero();
    mv[g] = V::set1(mu[g]);
    rv[g] = V::set1(rs[g]);
  }
  for (int64_t i = 0; i < n; i += W) {  // sums of g = dy w and of g xhat per row
    const int64_t m = n - i;
    V wv = V::zero();
    if constexpr (Mode >= 1) wv = V::load(w + i, m);
    for (int g = 0; g < G; ++g) {
      V gy = V::load(dy[g] + i, m);
      if constexpr (Mode >= 1) gy = gy * wv;
      sg[g] = sg[g] + gy;
      sgx[g] = V::fma(gy, (V::load(x[g] + i, m) - mv[g]) * rv[g], sgx[g]);
    }
  }
  V c1[G], c2[G];
  for (int g = 0; g < G; ++g) {
    c1[g] = V::set1(sg[g].hsum() / A(n));
    c2[g] = V::set1(sgx[g].hsum() / A(n));
  }
  for (int64_t i = 0; i < n; i += W) {  // dx = r (g - mean(g) - xhat mean(g xhat)); partials
    const int64_t m = n - i;
    prefetch(next_dy + i);
    prefetch(next_x + i);
    V wv = V::zero(), pw = V::zero(), pb = V::zero();
    if constexpr (Mode >= 1) {
      wv = V::load(w + i, m);
      pw = V::load(part_w + i, m);
    }
    if constexpr (Mode == 2) pb = V::load(part_b + i, m);
    for (int g = 0; g < G; ++g) {
      const V dyv = V::load(dy[g] + i, m);
      const V xh = (V::load(x[g] + i, m) - mv[g]) * rv[g];
      V gy = dyv;
      if constexpr (Mode >= 1) gy = dyv * wv;
      ((gy - c1[g] - xh * c2[g]) * rv[g]).store(dx[g] + i, m);
      if constexpr (Mode >= 1) pw = V::fma(dyv, xh, pw);
      if constexpr (Mode == 2) pb = pb + dyv;
    }
    if constexpr (Mode >= 1) pw.store(part_w + i, m);
    if constexpr (Mode == 2) pb.store(part_b + i, m);
  }
}

// Chunks [c0, c1) of `chunk` rows each: dx of their rows, and (Mode >= 1) each chunk's
// partial rows part[0][c] = sum of dy * xhat, (Mode == 2) part[1][c] = sum of dy, summed
// over the chunk's rows in row order. part is (Mode, nchunks, n).
template <class T, class Wt, int Mode>
void layer_norm_bwd_chunks(const T* dy, int64_t ys, const T* x, int64_t xs, const Wt* w,
                           const acc_t<T>* mean, const acc_t<T>* rstd, T* dx, acc_t<T>* part,
                           int64_t rows, int64_t n, int64_t chunk, int64_t c0, int64_t c1) {
  using V = VecFor<T>;
  using A = acc_t<T>;
  constexpr int W = V::W;
  constexpr int G = 4;
  const int64_t nchunks = (rows + chunk - 1) / chunk;
  for (int64_t c = c0; c < c1; ++c) {
    A* pw = Mode >= 1 ? part + c * n : nullptr;
    A* pb = Mode == 2 ? part + (nchunks + c) * n : nullptr;
    for (int64_t i = 0; i < n; i += W) {
      if constexpr (Mode >= 1) V::zero().store(pw + i, n - i);
      if constexpr (Mode == 2) V::zero().store(pb + i, n - i);
    }
    const int64_t rend = std::min(rows, (c + 1) * chunk);
    const int64_t last = std::min(rows, c1 * chunk) - 1;  // last row of this task
    for (int64_t r = c * chunk; r < rend;) {
      const int g = rend - r >= G ? G : 1;
      const T* dyp[G];
      const T* xp[G];
      T* dxp[G];
      for (int k = 0; k < g; ++k) {
        dyp[k] = dy + (r + k) * ys;
        xp[k] = x + (r + k) * xs;
        dxp[k] = dx + (r + k) * n;
      }
      const int64_t nr = std::min(r + g, last);  // a row to prefetch (the next group's first)
      if (g == G) {
        layer_norm_bwd_group<T, Wt, Mode, G>(dyp, xp, dxp, mean + r, rstd + r, w, pw, pb,
                                             dy + nr * ys, x + nr * xs, n);
      } else {
        layer_norm_bwd_group<T, Wt, Mode, 1>(dyp, xp, dxp, mean + r, rstd + r, w, pw, pb,
                                             dy + nr * ys, x + nr * xs, n);
      }
      r += g;
    }
  }
}

#endif  // TRUTHGPT_KERNEL_SECTION
