// Host builds of the CUDA attention kernels' shared logic (csrc/cuda/attention_math.cuh),
// as test-only ops in namespace truthgpt_test (tests/ops/test_cuda_attention_host.py):
// - attention_host_fwd / attention_host_bwd: scalar host "kernels" that walk the same grid,
//   tile lists, skip decisions, masks, score transforms, online-softmax steps and backward
//   formulas as csrc/cuda/attention_kernel.cuh, calling the same TG_HD functions in the same
//   order (float32 math), for small float32 inputs;
// - attention_tile_map: the forward's and the backward's visible-tile decisions;
// - attention_fragment_maps, attention_block_coords, attention_kv_heads,
//   attention_gather_tiles, attention_tile_configs: the kernels' register layouts and index
//   arithmetic.
// What this cannot check: the hardware itself (mma.sync, shuffles, shared memory, barriers).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <vector>

#include "common/attention_extras.h"
#include "cuda/attention_math.cuh"

namespace truthgpt::testing {
namespace {

using namespace truthgpt::attn;

at::Tensor unit_inner(const at::Tensor& t) {
  return (t.size(-1) <= 1 || t.stride(-1) == 1) ? t : t.contiguous();
}

// A (B, H, S, D) float32 operand read as the kernels read it: base + offset_bhs(...) + d.
struct Bhsd {
  const float* ptr;
  int64_t sb, sh, ss;
  const float* row(int64_t b, int64_t h, int64_t s) const { return ptr + offset_bhs(b, h, s, sb, sh, ss); }
};
Bhsd bhsd(const at::Tensor& t) { return Bhsd{t.data_ptr<float>(), t.stride(0), t.stride(1), t.stride(2)}; }

void check_f32(const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.dim() == 4, "attention_host: ", name,
              " must be a float32 CPU tensor with 4 dims");
}

// Same fields and checks as csrc/cuda/attention_binding.cpp make_params.
Problem make_problem(const at::Tensor& q, const at::Tensor& k, double scale, int64_t wl, int64_t wr,
                     const std::optional<at::Tensor>& alibi, const std::optional<at::Tensor>& block_mask,
                     int64_t block_size, const std::optional<at::Tensor>& key_mask, double softcap,
                     const std::optional<at::Tensor>& rel_bias = std::nullopt, double dropout_p = 0.0,
                     const std::optional<at::Tensor>& dropout_seed = std::nullopt) {
  Problem p{};
  p.B = q.size(0), p.Hq = q.size(1), p.Sq = q.size(2), p.D = q.size(3);
  p.Hkv = k.size(1), p.Sk = k.size(2);
  TORCH_CHECK(p.Hkv >= 1 && p.Hq % p.Hkv == 0, "attention_host: Hq must be a multiple of Hkv");
  p.scale = static_cast<float>(scale);
  p.softcap = static_cast<float>(softcap);
  p.window_left = wl, p.window_right = wr;
  p.block_size = 1;
  if (alibi) {
    TORCH_CHECK(alibi->scalar_type() == at::kFloat && alibi->dim() == 2, "attention_host: alibi (B, Hq) float32");
    p.alibi = alibi->data_ptr<float>();
    p.alibi_sb = alibi->stride(0), p.alibi_sh = alibi->stride(1);
  }
  if (block_mask) {
    TORCH_CHECK(block_mask->scalar_type() == at::kBool && block_mask->dim() == 4 && block_size >= 1,
                "attention_host: block_mask (B, Hq, nq, nk) bool");
    p.block_mask = reinterpret_cast<const uint8_t*>(block_mask->data_ptr<bool>());
    p.bm_sb = block_mask->stride(0), p.bm_sh = block_mask->stride(1);
    p.bm_sq = block_mask->stride(2), p.bm_sk = block_mask->stride(3);
    p.block_size = block_size;
  }
  if (key_mask) {
    TORCH_CHECK(key_mask->scalar_type() == at::kBool && key_mask->dim() == 2, "attention_host: key_mask (B, Sk) bool");
    p.key_mask = reinterpret_cast<const uint8_t*>(key_mask->data_ptr<bool>());
    p.km_sb = key_mask->stride(0), p.km_ss = key_mask->stride(1);
  }
  set_rel_and_dropout(p, q.device(), rel_bias, dropout_p, dropout_seed);
  return p;
}

float dot(const float* a, const float* b, int64_t n) {
  float acc = 0.f;
  for (int64_t d = 0; d < n; ++d) acc = std::fma(a[d], b[d], acc);
  return acc;
}

// ------------------------------------------------------------------------------- forward
// Mirrors attention_fwd_kernel: a "block" per (b, h, query tile of br rows), key tiles of bc.
std::tuple<at::Tensor, at::Tensor> host_fwd(const at::Tensor& q_, const at::Tensor& k_, const at::Tensor& v_,
                                            double scale, int64_t wl, int64_t wr,
                                            const std::optional<at::Tensor>& alibi,
                                            const std::optional<at::Tensor>& block_mask, int64_t block_size,
                                            const std::optional<at::Tensor>& key_mask, double softcap,
                                            const std::optional<at::Tensor>& rel_bias, double dropout_p,
                                            const std::optional<at::Tensor>& dropout_seed, int64_t br, int64_t bc) {
  check_f32("q", q_);
  check_f32("k", k_);
  check_f32("v", v_);
  TORCH_CHECK(br >= 1 && bc >= 1, "attention_host: tile sizes must be >= 1");
  const at::Tensor q = unit_inner(q_), k = unit_inner(k_), v = unit_inner(v_);
  const Problem p = make_problem(q, k, scale, wl, wr, alibi, block_mask, block_size, key_mask, softcap, rel_bias,
                                 dropout_p, dropout_seed);
  const Bhsd Q = bhsd(q), K = bhsd(k), V = bhsd(v);
  const int64_t D = p.D, off = query_offset(p), n_qt = ceil_div(p.Sq, br);
  auto out = at::zeros({p.B, p.Hq, p.Sq, D}, q.options());
  auto lse = at::empty({p.B, p.Hq, p.Sq}, q.options());
  float* O = out.data_ptr<float>();
  float* L = lse.data_ptr<float>();

  std::vector<float> m(br), l(br), o(br * D), s(bc);
  std::vector<uint8_t> colok(bc);
  for (int64_t blk = 0; blk < p.B * p.Hq * n_qt; ++blk) {
    const BlockCoords c = block_coords(blk, p.Hq, n_qt, 1);
    const int64_t b = c.b, h = c.h, hk = kv_head(h, p.Hq, p.Hkv);
    const int64_t q0 = c.tile * br, q1 = imin(q0 + br, p.Sq);
    const float slope = alibi_slope(p, b, h);
    const uint8_t* bm = block_mask_bh(p, b, h);
    std::fill(m.begin(), m.end(), kNegInf);
    std::fill(l.begin(), l.end(), 0.f);
    std::fill(o.begin(), o.end(), 0.f);
    const TileRange kr = key_tile_range(p, q0, q1, bc);
    for (int64_t kt = kr.begin; kt < kr.end; ++kt) {
      const int64_t k0 = kt * bc, k1 = imin(k0 + bc, p.Sk);
      const TileInfo info = tile_info(p, bm, q0, q1, k0, k1);
      if (info.skip) continue;
      bool any = false;
      for (int64_t jl = 0; jl < bc; ++jl) {
        colok[jl] = key_visible(p, b, k0 + jl);
        any = any || colok[jl];
      }
      if (!any) continue;
      const bool masked = !info.full || p.key_mask != nullptr || k1 - k0 < bc || q1 - q0 < br;
      for (int64_t i = q0; i < q1; ++i) {
        const int64_t r = i - q0;
        float mt = kNegInf;
        for (int64_t jl = 0; jl < bc; ++jl) {
          const int64_t j = k0 + jl;
          const float raw = j < k1 ? dot(Q.row(b, h, i), K.row(b, hk, j), D) : 0.f;  // zero-filled tile
          float tc;
          const float val = score(p, raw, slope, i + off, j, &tc) + rel_bias_at(p, h, i, j);
          const bool vis = !masked || elem_visible(p, i, j, colok[jl] != 0, bm);
          s[jl] = vis ? val : kNegInf;
          mt = max_nan(mt, s[jl]);
        }
        const float m_new = max_nan(m[r], mt);
        const float alpha = online_rescale(m[r], m_new);
        m[r] = m_new;
        l[r] *= alpha;
        for (int64_t d = 0; d < D; ++d) o[r * D + d] *= alpha;
        for (int64_t jl = 0; jl < bc; ++jl) {
          float pj = online_prob(s[jl], m[r]);
          l[r] += pj;
          if (p.dropout) pj *= dropout_factor(p, b, h, i, k0 + jl);
          if (k0 + jl < k1) {
            const float* vr = V.row(b, hk, k0 + jl);
            for (int64_t d = 0; d < D; ++d) o[r * D + d] = std::fma(pj, vr[d], o[r * D + d]);
          }
        }
      }
    }
    for (int64_t i = q0; i < q1; ++i) {
      const int64_t r = i - q0, row = (b * p.Hq + h) * p.Sq + i;
      const float inv = softmax_inv_sum(l[r]);
      for (int64_t d = 0; d < D; ++d) O[row * D + d] = softmax_out(o[r * D + d], l[r], inv);
      L[row] = softmax_lse(m[r], l[r]);
    }
  }
  return {out, lse};
}

// ------------------------------------------------------------------------------- backward
// Mirrors attention_delta_kernel, attention_dkdv_kernel (a "block" per (b, kv head, key tile
// of bc keys), looping over the group's query heads and their query tiles of br) and
// attention_dq_kernel (a block per (b, h, query tile of br), key tiles of bc). The head-dim
// slices of the GPU kernels only split columns and are not emulated.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> host_bwd(
    const at::Tensor& do_, const at::Tensor& q_, const at::Tensor& k_, const at::Tensor& v_, const at::Tensor& o_,
    const at::Tensor& lse_, double scale, int64_t wl, int64_t wr, const std::optional<at::Tensor>& alibi,
    const std::optional<at::Tensor>& block_mask, int64_t block_size, const std::optional<at::Tensor>& key_mask,
    double softcap, const std::optional<at::Tensor>& rel_bias, double dropout_p,
    const std::optional<at::Tensor>& dropout_seed, int64_t br, int64_t bc) {
  check_f32("grad_out", do_);
  check_f32("q", q_);
  check_f32("k", k_);
  check_f32("v", v_);
  check_f32("out", o_);
  TORCH_CHECK(lse_.scalar_type() == at::kFloat && lse_.dim() == 3, "attention_host: lse (B, Hq, Sq) float32");
  TORCH_CHECK(br >= 1 && bc >= 1, "attention_host: tile sizes must be >= 1");
  const at::Tensor q = unit_inner(q_), k = unit_inner(k_), v = unit_inner(v_), dout = unit_inner(do_),
                   out = unit_inner(o_);
  const Problem p = make_problem(q, k, scale, wl, wr, alibi, block_mask, block_size, key_mask, softcap, rel_bias,
                                 dropout_p, dropout_seed);
  const Bhsd Q = bhsd(q), K = bhsd(k), V = bhsd(v), dO = bhsd(dout), O = bhsd(out);
  const float* lse = lse_.data_ptr<float>();
  const int64_t lsb = lse_.stride(0), lsh = lse_.stride(1), lss = lse_.stride(2);
  const int64_t D = p.D, off = query_offset(p), group = p.Hq / p.Hkv;

  // delta as attention_delta_kernel computes it: by the product of dP (the fp32 gemm_nt: one
  // fma chain over d), in the dQ kernel's orientation (dO . O) and the dK/dV kernel's (O . dO)
  const int64_t nrows = p.B * p.Hq * p.Sq;
  auto delta_t = at::empty({2, nrows}, q.options());
  float* delta_q = delta_t.data_ptr<float>();
  float* delta_k = delta_q + nrows;
  for (int64_t row = 0; row < nrows; ++row) {
    const int64_t i = row % p.Sq, bh = row / p.Sq, h = bh % p.Hq, b = bh / p.Hq;
    delta_q[row] = dot(dO.row(b, h, i), O.row(b, h, i), D);
    delta_k[row] = dot(O.row(b, h, i), dO.row(b, h, i), D);
  }

  auto dq_t = at::zeros({p.B, p.Hq, p.Sq, D}, q.options());
  auto dk_t = at::zeros({p.B, p.Hkv, p.Sk, D}, q.options());
  auto dv_t = at::zeros({p.B, p.Hkv, p.Sk, D}, q.options());
  float *dQ = dq_t.data_ptr<float>(), *dK = dk_t.data_ptr<float>(), *dV = dv_t.data_ptr<float>();

  // dK / dV
  const int64_t n_kt = ceil_div(p.Sk, bc);
  std::vector<float> dk(bc * D), dv(bc * D);
  std::vector<uint8_t> kok(bc);
  for (int64_t blk = 0; blk < p.B * p.Hkv * n_kt; ++blk) {
    const BlockCoords c = block_coords(blk, p.Hkv, n_kt, 1);
    const int64_t b = c.b, hk = c.h, k0 = c.tile * bc, k1 = imin(k0 + bc, p.Sk);
    std::fill(dk.begin(), dk.end(), 0.f);
    std::fill(dv.begin(), dv.end(), 0.f);
    bool any = false;
    for (int64_t jl = 0; jl < bc; ++jl) {
      kok[jl] = key_visible(p, b, k0 + jl);
      any = any || kok[jl];
    }
    if (any) {
      for (int64_t gi = 0; gi < group; ++gi) {
        const int64_t h = hk * group + gi;
        const float slope = alibi_slope(p, b, h);
        const uint8_t* bm = block_mask_bh(p, b, h);
        const TileRange qr = query_tile_range(p, k0, k1, br);
        for (int64_t qt = qr.begin; qt < qr.end; ++qt) {
          const int64_t q0 = qt * br, q1 = imin(q0 + br, p.Sq);
          const TileInfo info = tile_info(p, bm, q0, q1, k0, k1);
          if (info.skip) continue;
          const bool masked = !info.full || p.key_mask != nullptr || k1 - k0 < bc || q1 - q0 < br;
          for (int64_t j = k0; j < k1; ++j) {
            const int64_t jl = j - k0;
            for (int64_t il = 0; il < br; ++il) {
              const int64_t i = q0 + il;
              const bool in = i < q1;
              const float lse_i = in ? lse[b * lsb + h * lsh + i * lss] : kNegInf;
              const float dl_i = in ? delta_k[(b * p.Hq + h) * p.Sq + i] : 0.f;
              const float raw = in ? dot(K.row(b, hk, j), Q.row(b, h, i), D) : 0.f;
              const float dp = in ? dot(V.row(b, hk, j), dO.row(b, h, i), D) : 0.f;
              float tc;
              const float sc = score(p, raw, slope, i + off, j, &tc) + rel_bias_at(p, h, i, j);
              const bool vis = !masked || elem_visible(p, i, j, kok[jl] != 0, bm);
              const float pv = backward_prob(sc, lse_i, vis);
              const float z = dropout_factor(p, b, h, i, j);
              const float ds = backward_dscore(p, pv, dp * z, dl_i, tc);
              if (!in) continue;  // zero-filled rows of the GPU tile: pv = ds = 0
              for (int64_t d = 0; d < D; ++d) {
                dv[jl * D + d] = std::fma(pv * z, dO.row(b, h, i)[d], dv[jl * D + d]);
                dk[jl * D + d] = std::fma(ds, Q.row(b, h, i)[d], dk[jl * D + d]);
              }
            }
          }
        }
      }
    }
    for (int64_t j = k0; j < k1; ++j) {
      const int64_t row = (b * p.Hkv + hk) * p.Sk + j;
      for (int64_t d = 0; d < D; ++d) {
        dK[row * D + d] = p.scale * dk[(j - k0) * D + d];
        dV[row * D + d] = dv[(j - k0) * D + d];
      }
    }
  }

  // dQ
  const int64_t n_qt = ceil_div(p.Sq, br);
  std::vector<float> dq(br * D);
  std::vector<uint8_t> colok(bc);
  for (int64_t blk = 0; blk < p.B * p.Hq * n_qt; ++blk) {
    const BlockCoords c = block_coords(blk, p.Hq, n_qt, 1);
    const int64_t b = c.b, h = c.h, hk = kv_head(h, p.Hq, p.Hkv);
    const int64_t q0 = c.tile * br, q1 = imin(q0 + br, p.Sq);
    const float slope = alibi_slope(p, b, h);
    const uint8_t* bm = block_mask_bh(p, b, h);
    std::fill(dq.begin(), dq.end(), 0.f);
    const TileRange kr = key_tile_range(p, q0, q1, bc);
    for (int64_t kt = kr.begin; kt < kr.end; ++kt) {
      const int64_t k0 = kt * bc, k1 = imin(k0 + bc, p.Sk);
      const TileInfo info = tile_info(p, bm, q0, q1, k0, k1);
      if (info.skip) continue;
      bool any = false;
      for (int64_t jl = 0; jl < bc; ++jl) {
        colok[jl] = key_visible(p, b, k0 + jl);
        any = any || colok[jl];
      }
      if (!any) continue;
      const bool masked = !info.full || p.key_mask != nullptr || k1 - k0 < bc || q1 - q0 < br;
      for (int64_t i = q0; i < q1; ++i) {
        const float lse_i = lse[b * lsb + h * lsh + i * lss];
        const float dl_i = delta_q[(b * p.Hq + h) * p.Sq + i];
        for (int64_t jl = 0; jl < bc; ++jl) {
          const int64_t j = k0 + jl;
          const bool in = j < k1;
          const float dp = in ? dot(dO.row(b, h, i), V.row(b, hk, j), D) : 0.f;
          const float raw = in ? dot(Q.row(b, h, i), K.row(b, hk, j), D) : 0.f;
          float tc;
          const float sc = score(p, raw, slope, i + off, j, &tc) + rel_bias_at(p, h, i, j);
          const bool vis = !masked || elem_visible(p, i, j, colok[jl] != 0, bm);
          const float pv = backward_prob(sc, lse_i, vis);
          const float ds = backward_dscore(p, pv, dp * dropout_factor(p, b, h, i, j), dl_i, tc);
          if (!in) continue;  // zero-filled key rows
          for (int64_t d = 0; d < D; ++d)
            dq[(i - q0) * D + d] = std::fma(ds, K.row(b, hk, j)[d], dq[(i - q0) * D + d]);
        }
      }
    }
    for (int64_t i = q0; i < q1; ++i) {
      const int64_t row = (b * p.Hq + h) * p.Sq + i;
      for (int64_t d = 0; d < D; ++d) dQ[row * D + d] = p.scale * dq[(i - q0) * D + d];
    }
  }

  // d rel_bias: attention_drel_kernel, one "thread" per (h, t)
  const int64_t L = p.Sq + p.Sk - 1;
  auto drel_t = at::zeros({p.rel != nullptr ? p.Hq : 0, L}, q.options());
  float* dR = drel_t.data_ptr<float>();
  for (int64_t idx = 0; idx < drel_t.numel(); ++idx) {
    const int64_t h = idx / L, t = idx % L, hk = kv_head(h, p.Hq, p.Hkv);
    const int64_t i_lo = imax(0, p.Sq - 1 - t), i_hi = imin(p.Sq, p.Sq - 1 - t + p.Sk);
    float acc = 0.f;
    for (int64_t b = 0; b < p.B; ++b) {
      const float slope = alibi_slope(p, b, h);
      const uint8_t* bm = block_mask_bh(p, b, h);
      for (int64_t i = i_lo; i < i_hi; ++i) {
        const int64_t j = i + t - (p.Sq - 1);
        if (!elem_visible(p, i, j, key_visible(p, b, j), bm)) continue;
        float raw = 0.f, dp = 0.f;
        for (int64_t d = 0; d < D; ++d) {
          raw = std::fma(Q.row(b, h, i)[d], K.row(b, hk, j)[d], raw);
          dp = std::fma(dO.row(b, h, i)[d], V.row(b, hk, j)[d], dp);
        }
        float tc;
        const float sc = score(p, raw, slope, i + off, j, &tc) + rel_bias_at(p, h, i, j);
        const float pv = backward_prob(sc, lse[b * lsb + h * lsh + i * lss], true);
        acc += pv * (dp * dropout_factor(p, b, h, i, j) - delta_q[(b * p.Hq + h) * p.Sq + i]);
      }
    }
    dR[idx] = acc;
  }
  return {dq_t, dk_t, dv_t, drel_t};
}

