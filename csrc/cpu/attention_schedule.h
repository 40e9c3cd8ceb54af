// CPU attention, part 3 of 4: the work-item schedule. The `Problem` (shapes, strides,
// masks), query tiles, the visible key runs of a tile cut into pieces (window, block mask, key
// mask), per-piece column masks, the heaviest-first work order and the thread loop
// (`run_items`), and the setup shared by forward and backward. Included by attention.cpp only.
#pragma once
#include "cpu/attention_rows_avx2.h"

namespace truthgpt {
namespace {  // internal to the CPU attention kernel (one translation unit: attention.cpp)

// ============================================================================ problem, tiles
struct Piece {
  int64_t j0, j1;
  bool partial;  // some (row, key) pairs of the piece are masked
  bool need_cm;  // ... by the key mask or the block mask (not only by the window)
};

struct Tile {
  int64_t b, kvh, h0, nh, i0, i1;
  int64_t nr() const { return i1 - i0; }
  int64_t rows() const { return nh * (i1 - i0); }
};

struct Problem {
  int64_t B = 0, Hq = 0, Hkv = 0, Sq = 0, Sk = 0, D = 0, g = 1;
  double scale = 1.0, softcap = 0.0;
  int64_t wl = -1, wr = -1, off = 0;
  std::vector<double> slopes;  // B * Hq, empty without ALiBi
  const uint8_t* bm = nullptr;
  int64_t bm_sB = 0, bm_sH = 0, bm_sQ = 0, bm_sK = 0, bs = 1;
  const uint8_t* km = nullptr;
  int64_t km_sB = 0, km_sK = 0;
  std::vector<int32_t> kmc;  // B x (Sk + 1) prefix counts of the key mask
  // tiling
  int64_t BQ = 128, BK = 512, hpt = 1, ngroups = 1;
  std::vector<std::pair<int64_t, int64_t>> qtiles;

