// GPU-independent logic of the CUDA attention kernels (csrc/cuda/attention_kernel.cuh), as
// TG_HD functions: the kernels call them on the device, and csrc/testing/attention.cpp calls
// the very same functions on the host (compiled into _C), so CI checks them against
// ops/reference.py without a GPU. Plain C++: no CUDA and no torch headers.
//
// Conventions (csrc/registration.cpp): q (B,Hq,Sq,D), k/v (B,Hkv,Sk,D); query i sits at
// i' = i + Sk - Sq; key j is visible for query i iff
//   i' - window_left <= j <= i' + window_right   (-1 = unbounded; causal folded into right)
//   && block_mask[b, h, i / block_size, j / block_size] && key_mask[b, j].
// Score: s = scale * q.k; if softcap > 0: s = softcap * tanh(s / softcap); s -= slope*|i'-j|;
// s += rel[h, j - i + Sq - 1] (T5 bias by distance). Dropout multiplies P by keep_scale or 0
// (csrc/common/philox.h) after the softmax statistics, before P V.
#pragma once
#include <cmath>
#include <cstdint>

#include "common/host_device.h"
#include "common/philox.h"

namespace truthgpt::attn {

// ---------------------------------------------------------------------------- the problem
// Everything the score and the masks depend on. Strides are in elements; a null pointer means
// "no such mask". Bool tensors are read as bytes (0 / 1).
struct Problem {
  int64_t B, Hq, Hkv, Sq, Sk, D;
  float scale, softcap;                 // softcap 0 = off
  int64_t window_left, window_right;    // -1 = unbounded
  const float* alibi;                   // (B, Hq) float32 or null
  int64_t alibi_sb, alibi_sh;
  const uint8_t* block_mask;            // (B, Hq, ceil(Sq/bs), ceil(Sk/bs)) or null
  int64_t bm_sb, bm_sh, bm_sq, bm_sk;
  int64_t block_size;
  const uint8_t* key_mask;              // (B, Sk) or null
  int64_t km_sb, km_ss;
  const float* rel;                     // (Hq, Sq + Sk - 1) float32 bias by distance, or null
  int64_t rel_sh;
  bool dropout;                         // dropout on: keep iff Philox word >= drop_threshold
  uint32_t drop_threshold;
  float keep_scale;                     // 1 / (1 - p)
  uint64_t seed;
};

constexpr float kNegInf = -INFINITY;

TG_HD int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
TG_HD int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }
TG_HD int64_t imax(int64_t a, int64_t b) { return a > b ? a : b; }

// ---------------------------------------------------------------------------- indexing
// Element offset of (b, h, s) in a (B, H, S, D) tensor with strides (sb, sh, ss) and unit
// inner stride; 64-bit throughout.
TG_HD int64_t offset_bhs(int64_t b, int64_t h, int64_t s, int64_t sb, int64_t sh, int64_t ss) {
  return b * sb + h * sh + s * ss;
}

// GQA / MQA: query head h reads kv head h / (Hq / Hkv) (as repeat_interleave in the reference).
TG_HD int64_t kv_head(int64_t h, int64_t Hq, int64_t Hkv) { return h / (Hq / Hkv); }

// Position offset of the queries: i' = i + query_offset.
TG_HD int64_t query_offset(const Problem& p) { return p.Sk - p.Sq; }

// Grid of the forward and of the dQ kernel: one block per (b, h, query tile, d slice), flat
// index = ((b * Hq + h) * n_tiles + tile) * n_slices + slice.  Same for the dK/dV kernel with
// (b, kv head, key tile, slice).
struct BlockCoords {
  int64_t b, h, tile, slice;
};
TG_HD BlockCoords block_coords(int64_t idx, int64_t heads, int64_t n_tiles, int64_t n_slices) {
  BlockCoords c;
  c.slice = idx % n_slices;
  idx /= n_slices;
  c.tile = idx % n_tiles;
  idx /= n_tiles;
  c.h = idx % heads;
  c.b = idx / heads;
  return c;
}