// ------------------------------------------------------------------------------- tile lists
// int8 (B, H, n_qt, n_kt) for (B, H) = block_mask's first two sizes (1, 1 without one):
// 0 = outside the window's tile range, 1 = in range but skipped, 2 = visited with
// per-element masking, 3 = visited, every element visible (window and block mask).
// by_key = false walks the forward / dQ lists (key tiles per query tile); true the dK/dV
// lists (query tiles per key tile).
at::Tensor tile_map(const std::optional<at::Tensor>& block_mask, int64_t Sq, int64_t Sk, int64_t wl, int64_t wr,
                    int64_t block_size, int64_t br, int64_t bc, bool by_key) {
  TORCH_CHECK(br >= 1 && bc >= 1 && Sq >= 1 && Sk >= 1, "attention_tile_map: sizes must be >= 1");
  const at::Tensor q = at::empty({block_mask ? block_mask->size(0) : 1, block_mask ? block_mask->size(1) : 1, Sq, 1});
  const at::Tensor k = at::empty({q.size(0), q.size(1), Sk, 1});
  const Problem p = make_problem(q, k, 1.0, wl, wr, std::nullopt, block_mask, block_size, std::nullopt, 0.0);
  const int64_t n_qt = ceil_div(Sq, br), n_kt = ceil_div(Sk, bc);
  auto map = at::zeros({p.B, p.Hq, n_qt, n_kt}, at::kChar);
  auto acc = map.accessor<int8_t, 4>();
  auto mark = [&](int64_t b, int64_t h, const uint8_t* bm, int64_t qt, int64_t kt) {
    const int64_t q0 = qt * br, q1 = imin(q0 + br, Sq), k0 = kt * bc, k1 = imin(k0 + bc, Sk);
    const TileInfo info = tile_info(p, bm, q0, q1, k0, k1);
    acc[b][h][qt][kt] = info.skip ? 1 : info.full ? 3 : 2;
  };
  for (int64_t b = 0; b < p.B; ++b)
    for (int64_t h = 0; h < p.Hq; ++h) {
      const uint8_t* bm = block_mask_bh(p, b, h);
      if (!by_key) {
        for (int64_t qt = 0; qt < n_qt; ++qt) {
          const TileRange r = key_tile_range(p, qt * br, imin(qt * br + br, Sq), bc);
          for (int64_t kt = r.begin; kt < r.end; ++kt) mark(b, h, bm, qt, kt);
        }
      } else {
        for (int64_t kt = 0; kt < n_kt; ++kt) {
          const TileRange r = query_tile_range(p, kt * bc, imin(kt * bc + bc, Sk), br);
          for (int64_t qt = r.begin; qt < r.end; ++qt) mark(b, h, bm, qt, kt);
        }
      }
    }
  return map;
}