  int64_t lo(int64_t i) const {
    const int64_t p = i + off;
    return wl < 0 ? 0 : std::max<int64_t>(0, p - wl);
  }
  int64_t hi(int64_t i) const {
    const int64_t p = i + off;
    return wr < 0 ? Sk - 1 : std::min<int64_t>(Sk - 1, p + wr);
  }
  bool bmask(int64_t b, int64_t h, int64_t qb, int64_t kb) const {
    return bm[b * bm_sB + h * bm_sH + qb * bm_sQ + kb * bm_sK] != 0;
  }
  bool kmask(int64_t b, int64_t j) const { return km[b * km_sB + j * km_sK] != 0; }
  int64_t items_fwd() const { return B * Hkv * ngroups * static_cast<int64_t>(qtiles.size()); }
  Tile tile(int64_t b, int64_t kvh, int64_t grp, int64_t t) const {
    const int64_t h0 = kvh * g + grp * hpt;
    return Tile{b, kvh, h0, std::min<int64_t>(hpt, (kvh + 1) * g - h0), qtiles[t].first, qtiles[t].second};
  }
};

// The causal bound of piece pc of tile t (Tri, attention_gemm.h): row r of the tile is query
// i0 + r, which sees keys up to i0 + r + off + wr, i.e. columns c <= r + (i0 + off + wr - j0)
// of the piece. Only for rows of one head (a tile of several heads repeats the rows) and a
// piece with masked entries.
inline Tri piece_tri(const Problem& P, const Tile& t, const Piece& pc, Tri::Mode mode) {
  Tri tri;
  if (P.wr < 0 || t.nh != 1 || !pc.partial) return tri;
  tri.mode = mode;
  tri.shift = t.i0 + P.off + P.wr - pc.j0;
  return tri;
}

int64_t env_int(const char* name, int64_t dflt) {
  const char* v = std::getenv(name);
  if (!v || !*v) return dflt;
  const long long x = std::atoll(v);
  return x > 0 ? static_cast<int64_t>(x) : dflt;
}

// Tile sizes: BQ query rows x BK keys. With a block mask, query tiles never straddle a
// query block (so one block-mask row applies) unless blocks are smaller than 32 rows.
// (128 x 512 measured best or equal-best for fp32 and bf16, forward and backward, D 64.)
void plan_tiles(Problem& P) {
  int64_t BQ = 128, BK = 512;
  if (P.D > 128) BQ = 64;
  BQ = env_int("TRUTHGPT_ATTN_BQ", BQ);
  BK = (env_int("TRUTHGPT_ATTN_BK", BK) + 15) / 16 * 16;
  // narrow windows: keep the wasted triangle of a tile small
  if (P.wl >= 0 && P.wr >= 0) {
    const int64_t w = P.wl + P.wr + 1;
    while (BQ > 32 && BQ * 4 > w) BQ /= 2;
  }
  // decoding / short queries: several query heads of one kv head per tile
  P.hpt = 1;
  if (P.Sq >= 1 && P.Sq <= 16 && P.g > 1) P.hpt = std::max<int64_t>(1, std::min<int64_t>(P.g, BQ / P.Sq));
  P.ngroups = (P.g + P.hpt - 1) / P.hpt;
  P.BQ = BQ;
  P.BK = BK;
  P.qtiles.clear();
  if (P.bm && P.bs >= 32) {
    const int64_t per = (P.bs + BQ - 1) / BQ;  // tiles per query block
    const int64_t size = (P.bs + per - 1) / per;
    for (int64_t b0 = 0; b0 < P.Sq; b0 += P.bs) {
      const int64_t bend = std::min<int64_t>(b0 + P.bs, P.Sq);
      for (int64_t i0 = b0; i0 < bend; i0 += size) P.qtiles.emplace_back(i0, std::min<int64_t>(i0 + size, bend));
    }
  } else {
    int64_t step = BQ;
    if (P.bm) step = std::max<int64_t>(1, BQ / P.bs) * P.bs;  // whole small blocks
    for (int64_t i0 = 0; i0 < P.Sq; i0 += step) P.qtiles.emplace_back(i0, std::min<int64_t>(i0 + step, P.Sq));
  }
}

// Forward key splits (flash-decoding) for few work items; depends on the problem only.
int64_t fwd_key_splits(const Problem& P) {
  const int64_t items = P.items_fwd();
  int64_t nsplit = 1;
  if (items < 64 && P.Sk >= 4 * P.BK) nsplit = std::min<int64_t>((64 + items - 1) / items, P.Sk / (2 * P.BK));
  return std::min<int64_t>(std::max<int64_t>(1, env_int("TRUTHGPT_ATTN_SPLITK", nsplit)), std::max<int64_t>(1, P.Sk));
}

// Backward schedule: one item per (batch, kv head) owns dK, dV and the dQ of its query heads
// (one pass); with fewer such items than threads, dK/dV per key block, then dQ per query tile.
bool bwd_single_pass(const Problem& P) {
  const int64_t nthreads = at::get_num_threads();
  const int64_t n_single = P.B * P.Hkv;
  bool single = n_single >= 2 * nthreads || (n_single >= nthreads && n_single % nthreads == 0);
  const char* mode = std::getenv("TRUTHGPT_ATTN_BWD");
  if (mode && std::string(mode) == "single") single = true;
  if (mode && std::string(mode) == "split") single = false;
  return single;
}

// Visible key pieces of a tile within keys [L0, L1): window union, intersected with the runs
// of key blocks visible to some row of the tile, cut into pieces of at most BK keys.
void tile_pieces(const Problem& P, const Tile& t, int64_t L0, int64_t L1, std::vector<Piece>& out,
                 std::vector<uint8_t>& any_buf, std::vector<uint8_t>& all_buf) {
  out.clear();
  int64_t wlo = std::numeric_limits<int64_t>::max(), whi = -1, maxlo = 0, minhi = std::numeric_limits<int64_t>::max();
  bool has_empty = false;
  for (int64_t i = t.i0; i < t.i1; ++i) {
    const int64_t lo = P.lo(i), hi = P.hi(i);
    if (lo > hi) {
      has_empty = true;
      continue;
    }
    wlo = std::min(wlo, lo);
    whi = std::max(whi, hi);
    maxlo = std::max(maxlo, lo);
    minhi = std::min(minhi, hi);
  }
  wlo = std::max(wlo, L0);
  whi = std::min(whi, L1 - 1);
  if (wlo > whi) return;
  const bool window_all = !has_empty;
  auto emit = [&](int64_t a, int64_t e, int64_t kb_first) {  // run [a, e] inclusive
    const int64_t len = e - a + 1;
    const int64_t np = (len + P.BK - 1) / P.BK;
    int64_t psize = (len + np - 1) / np;
    psize = std::min<int64_t>(P.BK, (psize + 15) / 16 * 16);
    for (int64_t j0 = a; j0 <= e; j0 += psize) {
      const int64_t j1 = std::min<int64_t>(j0 + psize, e + 1);
      Piece pc{j0, j1, false, false};
      pc.partial = !(window_all && maxlo <= j0 && minhi >= j1 - 1);
      if (P.km) {
        const int32_t* c = P.kmc.data() + t.b * (P.Sk + 1);
        const int64_t cnt = c[j1] - c[j0];
        if (cnt == 0) continue;
        if (cnt < j1 - j0) pc.partial = pc.need_cm = true;
      }
      if (P.bm) {
        for (int64_t kb = j0 / P.bs; kb <= (j1 - 1) / P.bs; ++kb)
          if (!all_buf[kb - kb_first]) pc.partial = pc.need_cm = true;
      }
      out.push_back(pc);
    }
  };
  if (!P.bm) {
    emit(wlo, whi, 0);
    return;
  }
  const int64_t kb0 = wlo / P.bs, kb1 = whi / P.bs;
  const int64_t qb0 = t.i0 / P.bs, qb1 = (t.i1 - 1) / P.bs;
  const int64_t nkb = kb1 - kb0 + 1;
  any_buf.assign(nkb, 0);
  all_buf.assign(nkb, 1);
  for (int64_t h = t.h0; h < t.h0 + t.nh; ++h)
    for (int64_t qb = qb0; qb <= qb1; ++qb)
      for (int64_t kb = kb0; kb <= kb1; ++kb) {
        const bool v = P.bmask(t.b, h, qb, kb);
        any_buf[kb - kb0] |= v;
        all_buf[kb - kb0] &= v;
      }
  int64_t kb = kb0;
  while (kb <= kb1) {
    if (!any_buf[kb - kb0]) {
      ++kb;
      continue;
    }
    int64_t ke = kb;
    while (ke + 1 <= kb1 && any_buf[ke + 1 - kb0]) ++ke;
    emit(std::max(wlo, kb * P.bs), std::min(whi, (ke + 1) * P.bs - 1), kb0);
    kb = ke + 1;
  }
}

// Column masks of a partial piece: one per (head, query block) group of the tile's rows.
template <typename Acc>
void piece_colmasks(const Problem& P, const Tile& t, const Piece& pc, std::vector<uint8_t>& buf,
                    std::vector<RowInfo<Acc>>& ri) {
  const int64_t n = pc.j1 - pc.j0, nr = t.nr();
  if (!pc.need_cm) {
    for (int64_t r = 0; r < t.rows(); ++r) ri[r].cm = nullptr;
    return;
  }
  const int64_t qb0 = P.bm ? t.i0 / P.bs : 0;
  const int64_t nqg = P.bm ? (t.i1 - 1) / P.bs - qb0 + 1 : 1;
  const int64_t ngrp = P.bm ? t.nh * nqg : 1;
  const int64_t ld = (n + 63) / 64 * 64;
  buf.resize(ngrp * ld);
  for (int64_t gi = 0; gi < ngrp; ++gi) {
    uint8_t* c = buf.data() + gi * ld;
    for (int64_t j = 0; j < n; ++j) c[j] = P.km ? P.kmask(t.b, pc.j0 + j) : 1;
    if (P.bm) {
      const int64_t h = t.h0 + gi / nqg, qb = qb0 + gi % nqg;
      for (int64_t j = 0; j < n;) {
        const int64_t kb = (pc.j0 + j) / P.bs;
        const int64_t jend = std::min<int64_t>(n, (kb + 1) * P.bs - pc.j0);
        if (!P.bmask(t.b, h, qb, kb)) std::memset(c + j, 0, jend - j);
        j = jend;
      }
    }
  }
  for (int64_t r = 0; r < t.rows(); ++r) {
    int64_t gi = 0;
    if (P.bm) gi = (r / nr) * nqg + ((t.i0 + r % nr) / P.bs - qb0);
    ri[r].cm = buf.data() + gi * ld;
  }
}

// Heaviest tiles first (dynamic scheduling then balances causal / windowed work).
std::vector<int64_t> tile_order(const Problem& P) {
  const int64_t nt = static_cast<int64_t>(P.qtiles.size());
  std::vector<int64_t> order(nt);
  std::vector<int64_t> cost(nt);
  for (int64_t t = 0; t < nt; ++t) {
    order[t] = t;
    const int64_t i0 = P.qtiles[t].first, i1 = P.qtiles[t].second - 1;
    cost[t] = std::max<int64_t>(0, P.hi(i1) - P.lo(i0) + 1);
  }
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return cost[a] > cost[b]; });
  return order;
}

