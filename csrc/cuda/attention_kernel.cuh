// The CUDA attention kernels (FlashAttention-2 style), templated on the element type T
// (__half, __nv_bfloat16, float) and the head-dim bucket D. Included only by the per-bucket
// translation units attention_fwd_<D>.cu / attention_bwd_<D>.cu. CUDA headers only.
//
// Layout of the work (tile sizes: attention_math.cuh fwd_config / dkdv_config / dq_config):
// - every warp owns 16 rows of a tile, held in the registers of mma.sync.m16n8k16 accumulators
//   (layout: attention_math.cuh "MMA fragments"); fp16/bf16 multiply on tensor cores with
//   float32 accumulation; float32 inputs use plain FMAs on the same register layout (full
//   fp32 precision; no tf32), with shuffles inside a quad to feed a row of P as an operand;
// - forward: a block per (b, h, 64-query tile); the Q tile stays in shared memory, K/V tiles
//   stream through shared memory; online softmax in registers; key tiles outside the window
//   are never visited and tiles the block mask (or an all-padding key mask) removes are
//   skipped before any math; ALiBi and softcap are applied to the scores in registers;
//   GQA reads kv head h / (Hq / Hkv) (no repeat);
// - backward: delta = rowsum(dO * O) pre-pass (by the product that computes dP); dK/dV: a block per (b, kv head, key tile,
//   head-dim slice) looping over the query heads of its GQA group and their visible query
//   tiles; dQ: a block per (b, h, query tile, slice) looping over visible key tiles. Every
//   output element is written by exactly one thread, in a fixed order: deterministic, no
//   atomics. The head-dim slice (D > 128 only) bounds the accumulator registers; S and dP
//   are then recomputed per slice.
// - every load is bounds-checked (zero fill beyond Sq / Sk / D), every store too; offsets
//   are 64-bit; the innermost stride is 1, the others arbitrary.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <climits>
#include <cstdint>
#include <type_traits>

#include "attention.h"
#include "attention_math.cuh"
#include "common.cuh"

namespace truthgpt::cuda {
namespace attn_kernels {

using namespace truthgpt::attn;

constexpr unsigned kFullMask = 0xffffffffu;

template <typename T> constexpr bool kIsF32 = std::is_same_v<T, float>;
template <typename T> constexpr int kVec = 16 / static_cast<int>(sizeof(T));  // elements / 16 B
// Shared-memory row pitch D + kVec: keeps 16-byte row alignment and makes the 32-bit fragment
// loads of 8 consecutive rows hit 8 different bank groups.
template <typename T, int D> constexpr int kPitch = D + kVec<T>;

// ---------------------------------------------------------------------------- primitives
template <typename T>
__device__ __forceinline__ void mma16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  if constexpr (std::is_same_v<T, __half>) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    static_assert(std::is_same_v<T, __nv_bfloat16>, "mma16816: fp16 or bf16");
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
#else
  __trap();  // built for an arch without mma.sync bf16/f16 m16n8k16 (the binding refuses < sm_80)
#endif
}

// Two consecutive 16-bit elements (the lower index in the low half), as one 32-bit word.
template <typename T>
__device__ __forceinline__ uint32_t ld_pair(const T* p) {
  return *reinterpret_cast<const uint32_t*>(p);
}
// Two 16-bit elements from anywhere.
template <typename T>
__device__ __forceinline__ uint32_t ld_two(const T* lo, const T* hi) {
  const uint32_t a = *reinterpret_cast<const uint16_t*>(lo);
  const uint32_t b = *reinterpret_cast<const uint16_t*>(hi);
  return a | (b << 16);
}
template <typename T>
__device__ __forceinline__ uint32_t pack_floats(float lo, float hi) {
  if constexpr (std::is_same_v<T, __half>) {
    const __half2 v = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&v);
  } else {
    const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&v);
  }
}

// acc (16 x 8 NT, accumulator layout) += A (16 x K) * B^T, with A row r at A + r * lda and
// B row n (= output column n) at B + n * ldb; both K-contiguous in shared memory. Fragment
// positions come from attention_math.cuh (acc_coord, a_coord, b_coord), tested on the host.
template <typename T, int NT, int K>
__device__ __forceinline__ void gemm_nt(float (&acc)[NT][4], const T* A, int lda, const T* B, int ldb) {
  const int lane = threadIdx.x & 31;
  if constexpr (kIsF32<T>) {
    // each thread computes its own accumulator elements: rows c0.row, c0.row + 8 (e = 0, 2),
    // columns c0.col + 8 nt, + 1 (e = 0, 1)
    const Coord c0 = acc_coord(lane, 0, 0), c3 = acc_coord(lane, 0, 3);
    const float* a0p = A + c0.row * lda;
    const float* a1p = A + c3.row * lda;
#pragma unroll 4
    for (int k = 0; k < K; ++k) {
      const float a0 = a0p[k], a1 = a1p[k];
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
        const float b0 = B[(c0.col + 8 * nt) * ldb + k], b1 = B[(c3.col + 8 * nt) * ldb + k];
        acc[nt][0] = fmaf(a0, b0, acc[nt][0]);
        acc[nt][1] = fmaf(a0, b1, acc[nt][1]);
        acc[nt][2] = fmaf(a1, b0, acc[nt][2]);
        acc[nt][3] = fmaf(a1, b1, acc[nt][3]);
      }
    }
  } else {
    static_assert(K % 16 == 0, "gemm_nt: K must be a multiple of 16");
#pragma unroll
    for (int ks = 0; ks < K / 16; ++ks) {
      uint32_t a[4];  // register q holds A elements 2q (low half) and 2q + 1: same row, next col
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        const Coord c = a_coord(lane, ks, 2 * q);
        a[q] = ld_pair(A + c.row * lda + c.col);
      }
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
        // B elements (k, n) = B[n * ldb + k]; register q holds elements 2q, 2q + 1 (k, k + 1)
        const Coord c0 = b_coord(lane, ks, nt, 0), c2 = b_coord(lane, ks, nt, 2);
        mma16816<T>(acc[nt], a, ld_pair(B + c0.col * ldb + c0.row), ld_pair(B + c2.col * ldb + c2.row));
      }
    }
  }
}