// ------------------------------------------------------------------------------- layouts
// [acc (32, 2, 4, 2): acc_coord(lane, ntile, e); a (32, 8, 2): a_coord(lane, 0, e);
//  a_src (32, 8, 2): the acc_coord that a_from_acc_* picks for A element e;
//  b (32, 2, 4, 2): b_coord(lane, 0, ntile, e);
//  shfl (32, 16, 2, 2): for output row half r and P column k, the acc_coord of the register
//  the fp32 path shuffles in]  (coordinates are (row, col))
std::vector<at::Tensor> fragment_maps() {
  auto acc = at::empty({32, 2, 4, 2}, at::kLong), a = at::empty({32, 8, 2}, at::kLong);
  auto a_src = at::empty({32, 8, 2}, at::kLong), bt = at::empty({32, 2, 4, 2}, at::kLong);
  auto shfl = at::empty({32, 16, 2, 2}, at::kLong);
  auto A = acc.accessor<int64_t, 4>(), Bt = bt.accessor<int64_t, 4>(), S = shfl.accessor<int64_t, 4>();
  auto Aa = a.accessor<int64_t, 3>(), As = a_src.accessor<int64_t, 3>();
  for (int lane = 0; lane < 32; ++lane) {
    for (int nt = 0; nt < 2; ++nt)
      for (int e = 0; e < 4; ++e) {
        const Coord c = acc_coord(lane, nt, e), d = b_coord(lane, 0, nt, e);
        A[lane][nt][e][0] = c.row, A[lane][nt][e][1] = c.col;
        Bt[lane][nt][e][0] = d.row, Bt[lane][nt][e][1] = d.col;
      }
    for (int e = 0; e < 8; ++e) {
      const Coord c = a_coord(lane, 0, e), s = acc_coord(lane, a_from_acc_ntile(0, e), a_from_acc_elem(e));
      Aa[lane][e][0] = c.row, Aa[lane][e][1] = c.col;
      As[lane][e][0] = s.row, As[lane][e][1] = s.col;
    }
    for (int k = 0; k < 16; ++k)
      for (int r = 0; r < 2; ++r) {
        const int src = (lane & ~3) | shfl_src_tid(k);
        const Coord c = acc_coord(src, k / 8, k % 2 + 2 * r);
        S[lane][k][r][0] = c.row, S[lane][k][r][1] = c.col;
      }
  }
  return {acc, a, a_src, bt, shfl};
}