// Tile loader: a tile of `rows` rows x `cols` (a multiple of vec) columns is read in chunks
// of vec elements; chunk `idx` (threads stride over idx) covers row r, columns [c, c + vec).
struct Chunk {
  int r, c;
};
TG_HD Chunk tile_chunk(int idx, int cols, int vec) {
  const int per_row = cols / vec;
  return Chunk{idx / per_row, (idx % per_row) * vec};
}

// ---------------------------------------------------------------------------- visibility
TG_HD bool window_visible(const Problem& p, int64_t i_abs, int64_t j) {
  return (p.window_left < 0 || j >= i_abs - p.window_left) &&
         (p.window_right < 0 || j <= i_abs + p.window_right);
}

TG_HD bool key_visible(const Problem& p, int64_t b, int64_t j) {
  return j >= 0 && j < p.Sk && (p.key_mask == nullptr || p.key_mask[b * p.km_sb + j * p.km_ss] != 0);
}

// block_mask + b * bm_sb + h * bm_sh (null when there is no block mask).
TG_HD const uint8_t* block_mask_bh(const Problem& p, int64_t b, int64_t h) {
  return p.block_mask == nullptr ? nullptr : p.block_mask + b * p.bm_sb + h * p.bm_sh;
}

// Is (query i, key j) visible, given whether key j passes the key mask (key_ok) and the
// block-mask base of this (b, h)? Bounds: 0 <= i < Sq; j's bounds are part of key_ok.
TG_HD bool elem_visible(const Problem& p, int64_t i, int64_t j, bool key_ok, const uint8_t* bm_bh) {
  if (!key_ok || i < 0 || i >= p.Sq) return false;
  if (!window_visible(p, i + query_offset(p), j)) return false;
  if (bm_bh != nullptr && bm_bh[(i / p.block_size) * p.bm_sq + (j / p.block_size) * p.bm_sk] == 0)
    return false;
  return true;
}

// ---------------------------------------------------------------------------- tile lists
// Key tiles (of bc keys) that the window lets queries [q0, q1) reach: [begin, end).
struct TileRange {
  int64_t begin, end;
};
TG_HD TileRange key_tile_range(const Problem& p, int64_t q0, int64_t q1, int64_t bc) {
  const int64_t off = query_offset(p);
  int64_t lo = 0, hi = p.Sk;  // keys [lo, hi)
  if (p.window_left >= 0) lo = imax(lo, q0 + off - p.window_left);
  if (p.window_right >= 0) hi = imin(hi, q1 - 1 + off + p.window_right + 1);
  if (q1 <= q0 || hi <= lo) return TileRange{0, 0};
  return TileRange{lo / bc, ceil_div(hi, bc)};
}

// Query tiles (of br queries) from which keys [k0, k1) are reachable: [begin, end).
TG_HD TileRange query_tile_range(const Problem& p, int64_t k0, int64_t k1, int64_t br) {
  const int64_t off = query_offset(p);
  int64_t lo = 0, hi = p.Sq;  // queries [lo, hi); i' in [j - right, j + left]
  if (p.window_right >= 0) lo = imax(lo, k0 - p.window_right - off);
  if (p.window_left >= 0) hi = imin(hi, k1 - 1 + p.window_left - off + 1);
  if (k1 <= k0 || hi <= lo) return TileRange{0, 0};
  return TileRange{lo / br, ceil_div(hi, br)};
}

// Block-mask scans larger than this many entries per tile pair are not done: the tile is then
// treated as visible and partial (correct, only slower), so tiny block sizes stay cheap.
constexpr int64_t kMaxBlockScan = 64;