// acc (16 x 8 NT) += P (16 x 16 KT, in registers, accumulator layout: 2 KT n-tiles) * B,
// B (16 KT x 8 NT) row k at B + k * ldb in shared memory. P is rounded to T for the tensor
// cores (as FlashAttention does); the fp32 path keeps it in float32.
template <typename T, int NT, int KT>
__device__ __forceinline__ void gemm_rn(float (&acc)[NT][4], const float (&P)[2 * KT][4], const T* B, int ldb) {
  const int lane = threadIdx.x & 31;
  if constexpr (kIsF32<T>) {
    const Coord c0 = acc_coord(lane, 0, 0), c3 = acc_coord(lane, 0, 3);  // output rows/cols
#pragma unroll
    for (int k = 0; k < 16 * KT; ++k) {
      // P column k of this thread's rows c0.row and c0.row + 8, fetched from its quad
      const int src = (lane & ~3) | shfl_src_tid(k);
      const float p0 = __shfl_sync(kFullMask, P[k / 8][k % 2], src);
      const float p1 = __shfl_sync(kFullMask, P[k / 8][k % 2 + 2], src);
      const float* brow = B + k * ldb;
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
        const float b0 = brow[c0.col + 8 * nt], b1 = brow[c3.col + 8 * nt];
        acc[nt][0] = fmaf(p0, b0, acc[nt][0]);
        acc[nt][1] = fmaf(p0, b1, acc[nt][1]);
        acc[nt][2] = fmaf(p1, b0, acc[nt][2]);
        acc[nt][3] = fmaf(p1, b1, acc[nt][3]);
      }
    }
  } else {
#pragma unroll
    for (int ks = 0; ks < KT; ++ks) {
      uint32_t a[4];  // A element e = P[a_from_acc_ntile(ks, e)][a_from_acc_elem(e)]
#pragma unroll
      for (int q = 0; q < 4; ++q)
        a[q] = pack_floats<T>(P[a_from_acc_ntile(ks, 2 * q)][a_from_acc_elem(2 * q)],
                              P[a_from_acc_ntile(ks, 2 * q + 1)][a_from_acc_elem(2 * q + 1)]);
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
        uint32_t b[2];  // B elements (k, n) = B[k * ldb + n]; register q: elements 2q, 2q + 1
#pragma unroll
        for (int q = 0; q < 2; ++q) {
          const Coord lo = b_coord(lane, ks, nt, 2 * q), hi = b_coord(lane, ks, nt, 2 * q + 1);
          b[q] = ld_two(B + lo.row * ldb + lo.col, B + hi.row * ldb + hi.col);
        }
        mma16816<T>(acc[nt], a, b[0], b[1]);
      }
    }
  }
}

// dst[r][c] = src[r * row_stride + c] for r < nrows, c < ncols, else 0; ROWS x COLS tile with
// row pitch ld. 16-byte vector loads when `vec` (aligned base and strides) and in bounds.
template <typename T, int ROWS, int COLS, int NTH>
__device__ __forceinline__ void load_rows(T* dst, int ld, const T* src, int64_t row_stride,
                                          int64_t nrows, int ncols, bool vec) {
  constexpr int V = kVec<T>;
  static_assert(COLS % V == 0, "tile width must hold whole 16-byte chunks");
  const T zero = from_float<T>(0.f);
  for (int idx = threadIdx.x; idx < ROWS * (COLS / V); idx += NTH) {
    const Chunk ch = tile_chunk(idx, COLS, V);
    T* d = dst + ch.r * ld + ch.c;
    if (ch.r < nrows) {
      const T* s = src + ch.r * row_stride + ch.c;
      if (vec && ch.c + V <= ncols) {
        *reinterpret_cast<uint4*>(d) = *reinterpret_cast<const uint4*>(s);
      } else {
#pragma unroll
        for (int e = 0; e < V; ++e) d[e] = ch.c + e < ncols ? s[e] : zero;
      }
    } else {
#pragma unroll
      for (int e = 0; e < V; ++e) d[e] = zero;
    }
  }
}