// (n, 4) int64: block_coords(idx) = (b, h, tile, slice) for idx in [0, n).
at::Tensor block_coords_op(int64_t n, int64_t heads, int64_t n_tiles, int64_t n_slices) {
  auto out = at::empty({n, 4}, at::kLong);
  auto A = out.accessor<int64_t, 2>();
  for (int64_t i = 0; i < n; ++i) {
    const BlockCoords c = block_coords(i, heads, n_tiles, n_slices);
    A[i][0] = c.b, A[i][1] = c.h, A[i][2] = c.tile, A[i][3] = c.slice;
  }
  return out;
}

at::Tensor kv_heads_op(int64_t Hq, int64_t Hkv) {
  auto out = at::empty({Hq}, at::kLong);
  for (int64_t h = 0; h < Hq; ++h) out[h] = kv_head(h, Hq, Hkv);
  return out;
}

// Reads x (B, H, S, D) float32 (any strides, unit inner stride) tile by tile as
// attention_kernel.cuh load_rows does (chunks of `vec` elements from tile_chunk, zero fill past
// S and D) into a (B, H, n_tiles * rows, cols) tensor.
at::Tensor gather_tiles(const at::Tensor& x_, int64_t rows, int64_t cols, int64_t vec) {
  check_f32("x", x_);
  TORCH_CHECK(rows >= 1 && vec >= 1 && cols % vec == 0 && cols >= x_.size(3), "attention_gather_tiles: bad tile");
  const at::Tensor x = unit_inner(x_);
  const Bhsd X = bhsd(x);
  const int64_t B = x.size(0), H = x.size(1), S = x.size(2), D = x.size(3), n_tiles = ceil_div(S, rows);
  auto out = at::full({B, H, n_tiles * rows, cols}, -1.f, x.options());  // -1: never written
  float* O = out.data_ptr<float>();
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < H; ++h)
      for (int64_t t = 0; t < n_tiles; ++t) {
        const int64_t r0 = t * rows, nrows = imin(rows, S - r0);
        const float* src = X.row(b, h, r0);  // the kernels' tile base
        float* dst = O + ((b * H + h) * n_tiles * rows + r0) * cols;
        for (int idx = 0; idx < rows * (cols / vec); ++idx) {
          const Chunk ch = tile_chunk(idx, static_cast<int>(cols), static_cast<int>(vec));
          for (int e = 0; e < vec; ++e)
            dst[ch.r * cols + ch.c + e] =
                (ch.r < nrows && ch.c + e < D) ? src[ch.r * X.ss + ch.c + e] : 0.f;
        }
      }
  return out;
}