// Runs f(item, thread_state) for items [0, n) over at::parallel_for threads, each thread
// taking the next item from a shared counter.
template <typename State, typename F>
void run_items(int64_t n, F&& f) {
  if (n <= 0) return;
  std::atomic<int64_t> next{0};
  const int64_t nt = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), n));
  at::parallel_for(0, nt, 1, [&](int64_t, int64_t) {
    MklSingleThread guard;
    FlushDenormals ftz;
    State st;
    for (;;) {
      const int64_t it = next.fetch_add(1, std::memory_order_relaxed);
      if (it >= n) break;
      f(it, st);
    }
  });
}

// ============================================================================ setup
at::Tensor rows_unit(const at::Tensor& t) {
  // the kernels need unit stride along D and row strides (BLAS leading dimensions) that fit
  // a 32-bit int; batch and head strides are used in 64-bit pointer arithmetic only
  const bool ok = (t.stride(-1) == 1 || t.size(-1) == 1) && (t.stride(2) >= t.size(3) || t.size(2) == 1) &&
                  t.stride(2) < (int64_t{1} << 30);
  return ok ? t : t.contiguous();
}

void setup_problem(Problem& P, const at::Tensor& q, const at::Tensor& k, double scale, int64_t wl, int64_t wr,
                   const c10::optional<at::Tensor>& alibi, const c10::optional<at::Tensor>& block_mask,
                   int64_t block_size, const c10::optional<at::Tensor>& key_mask, double softcap,
                   at::Tensor& bm_keep, at::Tensor& km_keep) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4, "attention: q, k, v must be 4-d (B, H, S, D)");
  P.B = q.size(0);
  P.Hq = q.size(1);
  P.Sq = q.size(2);
  P.D = q.size(3);
  P.Hkv = k.size(1);
  P.Sk = k.size(2);
  TORCH_CHECK(k.size(0) == P.B && k.size(3) == P.D && P.Hkv > 0 && P.Hq % P.Hkv == 0,
              "attention: k/v shapes do not match q");
  P.g = P.Hq / P.Hkv;
  P.scale = scale;
  P.softcap = softcap;
  P.wl = wl;
  P.wr = wr;
  P.off = P.Sk - P.Sq;
  if (alibi.has_value()) {
    const at::Tensor s = alibi->to(at::kDouble).expand({P.B, P.Hq}).contiguous();
    P.slopes.assign(s.data_ptr<double>(), s.data_ptr<double>() + P.B * P.Hq);
  }
  if (block_mask.has_value()) {
    TORCH_CHECK(block_size > 0, "attention: block_size must be positive");
    const int64_t nq = (P.Sq + block_size - 1) / block_size, nk = (P.Sk + block_size - 1) / block_size;
    bm_keep = block_mask->to(at::kBool).expand({P.B, P.Hq, nq, nk});
    P.bm = reinterpret_cast<const uint8_t*>(bm_keep.data_ptr<bool>());
    P.bm_sB = bm_keep.stride(0);
    P.bm_sH = bm_keep.stride(1);
    P.bm_sQ = bm_keep.stride(2);
    P.bm_sK = bm_keep.stride(3);
    P.bs = block_size;
  }
  if (key_mask.has_value()) {
    km_keep = key_mask->to(at::kBool).expand({P.B, P.Sk});
    P.km = reinterpret_cast<const uint8_t*>(km_keep.data_ptr<bool>());
    P.km_sB = km_keep.stride(0);
    P.km_sK = km_keep.stride(1);
    P.kmc.assign(P.B * (P.Sk + 1), 0);
    for (int64_t b = 0; b < P.B; ++b) {
      int32_t* c = P.kmc.data() + b * (P.Sk + 1);
      for (int64_t j = 0; j < P.Sk; ++j) c[j + 1] = c[j] + (P.kmask(b, j) ? 1 : 0);
    }
  }
}