__device__ __forceinline__ float quad_max(float x) {  // NaN-propagating (max_nan)
  x = max_nan(x, __shfl_xor_sync(kFullMask, x, 1));
  return max_nan(x, __shfl_xor_sync(kFullMask, x, 2));
}
__device__ __forceinline__ float quad_sum(float x) {
  x += __shfl_xor_sync(kFullMask, x, 1);
  return x + __shfl_xor_sync(kFullMask, x, 2);
}

template <int NT>
__device__ __forceinline__ void zero_acc(float (&a)[NT][4]) {
#pragma unroll
  for (int i = 0; i < NT; ++i)
#pragma unroll
    for (int e = 0; e < 4; ++e) a[i][e] = 0.f;
}

// ---------------------------------------------------------------------------- forward
template <typename T, int D>
struct FwdShape {
  static constexpr FwdConfig cfg = fwd_config(sizeof(T), D);
  static constexpr int BR = cfg.br, BC = cfg.bc, NW = BR / 16, NTH = NW * 32, LD = kPitch<T, D>;
  static constexpr size_t smem = size_t(BR + 2 * BC) * LD * sizeof(T) + BC;
  static_assert(BR % 16 == 0 && BC % 16 == 0 && NTH >= BC, "forward tile shape");
  static_assert(smem <= 160 * 1024, "forward tile exceeds sm_80 shared memory");
};

template <typename T, int D>
__global__ void __launch_bounds__(FwdShape<T, D>::NTH)
    attention_fwd_kernel(const __grid_constant__ AttentionParams p) {
  using Sh = FwdShape<T, D>;
  constexpr int BR = Sh::BR, BC = Sh::BC, LD = Sh::LD, NTH = Sh::NTH, NTC = BC / 8, NTD = D / 8;
  extern __shared__ __align__(16) unsigned char smem[];
  T* Qs = reinterpret_cast<T*>(smem);
  T* Ks = Qs + BR * LD;
  T* Vs = Ks + BC * LD;
  uint8_t* colok = reinterpret_cast<uint8_t*>(Vs + BC * LD);

  const Problem& pr = p.prob;
  const BlockCoords bc = block_coords(blockIdx.x, pr.Hq, ceil_div(pr.Sq, BR), 1);
  const int64_t b = bc.b, h = bc.h, hk = kv_head(h, pr.Hq, pr.Hkv);
  const int64_t q0 = bc.tile * BR, q1 = imin(q0 + BR, pr.Sq);
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int Dr = static_cast<int>(pr.D);
  const int64_t off = query_offset(pr);

  load_rows<T, BR, D, NTH>(Qs, LD, static_cast<const T*>(p.q.ptr) + offset_bhs(b, h, q0, p.q.sb, p.q.sh, p.q.ss),
                           p.q.ss, q1 - q0, Dr, p.vec_loads);
  const T* kbase = static_cast<const T*>(p.k.ptr) + offset_bhs(b, hk, 0, p.k.sb, p.k.sh, p.k.ss);
  const T* vbase = static_cast<const T*>(p.v.ptr) + offset_bhs(b, hk, 0, p.v.sb, p.v.sh, p.v.ss);

  const int64_t row[2] = {q0 + warp * 16 + acc_coord(lane, 0, 0).row, q0 + warp * 16 + acc_coord(lane, 0, 2).row};
  const float slope = alibi_slope(pr, b, h);
  const uint8_t* bm = block_mask_bh(pr, b, h);
  float m[2] = {kNegInf, kNegInf}, l[2] = {0.f, 0.f};
  float o[NTD][4];
  zero_acc(o);

  const TileRange kr = key_tile_range(pr, q0, q1, BC);
  for (int64_t kt = kr.begin; kt < kr.end; ++kt) {
    const int64_t k0 = kt * BC, k1 = imin(k0 + BC, pr.Sk);
    const TileInfo info = tile_info(pr, bm, q0, q1, k0, k1);
    if (info.skip) continue;  // uniform over the block
    __syncthreads();          // the previous tile's K/V are consumed
    load_rows<T, BC, D, NTH>(Ks, LD, kbase + k0 * p.k.ss, p.k.ss, k1 - k0, Dr, p.vec_loads);
    load_rows<T, BC, D, NTH>(Vs, LD, vbase + k0 * p.v.ss, p.v.ss, k1 - k0, Dr, p.vec_loads);
    int ok = 0;
    if (tid < BC) {
      ok = key_visible(pr, b, k0 + tid);
      colok[tid] = static_cast<uint8_t>(ok);
    }
    if (!__syncthreads_or(ok)) continue;  // every key of the tile is masked out (padding)
    const bool masked = !info.full || pr.key_mask != nullptr || k1 - k0 < BC || q1 - q0 < BR;

    float s[NTC][4];
    zero_acc(s);
    gemm_nt<T, NTC, D>(s, Qs + warp * 16 * LD, LD, Ks, LD);
    float mt[2] = {kNegInf, kNegInf};
#pragma unroll
    for (int nt = 0; nt < NTC; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const Coord cc = acc_coord(lane, nt, e);
        const int r = e >> 1, jl = cc.col;  // r = cc.row / 8: compile-time
        const int64_t j = k0 + jl;
        float tc;
        const float v = score(pr, s[nt][e], slope, row[r] + off, j, &tc) + rel_bias_at(pr, h, row[r], j);
        const bool vis = !masked || elem_visible(pr, row[r], j, colok[jl] != 0, bm);
        s[nt][e] = vis ? v : kNegInf;
        mt[r] = max_nan(mt[r], s[nt][e]);
      }
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const float m_new = max_nan(m[r], quad_max(mt[r]));
      const float alpha = online_rescale(m[r], m_new);
      m[r] = m_new;
      l[r] *= alpha;
#pragma unroll
      for (int nd = 0; nd < NTD; ++nd) {
        o[nd][2 * r] *= alpha;
        o[nd][2 * r + 1] *= alpha;
      }
    }
#pragma unroll
    for (int nt = 0; nt < NTC; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        s[nt][e] = online_prob(s[nt][e], m[e >> 1]);
        l[e >> 1] += s[nt][e];  // (the softmax sum: of the undropped P)
        if (pr.dropout) s[nt][e] *= dropout_factor(pr, b, h, row[e >> 1], k0 + acc_coord(lane, nt, e).col);
      }
    gemm_rn<T, NTD, BC / 16>(o, s, Vs, LD);
  }

  const int64_t bh = b * pr.Hq + h;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const float lsum = quad_sum(l[r]);
    if (row[r] >= pr.Sq) continue;
    const float inv = softmax_inv_sum(lsum);
    T* orow = static_cast<T*>(p.out) + (bh * pr.Sq + row[r]) * pr.D;
