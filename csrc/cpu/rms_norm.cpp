// RMSNorm on the CPU: y = x * r * w with r = rsqrt(mean(x^2) + eps) per row (float32
// statistics for float/bf16/fp16, double for double; r saved as float32), and its backward
//   dx = r * (dy w) - x * r^3 * mean(dy w x),   dw = sum over rows of dy * x * r.
// dw is deterministic (cpu/norm_common.h: per-chunk partial rows added in chunk order).
// Vectorised per instruction set (cpu/vec_utils.h), threaded with at::parallel_for; rows of
// any length and any row stride.
#ifndef TRUTHGPT_KERNEL_SECTION  // ================================================ host part

#include <ATen/ATen.h>
#include <torch/library.h>

#include <limits>

#include "cpu/norm_common.h"
#include "cpu/tensor_utils.h"
#define TRUTHGPT_KERNELS_FILE "cpu/rms_norm.cpp"
#include "cpu/foreach_isa.h"

namespace truthgpt {
namespace {

using namespace cpu;

void check_weight(const char* op, const at::Tensor& x, const c10::optional<at::Tensor>& weight) {
  norm::check_x(op, x);
  norm::check_param(op, "weight", x, weight);
}

// Calls f(Tag<Wt>{}, has_weight) with Wt the weight's kernel type (T when there is none).
template <class T, class F>
void dispatch_weight(const c10::optional<at::Tensor>& weight, F&& f) {
  if (!weight.has_value()) {
    f(Tag<T>{}, std::false_type{});
  } else if (weight->scalar_type() == at::kFloat) {
    f(Tag<float>{}, std::true_type{});
  } else {
    f(Tag<T>{}, std::true_type{});
  }
}

// The backward's weight dispatch around a chunked pass: body(Tag<Wt>{}, has_w, part) fills one
// partial dweight row per chunk (part: nchunks x n in T's accumulation type, null without a
// weight), which are then summed in chunk order into dw.
template <class T, class F>
void bwd_with_dweight(const c10::optional<at::Tensor>& w, int64_t nchunks, int64_t n,
                      const at::TensorOptions& opts, const Isa& isa, at::Tensor& dw, F&& body) {
  using A = acc_t<T>;
  dispatch_weight<T>(w, [&](auto wtag, auto has_w) {
    using Wt = typename decltype(wtag)::type;
    constexpr bool HasW = decltype(has_w)::value;
    at::Tensor part = norm::partial_rows<A>(HasW, nchunks, n, opts);
    A* pp = HasW ? part.mutable_data_ptr<A>() : nullptr;
    body(wtag, has_w, pp);
    if constexpr (HasW) {
      const auto reduce = TRUTHGPT_ISA_FN(isa, norm_reduce_cols<A, Wt>);
      Wt* dwp = mptr<Wt>(dw);
      norm::for_reduce_cols(1, nchunks, n, [&](int64_t j0, int64_t j1) { reduce(pp, nchunks, n, dwp, j0, j1); });
    }
  });
}

std::tuple<at::Tensor, at::Tensor> rms_norm_fwd(const at::Tensor& x,
                                                const c10::optional<at::Tensor>& weight,
                                                double eps) {
  check_weight("rms_norm_fwd", x, weight);
  auto out = new_output(x.sizes(), x.scalar_type());
  auto rstd = at::empty(x.sizes().slice(0, x.dim() - 1), x.options().dtype(at::kFloat));
  const int64_t n = x.size(-1);
  if (x.numel() == 0) {
    rstd.fill_(std::numeric_limits<float>::quiet_NaN());  // mean over no elements
    return {out, rstd};
  }
  auto xr = as_rows(x);
  const int64_t rows = xr.size(0);
  const auto w = weight.has_value() ? c10::optional<at::Tensor>(weight->contiguous()) : c10::nullopt;
  const Isa isa = active_isa();
  dispatch_kernel_types(x.scalar_type(), "rms_norm_fwd", [&](auto tag) {
    using T = typename decltype(tag)::type;
    dispatch_weight<T>(w, [&](auto wtag, auto has_w) {
      using Wt = typename decltype(wtag)::type;
      constexpr bool HasW = decltype(has_w)::value;
      const auto fn = TRUTHGPT_ISA_FN(isa, rms_norm_fwd_rows<T, Wt, HasW>);
      const T* xp = cptr<T>(xr);
      const Wt* wp = HasW ? cptr<Wt>(*w) : nullptr;
      T* yp = mptr<T>(out);
      float* rp = rstd.mutable_data_ptr<float>();
      const int64_t xs = row_stride(xr);
      norm::for_rows(rows, n, [&](int64_t r0, int64_t r1) { fn(xp, xs, wp, yp, rp, n, eps, r0, r1); });
    });
  });
  return {out, rstd};
}

std::tuple<at::Tensor, at::Tensor> rms_norm_bwd(const at::Tensor& grad, const at::Tensor& x,
                                                const c10::optional<at::Tensor>& weight,
                                                const at::Tensor& rstd) {
  check_weight("rms_norm_bwd", x, weight);
  norm::check_grad("rms_norm_bwd", grad, x);
  TORCH_CHECK(rstd.scalar_type() == at::kFloat && rstd.numel() * x.size(-1) == x.numel(),
              "rms_norm_bwd: rstd must be float32 with one value per row of x");
  const int64_t n = x.size(-1);
  auto dx = new_output(x.sizes(), x.scalar_type());
  auto dw = weight.has_value() ? at::empty({n}, weight->options()) : x.new_empty({0});
  if (x.numel() == 0) {
    dw.zero_();  // a sum over no rows
    return {dx, dw};
  }
  auto yr = as_rows(grad), xr = as_rows(x);
  const auto rs = rstd.reshape({-1}).contiguous();
  const auto w = weight.has_value() ? c10::optional<at::Tensor>(weight->contiguous()) : c10::nullopt;
  const int64_t rows = xr.size(0);
  const auto [chunk, nchunks] = norm::chunks_of(rows);
  const Isa isa = active_isa();
  dispatch_kernel_types(x.scalar_type(), "rms_norm_bwd", [&](auto tag) {
    using T = typename decltype(tag)::type;
    bwd_with_dweight<T>(w, nchunks, n, x.options(), isa, dw, [&](auto wtag, auto has_w, acc_t<T>* pp) {
      using Wt = typename decltype(wtag)::type;
      constexpr bool HasW = decltype(has_w)::value;
      const auto fn = TRUTHGPT_ISA_FN(isa, rms_norm_bwd_chunks<T, Wt, HasW>);
      const T* yp = cptr<T>(yr);
      const T* xp = cptr<T>(xr);
      const Wt* wp = HasW ? cptr<Wt>(*w) : nullptr;
      const float* rp = rs.const_data_ptr<float>();
      T* dxp = mptr<T>(dx);
      const int64_t ys = row_stride(yr), xs = row_stride(xr);
      norm::for_chunks(nchunks, chunk, n, [&](int64_t c0, int64_t c1) {
        fn(yp, ys, xp, xs, wp, rp, dxp, pp, rows, n, chunk, c0, c1);
      });
    });
  });
  return {dx, dw};
}

// Calls f(Tag<R>{}, Tag<X>{}) for residual dtype R and x dtype X: the same, or a float32
// residual stream with bf16 / fp16 x (the autocast case).
template <class F>
void dispatch_add_types(at::ScalarType rt, at::ScalarType xt, const char* op, F&& f) {
  dispatch_kernel_types(rt, op, [&](auto rtag) {
    using R = typename decltype(rtag)::type;
    if (xt == rt) {
      f(rtag, rtag);
    } else if (rt == at::kFloat && xt == at::kBFloat16) {
      f(rtag, Tag<bf16>{});
    } else if (rt == at::kFloat && xt == at::kHalf) {
      f(rtag, Tag<f16>{});
    } else {
      TORCH_CHECK(false, op, ": x must have residual's dtype (", rt,
                  "), or bfloat16 / float16 with a float32 residual; got ", xt);
    }
    (void)sizeof(R);
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> add_rms_norm_fwd(const at::Tensor& x, const at::Tensor& residual,
                                                                const c10::optional<at::Tensor>& weight,
                                                                double eps) {
  TORCH_CHECK(x.sizes() == residual.sizes(), "add_rms_norm_fwd: x and residual must have the same shape, got ",
              x.sizes(), " and ", residual.sizes());
  check_weight("add_rms_norm_fwd", residual, weight);
  auto out = new_output(x.sizes(), x.scalar_type());
  auto h = new_output(x.sizes(), residual.scalar_type());
  auto rstd = at::empty(x.sizes().slice(0, x.dim() - 1), x.options().dtype(at::kFloat));
  const int64_t n = x.size(-1);
  if (x.numel() == 0) {
    rstd.fill_(std::numeric_limits<float>::quiet_NaN());
    return {out, h, rstd};
  }
  auto xr = as_rows(x), rr = as_rows(residual);
  const int64_t rows = xr.size(0);
  const auto w = weight.has_value() ? c10::optional<at::Tensor>(weight->contiguous()) : c10::nullopt;
  const Isa isa = active_isa();
  dispatch_add_types(residual.scalar_type(), x.scalar_type(), "add_rms_norm_fwd", [&](auto rtag, auto xtag) {
    using R = typename decltype(rtag)::type;
    using X = typename decltype(xtag)::type;
    dispatch_weight<R>(w, [&](auto wtag, auto has_w) {
      using Wt = typename decltype(wtag)::type;
      constexpr bool HasW = decltype(has_w)::value;
      const auto fn = TRUTHGPT_ISA_FN(isa, add_rms_norm_fwd_rows<R, X, Wt, HasW>);
      const X* xp = cptr<X>(xr);
      const R* rp = cptr<R>(rr);
      const Wt* wp = HasW ? cptr<Wt>(*w) : nullptr;
      X* yp = mptr<X>(out);
      R* hp = mptr<R>(h);
      float* sp = rstd.mutable_data_ptr<float>();
      const int64_t xs = row_stride(xr), rs = row_stride(rr);
      norm::for_rows(rows, n, [&](int64_t r0, int64_t r1) { fn(xp, xs, rp, rs, wp, yp, hp, sp, n, eps, r0, r1); });
    });
  });
  return {out, h, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> add_rms_norm_bwd(const at::Tensor& grad,
                                                                const c10::optional<at::Tensor>& grad_residual,
                                                                const at::Tensor& h,
                                                                const c10::optional<at::Tensor>& weight,
                                                                const at::Tensor& rstd, at::ScalarType x_dtype) {
  check_weight("add_rms_norm_bwd", h, weight);
  TORCH_CHECK(grad.sizes() == h.sizes() && grad.scalar_type() == x_dtype,
              "add_rms_norm_bwd: grad must have h's shape and dtype x_dtype");
  TORCH_CHECK(!grad_residual.has_value() ||
                  (grad_residual->sizes() == h.sizes() && grad_residual->scalar_type() == h.scalar_type()),
              "add_rms_norm_bwd: grad_residual must have h's shape and dtype");
  TORCH_CHECK(rstd.scalar_type() == at::kFloat && rstd.numel() * h.size(-1) == h.numel(),
              "add_rms_norm_bwd: rstd must be float32 with one value per row of h");
  const int64_t n = h.size(-1);
  const bool split = x_dtype != h.scalar_type();
  auto dh = new_output(h.sizes(), h.scalar_type());
  auto dx = split ? new_output(h.sizes(), x_dtype) : h.new_empty({0});
  auto dw = weight.has_value() ? at::empty({n}, weight->options()) : h.new_empty({0});
  if (h.numel() == 0) {
    dw.zero_();
    return {dh, dx, dw};
  }
  auto yr = as_rows(grad), hr = as_rows(h);
  const at::Tensor gr = grad_residual.has_value() ? as_rows(*grad_residual) : at::Tensor();
  const auto rs = rstd.reshape({-1}).contiguous();
  const auto w = weight.has_value() ? c10::optional<at::Tensor>(weight->contiguous()) : c10::nullopt;
  const int64_t rows = hr.size(0);
  const auto [chunk, nchunks] = norm::chunks_of(rows);
  const Isa isa = active_isa();
  dispatch_add_types(h.scalar_type(), x_dtype, "add_rms_norm_bwd", [&](auto rtag, auto xtag) {
    using R = typename decltype(rtag)::type;
    using X = typename decltype(xtag)::type;
    bwd_with_dweight<R>(w, nchunks, n, h.options(), isa, dw, [&](auto wtag, auto has_w, acc_t<R>* pp) {
      using Wt = typename decltype(wtag)::type;
      constexpr bool HasW = decltype(has_w)::value;
      const auto fn = TRUTHGPT_ISA_FN(isa, add_rms_norm_bwd_chunks<R, X, Wt, HasW>);
      const X* yp = cptr<X>(yr);
      const R* hp = cptr<R>(hr);
      const R* gp = gr.defined() ? cptr<R>(gr) : nullptr;
      const Wt* wp = HasW ? cptr<Wt>(*w) : nullptr;
      const float* sp = rs.const_data_ptr<float>();
      R* dhp = mptr<R>(dh);
      X* dxp = split ? mptr<X>(dx) : nullptr;
      const int64_t ys = row_stride(yr), hs = row_stride(hr), gs = gr.defined() ? row_stride(gr) : 0;
      norm::for_chunks(nchunks, chunk, n, [&](int64_t c0, int64_t c1) {
        fn(yp, ys, gp, gs, hp, hs, wp, sp, dhp, dxp, pp, rows, n, chunk, c0, c1);
      });
    });
  });
  return {dh, dx, dw};
}

}  // namespace

TORCH_LIBRARY_IMPL(truthgpt, CPU, m) {
  m.impl("rms_norm_fwd", &rms_norm_fwd);
  m.impl("rms_norm_bwd", &rms_norm_bwd);
  m.impl("add_rms_norm_fwd", &add_rms_norm_fwd);
  m.impl("add_rms_norm_bwd", &add_rms_norm_bwd);
}

}  // namespace truthgpt

#else  // ========================================== kernel section (once per instruction set)

#include "cpu/norm_kernels.h"

// Rows [r0, r1) of x (unit inner stride, row stride xs) into y (contiguous) and rstd.
// The second pass over a row reads it from cache; meanwhile the next row is prefetched so
// memory stays busy.
template <class T, class Wt, bool HasW>
void rms_norm_fwd_rows(const T* x, int64_t xs, const Wt* w, T* y, float* rstd, int64_t n,
                       double eps, int64_t r0, int64_t r1) {
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
      const V a = V::load(xr + i, W), b = V::load(xr + i + W, W);
      s0 = V::fma(a, a, s0);
      s1 = V::fma(b, b, s1);
    }
    for (; i < n; i += W) {
      const V a = V::load(xr + i, n - i);
      s0 = V::fma(a, a, s0);
    }
    const A rs = A(1) / std::sqrt((s0 + s1).hsum() / A(n) + A(eps));
    rstd[r] = static_cast<float>(rs);
    const V rv = V::set1(rs);
    for (i = 0; i < n; i += W) {
      const int64_t m = n - i;
      prefetch(next + i);
      V v = V::load(xr + i, m) * rv;
      if constexpr (HasW) v = v * V::load(w + i, m);
      v.store(yr + i, m);
    }
  }
}

// G rows of the backward together (so the partial dweight row and the weight are loaded
// and stored once per G rows): dx of each row, and part += dy * x * r row after row.
template <class T, class Wt, bool HasW, int G>
inline void rms_norm_bwd_group(const T* const* dy, const T* const* x, T* const* dx,
                               const acc_t<T>* rs, const Wt* w, acc_t<T>* part,
                               const T* next_dy, const T* next_x, int64_t n) {
  using V = VecFor<T>;
  using A = acc_t<T>;
  constexpr int W = V::W;
  V d[G];
  for (int g = 0; g < G; ++g) d[g] = V::zero();
  for (int64_t i = 0; i < n; i += W) {  // dots: sum of dy w x per row
    const int64_t m = n - i;
    V wv = V::zero();
    if constexpr (HasW) wv = V::load(w + i, m);
    for (int g = 0; g < G; ++g) {
      V gy = V::load(dy[g] + i, m);
      if constexpr (HasW) gy = gy * wv;
      d[g] = V::fma(gy, V::load(x[g] + i, m), d[g]);
    }
  }
  V rv[G], cv[G];
  for (int g = 0; g < G; ++g) {
    rv[g] = V::set1(rs[g]);
    cv[g] = V::set1(rs[g] * rs[g] * rs[g] * d[g].hsum() / A(n));
  }
  for (int64_t i = 0; i < n; i += W) {  // dx = r dy w - x r^3 mean(dy w x); part
    const int64_t m = n - i;
    prefetch(next_dy + i);
    prefetch(next_x + i);
    V wv = V::zero(), p = V::zero();
    if constexpr (HasW) {
      wv = V::load(w + i, m);
      p = V::load(part + i, m);
    }
    for (int g = 0; g < G; ++g) {
      const V dyv = V::load(dy[g] + i, m), xv = V::load(x[g] + i, m);
      V gy = dyv;
      if constexpr (HasW) gy = dyv * wv;
      (gy * rv[g] - xv * cv[g]).store(dx[g] + i, m);
      if constexpr (HasW) p = V::fma(dyv * xv, rv[g], p);
    }
    if constexpr (HasW) p.store(part + i, m);
  }
}

// Chunks [c0, c1) of `chunk` rows each: dx of their rows, and (HasW) each chunk's partial
// dweight row part[c] = sum over its rows, in row order, of dy * x * r.
template <class T, class Wt, bool HasW>
void rms_norm_bwd_chunks(const T* dy, int64_t ys, const T* x, int64_t xs, const Wt* w,
                         const float* rstd, T* dx, acc_t<T>* part, int64_t rows, int64_t n,
                         int64_t chunk, int64_t c0, int64_t c1) {
  using V = VecFor<T>;
  using A = acc_t<T>;
  constexpr int W = V::W;
  constexpr int G = 4;
  for (int64_t c = c0; c < c1; ++c) {
    A* pc = HasW ? part + c * n : nullptr;
    if constexpr (HasW) {
      for (int64_t i = 0; i < n; i += W) V::zero().store(pc + i, n - i);
    }
    const int64_t rend = std::min(rows, (c + 1) * chunk);
    const int64_t last = std::min(rows, c1 * chunk) - 1;  // last row of this task
    for (int64_t r = c * chunk; r < rend;) {
      const int g = rend - r >= G ? G : 1;
      const T* dyp[G];
      const T* xp[G];
      T* dxp[G];
      A rs[G];
      for (int k = 0; k < g; ++k) {
        dyp[k] = dy + (r + k) * ys;
        xp[k] = x + (r + k) * xs;
        dxp[k] = dx + (r + k) * n;
        rs[k] = static_cast<A>(rstd[r + k]);
      }
      const int64_t nr = std::min(r + g, last);  // a row to prefetch (the next group's first)
      if (g == G) {
        rms_norm_bwd_group<T, Wt, HasW, G>(dyp, xp, dxp, rs, w, pc, dy + nr * ys, x + nr * xs, n);
      } else {
        rms_norm_bwd_group<T, Wt, HasW, 1>(dyp, xp, dxp, rs, w, pc, dy + nr * ys, x + nr * xs, n);
      }
      r += g;
    }
  }
}

// add_rms_norm, rows [r0, r1): h = residual + x (stored in R; the statistics are taken of the
// stored h, so a low-precision residual stream normalises what it holds), out = h r w in X.
template <class R, class X, class Wt, bool HasW>
void add_rms_norm_fwd_rows(const X* x, int64_t xs, const R* res, int64_t rs_, const Wt* w, X* y, R* h,
                           float* rstd, int64_t n, double eps, int64_t r0, int64_t r1) {
  using V = VecFor<R>;
  using A = acc_t<R>;
  constexpr int W = V::W;
  for (int64_t r = r0; r < r1; ++r) {
    const X* xr = x + r * xs;
    const R* rr = res + r * rs_;
    R* hr = h + r * n;
    X* yr = y + r * n;
    for (int64_t i = 0; i < n; i += W) {
      const int64_t m = n - i;
      (V::load(rr + i, m) + V::load(xr + i, m)).store(hr + i, m);
    }
    V s = V::zero();
    for (int64_t i = 0; i < n; i += W) {
      const V a = V::load(hr + i, n - i);
      s = V::fma(a, a, s);
    }
    const A rsv = A(1) / std::sqrt(s.hsum() / A(n) + A(eps));
    rstd[r] = static_cast<float>(rsv);
    const V rv = V::set1(rsv);
    for (int64_t i = 0; i < n; i += W) {
      const int64_t m = n - i;
      V v = V::load(hr + i, m) * rv;
      if constexpr (HasW) v = v * V::load(w + i, m);
      v.store(yr + i, m);
    }
  }
}

// add_rms_norm backward, chunks [c0, c1): per row dh = r (dy w) - h r^3 mean(dy w h) [+ the
// residual's own gradient], stored in R (and rounded to X in dx when X is not R); part[c] =
// sum over the chunk's rows, in order, of dy h r.
template <class R, class X, class Wt, bool HasW>
void add_rms_norm_bwd_chunks(const X* dy, int64_t ys, const R* gres, int64_t gs, const R* h, int64_t hs,
                             const Wt* w, const float* rstd, R* dh, X* dx, acc_t<R>* part, int64_t rows,
                             int64_t n, int64_t chunk, int64_t c0, int64_t c1) {
  using V = VecFor<R>;
  using A = acc_t<R>;
  constexpr int W = V::W;
  for (int64_t c = c0; c < c1; ++c) {
    A* pc = HasW ? part + c * n : nullptr;
    if constexpr (HasW) {
      for (int64_t i = 0; i < n; i += W) V::zero().store(pc + i, n - i);
    }
    const int64_t rend = std::min(rows, (c + 1) * chunk);
    for (int64_t r = c * chunk; r < rend; ++r) {
      const X* dyr = dy + r * ys;
      const R* hr = h + r * hs;
      V d = V::zero();
      for (int64_t i = 0; i < n; i += W) {
        const int64_t m = n - i;
        V g = V::load(dyr + i, m);
        if constexpr (HasW) g = g * V::load(w + i, m);
        d = V::fma(g, V::load(hr + i, m), d);
      }
      const A rsv = static_cast<A>(rstd[r]);
      const V rv = V::set1(rsv), cv = V::set1(rsv * rsv * rsv * d.hsum() / A(n));
      R* dhr = dh + r * n;
      X* dxr = dx ? dx + r * n : nullptr;
      const R* gr = gres ? gres + r * gs : nullptr;
      for (int64_t i = 0; i < n; i += W) {
        const int64_t m = n - i;
        const V dyv = V::load(dyr + i, m), hv = V::load(hr + i, m);
        V g = dyv;
        if constexpr (HasW) g = dyv * V::load(w + i, m);
        V o = g * rv - hv * cv;
        if (gr) o = o + V::load(gr + i, m);
        o.store(dhr + i, m);
        if (dxr) o.store(dxr + i, m);
        if constexpr (HasW) V::fma(dyv * hv, rv, V::load(pc + i, m)).store(pc + i, m);
      }
    }
  }
}

#endif  // TRUTHGPT_KERNEL_SECTION