// What a tile pair (queries [q0, q1), keys [k0, k1), both non-empty and in bounds) needs:
// skip = no element is visible under the window and the block mask (so the kernel skips it);
// full = every element is (so no per-element window / block-mask test is needed).
// The key mask and the tile's ragged edges are not considered here.
struct TileInfo {
  bool skip, full;
};
// Window test of the rectangle queries [q0, q1) x keys [k0, k1) (both non-empty): does it hold
// any visible pair (skip = !any), are all pairs visible (full)?
TG_HD TileInfo window_rect(const Problem& p, int64_t q0, int64_t q1, int64_t k0, int64_t k1) {
  const int64_t off = query_offset(p);
  // j - i' over the rectangle spans [k0 - (q1 - 1 + off), (k1 - 1) - (q0 + off)], every integer
  const int64_t dmin = k0 - (q1 - 1 + off), dmax = (k1 - 1) - (q0 + off);
  const bool any = (p.window_left < 0 || dmax >= -p.window_left) && (p.window_right < 0 || dmin <= p.window_right);
  const bool all = (p.window_left < 0 || dmin >= -p.window_left) && (p.window_right < 0 || dmax <= p.window_right);
  return TileInfo{!any, any && all};
}
// Exact when the block scan is done: skip iff no pair is visible under window AND block mask.
TG_HD TileInfo tile_info(const Problem& p, const uint8_t* bm_bh, int64_t q0, int64_t q1,
                         int64_t k0, int64_t k1) {
  const TileInfo w = window_rect(p, q0, q1, k0, k1);
  if (w.skip || bm_bh == nullptr) return w;
  const int64_t bs = p.block_size;
  const int64_t qb0 = q0 / bs, qb1 = (q1 - 1) / bs, kb0 = k0 / bs, kb1 = (k1 - 1) / bs;
  if ((qb1 - qb0 + 1) * (kb1 - kb0 + 1) > kMaxBlockScan) return TileInfo{false, false};
  bool any = false, all = true;
  for (int64_t qb = qb0; qb <= qb1; ++qb)
    for (int64_t kb = kb0; kb <= kb1; ++kb) {
      if (bm_bh[qb * p.bm_sq + kb * p.bm_sk] == 0) {
        all = false;
      } else if (!any) {  // does the window reach the part of this block inside the tile?
        any = !window_rect(p, imax(q0, qb * bs), imin(q1, (qb + 1) * bs), imax(k0, kb * bs),
                           imin(k1, (kb + 1) * bs)).skip;
      }
    }
  return TileInfo{!any, any && all && w.full};
}

// ---------------------------------------------------------------------------- scores
TG_HD float alibi_slope(const Problem& p, int64_t b, int64_t h) {
  return p.alibi == nullptr ? 0.f : p.alibi[b * p.alibi_sb + h * p.alibi_sh];
}

// The score of (i', j) from the raw dot product q.k; *tanh_out receives tanh(scale*dot/softcap)
// (0 without softcap) for the backward.
TG_HD float score(const Problem& p, float dot, float slope, int64_t i_abs, int64_t j, float* tanh_out) {
  float s = p.scale * dot;
  float t = 0.f;
  if (p.softcap > 0.f) {
    t = tanh_precise(s / p.softcap);  // (not tanhf: --use_fast_math makes it approximate)
    s = p.softcap * t;
  }
  *tanh_out = t;
  if (slope != 0.f) {
    const int64_t dist = i_abs > j ? i_abs - j : j - i_abs;
    s -= slope * static_cast<float>(dist);
  }
  return s;
}

// The relative-position bias of (i, j): rel[h, j - i + Sq - 1] (0 without one, and for the
// zero-filled rows / columns of a tile past Sq / Sk). Added to score()'s result.
TG_HD float rel_bias_at(const Problem& p, int64_t h, int64_t i, int64_t j) {
  return (p.rel == nullptr || i >= p.Sq || j >= p.Sk) ? 0.f : p.rel[h * p.rel_sh + (j - i + p.Sq - 1)];
}