#pragma unroll
    for (int nd = 0; nd < NTD; ++nd)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int c = acc_coord(lane, nd, 2 * r + e).col;
        if (c < Dr) orow[c] = from_float<T>(softmax_out(o[nd][2 * r + e], lsum, inv));
      }
    if (acc_coord(lane, 0, 0).col == 0) p.lse[bh * pr.Sq + row[r]] = softmax_lse(m[r], lsum);
  }
}

// ---------------------------------------------------------------------------- backward
// delta = rowsum(dO * O) per row, as the diagonal of dO O^T (for the dQ kernel, whose dP is
// gemm_nt(dO, V)) and of O dO^T (for the dK/dV kernel, whose dP^T is gemm_nt(V, dO)): the same
// products and summation order as dP, so a row with one visible key gets dS exactly 0 (see
// attention_math.cuh). p.delta holds 2 x (B, Hq, Sq) floats: the dQ kernel's, then dK/dV's.
template <typename T, int D>
struct DeltaShape {
  static constexpr int BR = (sizeof(T) == 4 && D > 128) ? 32 : 64, NW = BR / 16, NTH = NW * 32,
                       LD = kPitch<T, D>;
  static constexpr size_t smem = size_t(2 * BR) * LD * sizeof(T);
  static_assert(smem <= 160 * 1024, "delta tile exceeds sm_80 shared memory");
};

template <typename T, int D>
__global__ void __launch_bounds__(DeltaShape<T, D>::NTH)
    attention_delta_kernel(const __grid_constant__ AttentionParams p) {
  using Sh = DeltaShape<T, D>;
  constexpr int BR = Sh::BR, LD = Sh::LD, NTH = Sh::NTH;
  extern __shared__ __align__(16) unsigned char smem[];
  T* dOs = reinterpret_cast<T*>(smem);
  T* Os = dOs + BR * LD;

  const Problem& pr = p.prob;
  const BlockCoords bc = block_coords(blockIdx.x, pr.Hq, ceil_div(pr.Sq, BR), 1);
  const int64_t b = bc.b, h = bc.h, q0 = bc.tile * BR, q1 = imin(q0 + BR, pr.Sq);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int Dr = static_cast<int>(pr.D);
  load_rows<T, BR, D, NTH>(dOs, LD,
                           static_cast<const T*>(p.dout.ptr) + offset_bhs(b, h, q0, p.dout.sb, p.dout.sh, p.dout.ss),
                           p.dout.ss, q1 - q0, Dr, p.vec_loads);
  load_rows<T, BR, D, NTH>(Os, LD, static_cast<const T*>(p.o.ptr) + offset_bhs(b, h, q0, p.o.sb, p.o.sh, p.o.ss),
                           p.o.ss, q1 - q0, Dr, p.vec_loads);
  __syncthreads();
  float eq[2][4], ek[2][4];
  zero_acc(eq);
  zero_acc(ek);
  gemm_nt<T, 2, D>(eq, dOs + warp * 16 * LD, LD, Os + warp * 16 * LD, LD);  // as dP = dO V^T
  gemm_nt<T, 2, D>(ek, Os + warp * 16 * LD, LD, dOs + warp * 16 * LD, LD);  // as dP^T = V dO^T
  const int64_t n = pr.B * pr.Hq * pr.Sq, base = (b * pr.Hq + h) * pr.Sq;
#pragma unroll
  for (int nt = 0; nt < 2; ++nt)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int64_t i = q0 + warp * 16 + acc_coord(lane, nt, e).row;
      if (acc_on_diagonal(lane, nt, e) && i < q1) {
        p.delta[base + i] = eq[nt][e];
        p.delta[n + base + i] = ek[nt][e];
      }
    }
}