template <typename Acc>
Cfg<Acc> make_cfg(const Problem& P) {
  Cfg<Acc> cf;
  cf.alibi = !P.slopes.empty();
  cf.softcap = P.softcap > 0;
  if (cf.softcap) {
    cf.inv_cap = static_cast<Acc>(1.0 / P.softcap);
    cf.capmul = static_cast<Acc>(P.softcap * kLog2e);
  }
  return cf;
}

template <typename Acc>
void fill_rows(const Problem& P, const Tile& t, std::vector<RowInfo<Acc>>& ri) {
  const int64_t nr = t.nr();
  ri.resize(t.rows());
  for (int64_t r = 0; r < t.rows(); ++r) {
    const int64_t h = t.h0 + r / nr, i = t.i0 + r % nr;
    RowInfo<Acc>& x = ri[r];
    x.pos = i + P.off;
    x.lo = P.lo(i);
    x.hi = P.hi(i);
    x.cm = nullptr;
    x.slope2 = P.slopes.empty() ? Acc(0) : static_cast<Acc>(P.slopes[t.b * P.Hq + h] * kLog2e);
  }
}

// A tile's rows of a (B, H, S, D) tensor as a matrix: a direct pointer when the tile is one
// head (rows at stride sS), else packed into `buf` (ld D).
template <typename T>
const T* tile_rows(const T* base, int64_t sB, int64_t sH, int64_t sS, const Tile& t, int64_t D, std::vector<T>& buf,
                   int64_t& ld) {
  if (t.nh == 1) {
    ld = sS;
    return base + t.b * sB + t.h0 * sH + t.i0 * sS;
  }
  const int64_t nr = t.nr();
  buf.resize(t.rows() * D);
  for (int64_t r = 0; r < t.rows(); ++r) {
    const T* src = base + t.b * sB + (t.h0 + r / nr) * sH + (t.i0 + r % nr) * sS;
    std::memcpy(buf.data() + r * D, src, sizeof(T) * D);
  }
  ld = D;
  return buf.data();
}

}  // namespace
}  // namespace truthgpt