// Dropout's factor on P at (b, h, i, j): keep_scale where kept, 0 where dropped, 1 without
// dropout (or past Sq / Sk, where P is 0 anyway). Element e = ((b Hq + h) Sq + i) Sk + j.
TG_HD float dropout_factor(const Problem& p, int64_t b, int64_t h, int64_t i, int64_t j) {
  if (!p.dropout || i >= p.Sq || j >= p.Sk) return 1.f;
  const uint64_t e = static_cast<uint64_t>(((b * p.Hq + h) * p.Sq + i) * p.Sk + j);
  return philox::word(p.seed, e) >= p.drop_threshold ? p.keep_scale : 0.f;
}

// d score / d (scale * dot): 1, or 1 - tanh^2 with softcap.
TG_HD float softcap_grad(const Problem& p, float t) { return p.softcap > 0.f ? 1.f - t * t : 1.f; }

// ---------------------------------------------------------------------------- online softmax
// Per row: m = running max (-inf before any visible key), l = running sum of exp(s - m),
// o = running sum of exp(s - m) v. For each key tile: m_new = max(m, tile max) (max_nan);
// alpha = online_rescale(m, m_new) multiplies l and o; p = online_prob(s, m_new).
// NaN/Inf in q, k or v reach the rows they reach: a NaN score makes the row max NaN (fmaxf
// would drop it and leave an "empty" row of zeros), then l, the output and lse are NaN.

// max that propagates NaN (fmaxf returns the other operand).
TG_HD float max_nan(float a, float b) { return (a > b || a != a) ? a : b; }
TG_HD float online_rescale(float m_old, float m_new) {
  return m_new == kNegInf ? 1.f : expf(m_old - m_new);  // m_old = -inf, m_new finite -> 0
}
TG_HD float online_prob(float s, float m) { return s == kNegInf ? 0.f : expf(s - m); }
// Final: out = o * softmax_inv_sum(l); lse = softmax_lse(m, l). A row without a visible key
// has l = 0: out 0, lse -inf. A NaN l (a NaN reached the row) gives NaN for both.
TG_HD float softmax_inv_sum(float l) { return l != 0.f ? 1.f / l : 0.f; }
TG_HD float softmax_lse(float m, float l) { return l != 0.f ? m + logf(l) : kNegInf; }
// o * inv, but exactly 0 for a row without a visible key (o may hold 0 * NaN from the v of a
// key other rows of the tile see).
TG_HD float softmax_out(float o, float l, float inv) { return l != 0.f ? o * inv : 0.f; }

// ---------------------------------------------------------------------------- backward
// P recomputed from the saved lse (0 for a masked pair or a row with no visible key).
TG_HD float backward_prob(float s, float lse, bool visible) {
  return (visible && lse != kNegInf) ? expf(s - lse) : 0.f;
}
// delta_i = sum_d dO[i, d] * O[i, d] is computed by the very product that computes dP
// (attention_delta_kernel: the diagonal of dO O^T for the dQ kernel, of O dO^T for the dK/dV
// kernel, with gemm_nt as dP = dO V^T and dP^T = V dO^T): a row whose mass sits on one key j
// has O == v_j exactly, so dP_ij == delta_i bit for bit and dS is exactly 0 (the gradient of
// the constant softmax of one key) instead of the rounding difference of two sums.
// dS = P * (dP - delta) * dscore/draw; then dQ = scale * dS K, dK = scale * dS^T Q.
TG_HD float backward_dscore(const Problem& p, float prob, float dp, float delta, float t) {
  return prob * (dp - delta) * softcap_grad(p, t);
}