template <typename T, int D>
struct DkdvShape {
  static constexpr DkdvConfig cfg = dkdv_config(sizeof(T), D);
  static constexpr int BC = cfg.bc, BR = cfg.br, DS = cfg.ds, NS = D / DS, NW = BC / 16, NTH = NW * 32,
                       LD = kPitch<T, D>;
  static constexpr size_t smem = size_t(2 * BC + 2 * BR) * LD * sizeof(T) + 2 * BR * sizeof(float);
  static_assert(BR % 16 == 0 && BC % 16 == 0 && DS % 8 == 0 && D % DS == 0 && NTH >= BR && NTH >= BC,
                "dK/dV tile shape");
  static_assert(smem <= 160 * 1024, "dK/dV tile exceeds sm_80 shared memory");
};

template <typename T, int D>
__global__ void __launch_bounds__(DkdvShape<T, D>::NTH)
    attention_dkdv_kernel(const __grid_constant__ AttentionParams p) {
  using Sh = DkdvShape<T, D>;
  constexpr int BC = Sh::BC, BR = Sh::BR, DS = Sh::DS, NS = Sh::NS, LD = Sh::LD, NTH = Sh::NTH;
  constexpr int NTR = BR / 8, NTS = DS / 8;
  extern __shared__ __align__(16) unsigned char smem[];
  T* Ks = reinterpret_cast<T*>(smem);
  T* Vs = Ks + BC * LD;
  T* Qs = Vs + BC * LD;
  T* dOs = Qs + BR * LD;
  float* lse_s = reinterpret_cast<float*>(dOs + BR * LD);
  float* dl_s = lse_s + BR;

  const Problem& pr = p.prob;
  const BlockCoords bc = block_coords(blockIdx.x, pr.Hkv, ceil_div(pr.Sk, BC), NS);
  const int64_t b = bc.b, hk = bc.h, group = pr.Hq / pr.Hkv;
  const int64_t k0 = bc.tile * BC, k1 = imin(k0 + BC, pr.Sk);
  const int d0 = static_cast<int>(bc.slice) * DS;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int Dr = static_cast<int>(pr.D);
  const int64_t off = query_offset(pr);

  load_rows<T, BC, D, NTH>(Ks, LD, static_cast<const T*>(p.k.ptr) + offset_bhs(b, hk, k0, p.k.sb, p.k.sh, p.k.ss),
                           p.k.ss, k1 - k0, Dr, p.vec_loads);
  load_rows<T, BC, D, NTH>(Vs, LD, static_cast<const T*>(p.v.ptr) + offset_bhs(b, hk, k0, p.v.sb, p.v.sh, p.v.ss),
                           p.v.ss, k1 - k0, Dr, p.vec_loads);
  const int64_t key[2] = {k0 + warp * 16 + acc_coord(lane, 0, 0).row, k0 + warp * 16 + acc_coord(lane, 0, 2).row};
  const bool kok[2] = {key_visible(pr, b, key[0]), key_visible(pr, b, key[1])};

  float dk[NTS][4], dv[NTS][4];
  zero_acc(dk);
  zero_acc(dv);
  const int any_key = tid < BC ? key_visible(pr, b, k0 + tid) : 0;
  if (__syncthreads_or(any_key)) {  // else every key of the tile is masked: zero gradients
    for (int64_t gi = 0; gi < group; ++gi) {
      const int64_t h = hk * group + gi;
      const float slope = alibi_slope(pr, b, h);
      const uint8_t* bm = block_mask_bh(pr, b, h);
      const T* qbase = static_cast<const T*>(p.q.ptr) + offset_bhs(b, h, 0, p.q.sb, p.q.sh, p.q.ss);
      const T* dobase = static_cast<const T*>(p.dout.ptr) + offset_bhs(b, h, 0, p.dout.sb, p.dout.sh, p.dout.ss);
      const TileRange qr = query_tile_range(pr, k0, k1, BR);
      for (int64_t qt = qr.begin; qt < qr.end; ++qt) {
        const int64_t q0 = qt * BR, q1 = imin(q0 + BR, pr.Sq);
        const TileInfo info = tile_info(pr, bm, q0, q1, k0, k1);
        if (info.skip) continue;
        __syncthreads();  // the previous Q/dO tile is consumed
        load_rows<T, BR, D, NTH>(Qs, LD, qbase + q0 * p.q.ss, p.q.ss, q1 - q0, Dr, p.vec_loads);
        load_rows<T, BR, D, NTH>(dOs, LD, dobase + q0 * p.dout.ss, p.dout.ss, q1 - q0, Dr, p.vec_loads);
        if (tid < BR) {
          const int64_t i = q0 + tid;
          lse_s[tid] = i < q1 ? p.lse_in[offset_bhs(b, h, i, p.lse_sb, p.lse_sh, p.lse_ss)] : kNegInf;
          dl_s[tid] = i < q1 ? p.delta[pr.B * pr.Hq * pr.Sq + (b * pr.Hq + h) * pr.Sq + i] : 0.f;
        }
        __syncthreads();
        const bool masked = !info.full || pr.key_mask != nullptr || k1 - k0 < BC || q1 - q0 < BR;

        // transposed tiles: rows = this warp's 16 keys, columns = the BR queries
        float pt[NTR][4], dpt[NTR][4];
        zero_acc(pt);
        zero_acc(dpt);
        gemm_nt<T, NTR, D>(dpt, Vs + warp * 16 * LD, LD, dOs, LD);  // dP^T = V dO^T
        gemm_nt<T, NTR, D>(pt, Ks + warp * 16 * LD, LD, Qs, LD);    // S^T = K Q^T (raw dots)
#pragma unroll
        for (int nt = 0; nt < NTR; ++nt)
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const Coord cc = acc_coord(lane, nt, e);
            const int r = e >> 1, il = cc.col;  // r = cc.row / 8: compile-time
            const int64_t i = q0 + il;
            float tc;
            const float sc = score(pr, pt[nt][e], slope, i + off, key[r], &tc) + rel_bias_at(pr, h, i, key[r]);
            const bool vis = !masked || elem_visible(pr, i, key[r], kok[r], bm);
            const float pv = backward_prob(sc, lse_s[il], vis);
            const float z = dropout_factor(pr, b, h, i, key[r]);  // 1 without dropout
            pt[nt][e] = pv * z;                                   // dV += P_dropped^T dO
            dpt[nt][e] = backward_dscore(pr, pv, dpt[nt][e] * z, dl_s[il], tc);
          }
        gemm_rn<T, NTS, BR / 16>(dv, pt, dOs + d0, LD);  // dV += P^T dO
        gemm_rn<T, NTS, BR / 16>(dk, dpt, Qs + d0, LD);  // dK += dS^T Q
      }
    }
  }

  const int64_t bh = b * pr.Hkv + hk;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    if (key[r] >= pr.Sk) continue;
    T* dkrow = static_cast<T*>(p.dk) + (bh * pr.Sk + key[r]) * pr.D;
    T* dvrow = static_cast<T*>(p.dv) + (bh * pr.Sk + key[r]) * pr.D;