// (n, 10) int64 rows: elem_bytes, D bucket, fwd (br, bc), dK/dV (bc, br, ds), dQ (br, bc, ds)
// for elem_bytes in (2, 4) and every bucket; plus head_dim_bucket(d) for d in 0..300.
std::tuple<at::Tensor, at::Tensor> tile_configs() {
  const int buckets[] = {32, 64, 96, 128, 192, 256};
  auto cfg = at::empty({12, 10}, at::kLong);
  auto C = cfg.accessor<int64_t, 2>();
  int row = 0;
  for (int eb : {2, 4})
    for (int d : buckets) {
      const FwdConfig f = fwd_config(eb, d);
      const DkdvConfig a = dkdv_config(eb, d);
      const DqConfig q = dq_config(eb, d);
      const int64_t vals[10] = {eb, d, f.br, f.bc, a.bc, a.br, a.ds, q.br, q.bc, q.ds};
      for (int c = 0; c < 10; ++c) C[row][c] = vals[c];
      ++row;
    }
  auto bk = at::empty({301}, at::kLong);
  for (int d = 0; d <= 300; ++d) bk[d] = head_dim_bucket(d);
  return {cfg, bk};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(truthgpt_test, m) {
  m.def("attention_host_fwd(Tensor q, Tensor k, Tensor v, float scale, int window_left, int window_right, "
        "Tensor? alibi_slopes, Tensor? block_mask, int block_size, Tensor? key_mask, float softcap, "
        "Tensor? rel_bias, float dropout_p, Tensor? dropout_seed, int block_q, int block_k) -> (Tensor, Tensor)");
  m.def("attention_host_bwd(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
        "float scale, int window_left, int window_right, Tensor? alibi_slopes, Tensor? block_mask, "
        "int block_size, Tensor? key_mask, float softcap, Tensor? rel_bias, float dropout_p, "
        "Tensor? dropout_seed, int block_q, int block_k) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("attention_gather_tiles(Tensor x, int rows, int cols, int vec) -> Tensor");
  // no tensor inputs: registered as catch-all (CompositeImplicitAutograd) kernels
  m.def("attention_tile_map(Tensor? block_mask, int seq_q, int seq_k, int window_left, int window_right, "
        "int block_size, int block_q, int block_k, bool by_key) -> Tensor",
        &tile_map);
  m.def("attention_fragment_maps() -> Tensor[]", &fragment_maps);
  m.def("attention_block_coords(int n, int heads, int n_tiles, int n_slices) -> Tensor", &block_coords_op);
  m.def("attention_kv_heads(int heads_q, int heads_kv) -> Tensor", &kv_heads_op);
  m.def("attention_tile_configs() -> (Tensor, Tensor)", &tile_configs);
}

TORCH_LIBRARY_IMPL(truthgpt_test, CPU, m) {
  m.impl("attention_host_fwd", &host_fwd);
  m.impl("attention_host_bwd", &host_bwd);
  m.impl("attention_gather_tiles", &gather_tiles);
}

}  // namespace truthgpt::testing