// ---------------------------------------------------------------------------- tile shapes
// Tile sizes per element size and head-dim bucket (one config used by kernels, launchers and
// the host tests). Every warp owns 16 rows (one m16 MMA row block).
struct FwdConfig {
  int br, bc;  // queries per block, keys per step
};
TG_HD constexpr FwdConfig fwd_config(int elem_bytes, int d) {
  (void)elem_bytes;
  return FwdConfig{64, d <= 128 ? 64 : 32};
}
struct DkdvConfig {
  int bc, br, ds;  // keys per block, queries per step, head-dim slice of the dK/dV accumulators
};
TG_HD constexpr DkdvConfig dkdv_config(int elem_bytes, int d) {
  return DkdvConfig{(elem_bytes == 4 && d > 128) ? 32 : 64, d <= 64 ? 64 : 32, d <= 128 ? d : d / 2};
}
struct DqConfig {
  int br, bc, ds;  // queries per block, keys per step, head-dim slice of the dQ accumulator
};
TG_HD constexpr DqConfig dq_config(int elem_bytes, int d) {
  return DqConfig{(elem_bytes == 4 && d > 128) ? 32 : 64, d <= 64 ? 64 : 32, d <= 128 ? d : d / 2};
}
// Head-dim buckets: each has its own translation units; D is padded up to its bucket (the
// padding columns are zero-filled on load and never stored). 0 = unsupported.
TG_HD constexpr int head_dim_bucket(int64_t d) {
  return d < 1 ? 0 : d <= 32 ? 32 : d <= 64 ? 64 : d <= 96 ? 96 : d <= 128 ? 128 : d <= 192 ? 192 : d <= 256 ? 256 : 0;
}

// ---------------------------------------------------------------------------- MMA fragments
// Register layouts of mma.sync.m16n8k16 (PTX ISA, "Matrix fragments for mma.m16n8k16"), for
// lane = groupID * 4 + tid_in_group (g = lane / 4, t = lane % 4):
//   C/D (16x8 f32), element e = 0..3:  row g + 8 * (e / 2), col 2t + (e % 2)
//   A (16x16), element e = 0..7:       row g + 8 * ((e / 2) % 2), col 2t + (e % 2) + 8 * (e / 4)
//   B (16x8),  element e = 0..3:       row (k) 2t + (e % 2) + 8 * (e / 2), col (n) g
// A warp's S tile (16 x 8n) is held as n accumulators; the kernels feed it back as the A
// operand of the next product (P V, dS K, ...) without shared memory: A element e of k-step
// kk is accumulator element acc_of_a(e) of n-tile 2 kk + (e / 4).
struct Coord {
  int row, col;
};
TG_HD Coord acc_coord(int lane, int ntile, int e) {
  return Coord{lane / 4 + 8 * (e / 2), 8 * ntile + 2 * (lane % 4) + (e % 2)};
}
TG_HD Coord a_coord(int lane, int kstep, int e) {
  return Coord{lane / 4 + 8 * ((e / 2) % 2), 16 * kstep + 2 * (lane % 4) + (e % 2) + 8 * (e / 4)};
}
TG_HD Coord b_coord(int lane, int kstep, int ntile, int e) {
  return Coord{16 * kstep + 2 * (lane % 4) + (e % 2) + 8 * (e / 2), 8 * ntile + lane / 4};
}
// The accumulator (n-tile, element) that supplies A element e of k-step kk.
TG_HD int a_from_acc_ntile(int kstep, int e) { return 2 * kstep + e / 4; }
TG_HD int a_from_acc_elem(int e) { return e % 4; }
// Is accumulator element e of n-tile `ntile` of a 16 x 16 tile (2 n-tiles) on its diagonal
// (the delta kernel reads delta_i = (dO O^T)_ii there)?
TG_HD bool acc_on_diagonal(int lane, int ntile, int e) {
  const Coord c = acc_coord(lane, ntile, e);
  return c.row == c.col;
}
// fp32 path (no MMA): column k of a warp's 16-row tile held in accumulator layout lives in lane
// (lane & ~3) | shfl_src_tid(k), n-tile k / 8, element (k % 2) (+2 for the row g + 8).
TG_HD int shfl_src_tid(int k) { return (k % 8) / 2; }

}  // namespace truthgpt::attn