#pragma unroll
    for (int nd = 0; nd < NTS; ++nd)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int c = d0 + acc_coord(lane, nd, 2 * r + e).col;
        if (c < Dr) {
          dkrow[c] = from_float<T>(pr.scale * dk[nd][2 * r + e]);
          dvrow[c] = from_float<T>(dv[nd][2 * r + e]);
        }
      }
  }
}

template <typename T, int D>
struct DqShape {
  static constexpr DqConfig cfg = dq_config(sizeof(T), D);
  static constexpr int BR = cfg.br, BC = cfg.bc, DS = cfg.ds, NS = D / DS, NW = BR / 16, NTH = NW * 32,
                       LD = kPitch<T, D>;
  static constexpr size_t smem = size_t(2 * BR + 2 * BC) * LD * sizeof(T) + BC;
  static_assert(BR % 16 == 0 && BC % 16 == 0 && DS % 8 == 0 && D % DS == 0 && NTH >= BC, "dQ tile shape");
  static_assert(smem <= 160 * 1024, "dQ tile exceeds sm_80 shared memory");
};

template <typename T, int D>
__global__ void __launch_bounds__(DqShape<T, D>::NTH)
    attention_dq_kernel(const __grid_constant__ AttentionParams p) {
  using Sh = DqShape<T, D>;
  constexpr int BR = Sh::BR, BC = Sh::BC, DS = Sh::DS, NS = Sh::NS, LD = Sh::LD, NTH = Sh::NTH;
  constexpr int NTC = BC / 8, NTS = DS / 8;
  extern __shared__ __align__(16) unsigned char smem[];
  T* Qs = reinterpret_cast<T*>(smem);
  T* dOs = Qs + BR * LD;
  T* Ks = dOs + BR * LD;
  T* Vs = Ks + BC * LD;
  uint8_t* colok = reinterpret_cast<uint8_t*>(Vs + BC * LD);

  const Problem& pr = p.prob;
  const BlockCoords bc = block_coords(blockIdx.x, pr.Hq, ceil_div(pr.Sq, BR), NS);
  const int64_t b = bc.b, h = bc.h, hk = kv_head(h, pr.Hq, pr.Hkv);
  const int64_t q0 = bc.tile * BR, q1 = imin(q0 + BR, pr.Sq);
  const int d0 = static_cast<int>(bc.slice) * DS;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int Dr = static_cast<int>(pr.D);
  const int64_t off = query_offset(pr);

  load_rows<T, BR, D, NTH>(Qs, LD, static_cast<const T*>(p.q.ptr) + offset_bhs(b, h, q0, p.q.sb, p.q.sh, p.q.ss),
                           p.q.ss, q1 - q0, Dr, p.vec_loads);
  load_rows<T, BR, D, NTH>(dOs, LD,
                           static_cast<const T*>(p.dout.ptr) + offset_bhs(b, h, q0, p.dout.sb, p.dout.sh, p.dout.ss),
                           p.dout.ss, q1 - q0, Dr, p.vec_loads);
  const T* kbase = static_cast<const T*>(p.k.ptr) + offset_bhs(b, hk, 0, p.k.sb, p.k.sh, p.k.ss);
  const T* vbase = static_cast<const T*>(p.v.ptr) + offset_bhs(b, hk, 0, p.v.sb, p.v.sh, p.v.ss);

  const int64_t row[2] = {q0 + warp * 16 + acc_coord(lane, 0, 0).row, q0 + warp * 16 + acc_coord(lane, 0, 2).row};
  float lse_r[2], dl_r[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const bool in = row[r] < pr.Sq;
    lse_r[r] = in ? p.lse_in[offset_bhs(b, h, row[r], p.lse_sb, p.lse_sh, p.lse_ss)] : kNegInf;
    dl_r[r] = in ? p.delta[(b * pr.Hq + h) * pr.Sq + row[r]] : 0.f;
  }
  const float slope = alibi_slope(pr, b, h);
  const uint8_t* bm = block_mask_bh(pr, b, h);
  float dq[NTS][4];
  zero_acc(dq);

  const TileRange kr = key_tile_range(pr, q0, q1, BC);
  for (int64_t kt = kr.begin; kt < kr.end; ++kt) {
    const int64_t k0 = kt * BC, k1 = imin(k0 + BC, pr.Sk);
    const TileInfo info = tile_info(pr, bm, q0, q1, k0, k1);
    if (info.skip) continue;
    __syncthreads();
    load_rows<T, BC, D, NTH>(Ks, LD, kbase + k0 * p.k.ss, p.k.ss, k1 - k0, Dr, p.vec_loads);
    load_rows<T, BC, D, NTH>(Vs, LD, vbase + k0 * p.v.ss, p.v.ss, k1 - k0, Dr, p.vec_loads);
    int ok = 0;
    if (tid < BC) {
      ok = key_visible(pr, b, k0 + tid);
      colok[tid] = static_cast<uint8_t>(ok);
    }
    if (!__syncthreads_or(ok)) continue;
    const bool masked = !info.full || pr.key_mask != nullptr || k1 - k0 < BC || q1 - q0 < BR;

    float s[NTC][4], dp[NTC][4];
    zero_acc(s);
    zero_acc(dp);
    gemm_nt<T, NTC, D>(dp, dOs + warp * 16 * LD, LD, Vs, LD);  // dP = dO V^T
    gemm_nt<T, NTC, D>(s, Qs + warp * 16 * LD, LD, Ks, LD);    // raw dots Q K^T
#pragma unroll
    for (int nt = 0; nt < NTC; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const Coord cc = acc_coord(lane, nt, e);
        const int r = e >> 1, jl = cc.col;  // r = cc.row / 8: compile-time
        const int64_t j = k0 + jl;
        float tc;
        const float sc = score(pr, s[nt][e], slope, row[r] + off, j, &tc) + rel_bias_at(pr, h, row[r], j);
        const bool vis = !masked || elem_visible(pr, row[r], j, colok[jl] != 0, bm);
        const float pv = backward_prob(sc, lse_r[r], vis);
        dp[nt][e] = backward_dscore(pr, pv, dp[nt][e] * dropout_factor(pr, b, h, row[r], j), dl_r[r], tc);
      }
    gemm_rn<T, NTS, BC / 16>(dq, dp, Ks + d0, LD);  // dQ += dS K
  }

  const int64_t bh = b * pr.Hq + h;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    if (row[r] >= pr.Sq) continue;
    T* dqrow = static_cast<T*>(p.dq) + (bh * pr.Sq + row[r]) * pr.D;
#pragma unroll
    for (int nd = 0; nd < NTS; ++nd)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int c = d0 + acc_coord(lane, nd, 2 * r + e).col;
        if (c < Dr) dqrow[c] = from_float<T>(pr.scale * dq[nd][2 * r + e]);
      }
  }
}

