// CPU attention, part 4: the options that run as their own passes beside the row kernels,
// so the paths without them are untouched: the relative-position bias by distance (rel_bias)
// and Philox dropout (csrc/common/philox.h). Included by attention.cpp only.
//  - rel_bias: added to a piece's raw scores before the row kernels (in log2 units; with
//    softcap the cap is applied here first, its derivative kept, and the row kernels run
//    without softcap). Its gradient is dS (before the softcap derivative) summed along each
//    diagonal, into buffers owned by work items, reduced in a fixed order afterwards.
//  - dropout: a piece's keep bytes from Philox (4 words per call, a row's elements being
//    consecutive counters); the forward zeroes the dropped probabilities before P V and folds
//    1 / (1 - p) into the final normalisation; the backward zeroes them in the P of dV and in
//    dP, with 1 / (1 - p) as the GEMMs' alpha.
#pragma once
#include "common/philox.h"
#include "cpu/attention_schedule.h"

namespace truthgpt {
namespace {  // internal to the CPU attention kernel (one translation unit: attention.cpp)

template <typename Acc>
struct Extras {
  std::vector<Acc> bias2;  // rel_bias * log2(e), (Hq, L); empty without rel_bias
  int64_t L = 0;           // Sq + Sk - 1 (0: no rel_bias)
  bool dropout = false;
  bool simd = false;  // Philox through the AVX2 clone
  uint64_t seed = 0;
  uint32_t thr = 0;
  Acc inv_keep = 1;  // 1 / (1 - p)
  bool rel() const { return L > 0; }
  // the row kernels' configuration: without softcap when the cap is applied with the bias
  Cfg<Acc> rows_cfg(Cfg<Acc> cf) const {
    if (rel()) cf.softcap = false;
    return cf;
  }
};

// The rel_bias / dropout arguments of attention_fwd and _bwd, checked.
struct ExtraArgs {
  at::Tensor rel;  // (Hq, Sq + Sk - 1) contiguous, or undefined
  double p = 0;
  int64_t seed = 0;
};

ExtraArgs extra_args(const Problem& P, at::ScalarType qtype, const c10::optional<at::Tensor>& rel_bias,
                     double dropout_p, const c10::optional<at::Tensor>& dropout_seed) {
  ExtraArgs a;
  if (rel_bias.has_value()) {
    const at::ScalarType want = qtype == at::kDouble ? at::kDouble : at::kFloat;
    TORCH_CHECK(rel_bias->scalar_type() == want, "attention (cpu): rel_bias must be ", want, " for ", qtype,
                " inputs, got ", rel_bias->scalar_type());
    TORCH_CHECK(rel_bias->dim() == 2 && rel_bias->size(0) == P.Hq && rel_bias->size(1) == P.Sq + P.Sk - 1,
                "attention (cpu): rel_bias must have shape (Hq, Sq + Sk - 1) = (", P.Hq, ", ", P.Sq + P.Sk - 1,
                "), got ", rel_bias->sizes());
    a.rel = rel_bias->contiguous();
  }
  TORCH_CHECK(dropout_p >= 0.0 && dropout_p < 1.0, "attention (cpu): dropout_p must be in [0, 1), got ", dropout_p);
  if (dropout_p > 0) {
    TORCH_CHECK(dropout_seed.has_value() && dropout_seed->numel() == 1 && dropout_seed->scalar_type() == at::kLong,
                "attention (cpu): dropout_seed must be a one-element int64 tensor when dropout_p > 0");
    a.seed = dropout_seed->item<int64_t>();
    a.p = dropout_p;
  }
  return a;
}

template <typename Acc>
Extras<Acc> make_extras(const Problem& P, const ExtraArgs& a, const Isa& isa) {
  Extras<Acc> ex;
  if (a.rel.defined()) {
    ex.L = P.Sq + P.Sk - 1;
    const Acc* r = a.rel.const_data_ptr<Acc>();
    ex.bias2.resize(P.Hq * ex.L);
    for (int64_t x = 0; x < P.Hq * ex.L; ++x) ex.bias2[x] = static_cast<Acc>(r[x] * kLog2e);
  }
  if (a.p > 0) {
    ex.dropout = true;
    ex.seed = static_cast<uint64_t>(a.seed);
    ex.thr = philox::threshold(a.p);
    ex.inv_keep = static_cast<Acc>(1.0 / (1.0 - a.p));
  }
  ex.simd = isa.rows != RowsImpl::Portable;
  return ex;
}

// Scores of rows x n keys from j0 (raw, from the QK^T GEMM) += rel_bias in log2 units; with
// softcap: s = cap tanh(s / cap) [log2 units] + bias, and G = 1 - tanh^2 (when non-null).
template <typename Acc>
void add_rel_bias(const Problem& P, const Tile& t, const Extras<Acc>& ex, const Cfg<Acc>& cf, int64_t j0,
                  int64_t n, Acc* S, int64_t ldS, Acc* G) {
  const int64_t nr = t.nr();
  for (int64_t r = 0; r < t.rows(); ++r) {
    const int64_t h = t.h0 + r / nr, i = t.i0 + r % nr;
    const Acc* __restrict__ bz = ex.bias2.data() + h * ex.L + (j0 - i + P.Sq - 1);
    Acc* __restrict__ s = S + r * ldS;
    if (cf.softcap) {
      Acc* g = G ? G + r * ldS : nullptr;
      for (int64_t c = 0; c < n; ++c) {
        const Acc th = std::tanh(s[c] * cf.inv_cap);
        if (g) g[c] = Acc(1) - th * th;
        s[c] = th * cf.capmul + bz[c];
      }
    } else {
      for (int64_t c = 0; c < n; ++c) s[c] += bz[c];
    }
  }
}

// d rel_bias rows (row of head h at drel + (h - t.h0) * ld) += dS = P (dP - delta) along the
// diagonals of the piece: row i, keys j0.. is the contiguous run from j0 - i + Sq - 1.
template <typename Acc>
void acc_rel_bias_grad(const Problem& P, const Tile& t, const RowInfo<Acc>* ri, int64_t j0, int64_t n,
                       const Acc* S, const Acc* dP, int64_t ldS, Acc* drel, int64_t ld) {
  const int64_t nr = t.nr();
  for (int64_t r = 0; r < t.rows(); ++r) {
    const int64_t h = t.h0 + r / nr, i = t.i0 + r % nr;
    Acc* __restrict__ d = drel + (h - t.h0) * ld + (j0 - i + P.Sq - 1);
    const Acc* __restrict__ p = S + r * ldS;
    const Acc* __restrict__ dp = dP + r * ldS;
    const Acc delta = ri[r].delta;
    for (int64_t c = 0; c < n; ++c) d[c] += p[c] * (dp[c] - delta);
  }
}

// Philox words of counters ctr0 .. ctr0 + nblk - 1 (4 per counter, in order) into out:
// philox::block on 16 counters at a time, laid out so the compiler vectorises the rounds.
__attribute__((always_inline)) inline void philox_words_body(uint64_t ctr0, int64_t nblk, uint64_t seed,
                                                             uint32_t* out) {
  constexpr int kW = 16;
  for (int64_t b0 = 0; b0 < nblk; b0 += kW) {
    uint32_t c0[kW], c1[kW], c2[kW], c3[kW];
    for (int x = 0; x < kW; ++x) {
      const uint64_t ctr = ctr0 + static_cast<uint64_t>(b0 + x);
      c0[x] = static_cast<uint32_t>(ctr);
      c1[x] = static_cast<uint32_t>(ctr >> 32);
      c2[x] = 0;
      c3[x] = 0;
    }
    uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
    for (int rd = 0; rd < 10; ++rd) {
      for (int x = 0; x < kW; ++x) {
        const uint64_t pa = static_cast<uint64_t>(philox::kMulA) * c0[x];
        const uint64_t pb = static_cast<uint64_t>(philox::kMulB) * c2[x];
        const uint32_t n0 = static_cast<uint32_t>(pb >> 32) ^ c1[x] ^ k0;
        const uint32_t n2 = static_cast<uint32_t>(pa >> 32) ^ c3[x] ^ k1;
        c1[x] = static_cast<uint32_t>(pb);
        c3[x] = static_cast<uint32_t>(pa);
        c0[x] = n0;
        c2[x] = n2;
      }
      k0 += philox::kWeylA;
      k1 += philox::kWeylB;
    }
    const int m = static_cast<int>(std::min<int64_t>(kW, nblk - b0));
    for (int x = 0; x < m; ++x) {
      uint32_t* o = out + 4 * (b0 + x);
      o[0] = c0[x];
      o[1] = c1[x];
      o[2] = c2[x];
      o[3] = c3[x];
    }
  }
}

void philox_words_plain(uint64_t ctr0, int64_t nblk, uint64_t seed, uint32_t* out) {
  philox_words_body(ctr0, nblk, seed, out);
}

#if TK_X86
TK_AVX2 void philox_words_avx2(uint64_t ctr0, int64_t nblk, uint64_t seed, uint32_t* out) {
  philox_words_body(ctr0, nblk, seed, out);
}
#endif

// Keep bytes of a piece: keep[r * ld + c] = 1 iff element (b, h, i, j0 + c) is kept, e =
// ((b Hq + h) Sq + i) Sk + j taking word e & 3 of Philox(e >> 2, seed).
template <typename Acc>
void dropout_keep(const Problem& P, const Tile& t, const Extras<Acc>& ex, int64_t j0, int64_t n,
                  std::vector<uint32_t>& words, uint8_t* keep, int64_t ld) {
  const int64_t nr = t.nr();
  words.resize(4 * (n / 4 + 2));
  for (int64_t r = 0; r < t.rows(); ++r) {
    const int64_t h = t.h0 + r / nr, i = t.i0 + r % nr;
    const uint64_t e0 = static_cast<uint64_t>(((t.b * P.Hq + h) * P.Sq + i) * P.Sk + j0);
    const uint64_t c0 = e0 >> 2;
    const int64_t nblk = static_cast<int64_t>(((e0 + n - 1) >> 2) - c0 + 1);
#if TK_X86
    if (ex.simd) {
      philox_words_avx2(c0, nblk, ex.seed, words.data());
    } else
#endif
      philox_words_plain(c0, nblk, ex.seed, words.data());
    const uint32_t* __restrict__ w = words.data() + (e0 & 3);
    uint8_t* __restrict__ k = keep + r * ld;
    const uint32_t thr = ex.thr;
    for (int64_t c = 0; c < n; ++c) k[c] = w[c] >= thr;
  }
}

template <size_t N>
struct UintOf;
template <>
struct UintOf<2> {
  using type = uint16_t;
};
template <>
struct UintOf<4> {
  using type = uint32_t;
};
template <>
struct UintOf<8> {
  using type = uint64_t;
};

// dst row = src row with the dropped entries zeroed (in place allowed), rows x n (ld ldx),
// plus a zero pad after an odd n (the bf16 GEMMs read pairs).
template <typename X>
void drop_rows(const X* src, X* dst, int64_t rows, int64_t n, int64_t ldx, const uint8_t* keep, int64_t ldk) {
  using U = typename UintOf<sizeof(X)>::type;
  for (int64_t r = 0; r < rows; ++r) {
    const U* s = reinterpret_cast<const U*>(src + r * ldx);
    U* d = reinterpret_cast<U*>(dst + r * ldx);
    const uint8_t* k = keep + r * ldk;
    for (int64_t c = 0; c < n; ++c) d[c] = s[c] & static_cast<U>(U(0) - static_cast<U>(k[c]));
    if (n & 1) d[n] = 0;
  }
}

}  // namespace
}  // namespace truthgpt