// ---------------------------------------------------------------------------- d rel_bias
// drel[h, t] = sum over b and i of dS[b, h, i, j = i + t - (Sq - 1)] (the gradient of the
// post-softcap score, before the softcap derivative): one thread per (h, t), every term
// recomputed from q, k, v, dO, lse and delta in a fixed order (deterministic, no atomics).
// O(B Sq D) work per thread, without tensor cores: correct first (TODO: fold into the dQ
// kernel's tiles).
template <typename T>
__global__ void __launch_bounds__(256) attention_drel_kernel(const __grid_constant__ AttentionParams p) {
  const Problem& pr = p.prob;
  const int64_t L = pr.Sq + pr.Sk - 1;
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= pr.Hq * L) return;
  const int64_t h = idx / L, t = idx % L, hk = kv_head(h, pr.Hq, pr.Hkv), off = query_offset(pr);
  const int64_t i_lo = imax(0, pr.Sq - 1 - t), i_hi = imin(pr.Sq, pr.Sq - 1 - t + pr.Sk);
  float acc = 0.f;
  for (int64_t b = 0; b < pr.B; ++b) {
    const float slope = alibi_slope(pr, b, h);
    const uint8_t* bm = block_mask_bh(pr, b, h);
    for (int64_t i = i_lo; i < i_hi; ++i) {
      const int64_t j = i + t - (pr.Sq - 1);
      if (!elem_visible(pr, i, j, key_visible(pr, b, j), bm)) continue;
      const float lse = p.lse_in[offset_bhs(b, h, i, p.lse_sb, p.lse_sh, p.lse_ss)];
      const T* qr = static_cast<const T*>(p.q.ptr) + offset_bhs(b, h, i, p.q.sb, p.q.sh, p.q.ss);
      const T* kr = static_cast<const T*>(p.k.ptr) + offset_bhs(b, hk, j, p.k.sb, p.k.sh, p.k.ss);
      const T* vr = static_cast<const T*>(p.v.ptr) + offset_bhs(b, hk, j, p.v.sb, p.v.sh, p.v.ss);
      const T* dor = static_cast<const T*>(p.dout.ptr) + offset_bhs(b, h, i, p.dout.sb, p.dout.sh, p.dout.ss);
      float raw = 0.f, dp = 0.f;
      for (int64_t d = 0; d < pr.D; ++d) {
        raw = fmaf(to_float(qr[d]), to_float(kr[d]), raw);
        dp = fmaf(to_float(dor[d]), to_float(vr[d]), dp);
      }
      float tc;
      const float sc = score(pr, raw, slope, i + off, j, &tc) + rel_bias_at(pr, h, i, j);
      const float pv = backward_prob(sc, lse, true);
      acc += pv * (dp * dropout_factor(pr, b, h, i, j) - p.delta[(b * pr.Hq + h) * pr.Sq + i]);
    }
  }
  p.drel[idx] = acc;
}

// ---------------------------------------------------------------------------- launchers
template <typename Kernel>
cudaError_t launch(Kernel kernel, int64_t blocks, int threads, size_t smem, const AttentionParams& p,
                   cudaStream_t stream) {
  if (blocks == 0) return cudaSuccess;
  if (blocks > INT_MAX) return cudaErrorInvalidConfiguration;
  // the tiles are sized for sm_80 / sm_90 (up to 160 KiB); sm_86 / sm_89 allow 99 KiB per block
  int device = 0, optin = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  if (err != cudaSuccess) return err;
  if (smem > static_cast<size_t>(optin)) return cudaErrorLaunchOutOfResources;  // (check_launch says why)
  err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
  if (err != cudaSuccess) return err;
  kernel<<<static_cast<unsigned>(blocks), threads, smem, stream>>>(p);
  return cudaGetLastError();
}

template <typename T, int D>
cudaError_t launch_fwd(const AttentionParams& p, cudaStream_t stream) {
  using Sh = FwdShape<T, D>;
  const Problem& pr = p.prob;
  return launch(attention_fwd_kernel<T, D>, pr.B * pr.Hq * ceil_div(pr.Sq, Sh::BR), Sh::NTH, Sh::smem, p, stream);
}

template <typename T, int D>
cudaError_t launch_bwd(const AttentionParams& p, cudaStream_t stream) {
  using E = DeltaShape<T, D>;
  using A = DkdvShape<T, D>;
  using Q = DqShape<T, D>;
  const Problem& pr = p.prob;
  cudaError_t err = launch(attention_delta_kernel<T, D>, pr.B * pr.Hq * ceil_div(pr.Sq, E::BR), E::NTH, E::smem, p,
                           stream);
  if (err != cudaSuccess) return err;
  err = launch(attention_dkdv_kernel<T, D>, pr.B * pr.Hkv * ceil_div(pr.Sk, A::BC) * A::NS, A::NTH,
                           A::smem, p, stream);
  if (err != cudaSuccess) return err;
  err = launch(attention_dq_kernel<T, D>, pr.B * pr.Hq * ceil_div(pr.Sq, Q::BR) * Q::NS, Q::NTH, Q::smem, p, stream);
  if (err != cudaSuccess || p.drel == nullptr) return err;
  return launch(attention_drel_kernel<T>, ceil_div(pr.Hq * (pr.Sq + pr.Sk - 1), 256), 256, 0, p, stream);
}

}  // namespace attn_kernels

namespace detail {
template <int D>
cudaError_t attention_fwd_bucket(const AttentionParams& p, cudaStream_t stream) {
  return dispatch_dtype(p.dtype, [&]<typename T>() { return attn_kernels::launch_fwd<T, D>(p, stream); });
}
template <int D>
cudaError_t attention_bwd_bucket(const AttentionParams& p, cudaStream_t stream) {
  return dispatch_dtype(p.dtype, [&]<typename T>() { return attn_kernels::launch_bwd<T, D>(p, stream); });
}
}  // namespace detail

}  // namespace truthgpt::cuda
