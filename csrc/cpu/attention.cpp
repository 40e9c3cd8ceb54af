// Flash attention on the CPU: truthgpt::attention_fwd / attention_bwd (schemas and input
// conventions: csrc/registration.cpp; semantics: truthgpt_kernels/ops/reference.py).
//
// Algorithm (FlashAttention-2 on tiles):
//  - A work item is a query tile: (batch, kv head, group of query heads sharing that kv head,
//    block of query rows). Small Sq (decoding) packs several query heads of one kv head into
//    one tile, so K/V are read once for them (GQA without repeating K/V).
//  - For each tile the visible keys are computed from the window (causal is folded into the
//    window), the block mask (any block size) and the key mask, as runs of keys cut into
//    pieces of at most BK keys; everything else is skipped, so cost scales with density.
//    Pieces whose keys are visible to every row of the tile need no masking at all.
//  - Per piece: S = Q K^T (tile GEMM), scores transformed (softcap, ALiBi computed from the
//    slope, masks), online softmax in log2 units, acc += P V (tile GEMM). No S x S matrix
//    exists. A row's first piece finds its max exactly; later pieces run one fused pass
//    (transform, exp2 against the running max, sum, row max) and rescale only when the max
//    grew by more than 2^8 ("lazy rescaling"); pieces go nearest keys first.
//  - Few work items (decoding, one long head): the forward also splits the keys and merges
//    the partial softmaxes in a fixed order (flash-decoding); the split depends on the
//    problem only, never on the thread count.
//  - Backward recomputes P from the saved lse by tile: dV^T += dO^T P, dP = dO V^T,
//    dS = P (dP - delta) [x softcap derivative], dQ += scale dS K, dK^T += scale Q^T dS (dK and
//    dV accumulate transposed, so P and dS are read as they lie), with delta = rowsum(dO O),
//    except for rows with exactly one visible key: delta = dP at that key, so their dS is
//    exactly 0 (single_visible_key).
//  - NaN/Inf in q, k, v propagate to the rows they reach (NaN-propagating row max); a row
//    with no visible key still gives zeros.
//    Deterministic: a work item owns its outputs (one (batch, kv head) owns dK, dV and the dQ
//    of its query heads), or, with too few such items for the threads, dK/dV are computed per
//    (batch, kv head, key block) and dQ per query tile in a second pass. Sums run in a fixed
//    order; no atomics on data.
//  - rel_bias (bias by distance) and dropout run as their own passes beside the row kernels
//    (attention_extras.h), so the paths without them are unchanged: the bias is added to a
//    piece's raw scores (log2 units; with softcap the cap is applied there first), dropout
//    zeroes dropped probabilities (Philox keep bytes) before P V and, in the backward, in the
//    P of dV and in dP, with 1 / (1 - p) folded into the normalisation / GEMM alphas. The bias
//    gradient (dS summed along diagonals) goes to per-work-item buffers summed in a fixed order.
//  - Tile GEMMs: MKL (sgemm / dgemm / gemm_bf16bf16f32, AMX on Sapphire Rapids) resolved at
//    runtime from the libtorch_cpu already loaded (it exports MKL's symbols), else our
//    AVX-512 micro-kernels (AVX512-BF16 dot products for bf16 where the CPU has them), else a
//    portable path. Score transforms and softmax: AVX-512 (own exp2 polynomial), else
//    portable. All chosen at runtime (__builtin_cpu_supports); the default build has no
//    -mavx512f. Workers run with FTZ/DAZ (subnormal probabilities are flushed). The AVX-512
//    GEMMs read K / V packed once per work item (KeyPack) and skip the blocks a piece's causal
//    bound masks (Tri), both in attention_gemm.h.
//  - float16: the float32 kernel on operands widened once at entry (O((Sq + Sk) D) copies,
//    against O(Sq Sk D) work), outputs rounded back; so every float32 path serves it.
//  - Threads: at::parallel_for over the thread count; each thread takes work items (heaviest
//    first) from a shared counter. Accumulation is fp32 (fp64 for fp64 inputs).
//  - Knobs for tests and tuning (environment): TRUTHGPT_CPU_ATTN=mkl|avx512|avx2|portable|
//    noavx512|noavx2 (GEMM and row path; noavx512 / noavx2 simulate a CPU without them; see
//    choose_isa), TRUTHGPT_ATTN_BWD=single|split, TRUTHGPT_ATTN_BQ / _BK (tile sizes),
//    TRUTHGPT_ATTN_SPLITK (forward key splits).
//
// Parts: attention_common.h (shared declarations), attention_gemm.h, attention_rows.h,
// attention_schedule.h, attention_extras.h; this file holds the forward and backward drivers.
#include "cpu/attention_extras.h"
#include "cpu/tensor_utils.h"

namespace truthgpt {
namespace {

// ============================================================================ forward
template <typename T>
struct FwdState {
  using Acc = acc_t<T>;
  std::vector<Acc> S, acc, m, l;
  std::vector<T> P, qbuf;
  std::vector<RowInfo<Acc>> ri;
  std::vector<Piece> pieces;
  std::vector<uint8_t> cmbuf, any_buf, all_buf;
  std::vector<uint8_t> keep;     // dropout: keep bytes of a piece
  std::vector<uint32_t> words;   // dropout: Philox words of a row
  KeyPack<T> keys;               // K^T and V of the keys of the last tiles (AVX-512 GEMMs)
};

// Packs the keys [lo, hi) of a tile's pieces (of its (batch, kv head)) into kp unless kp holds
// them already; not with a block or key mask (their pieces may be a small part of the span).
template <typename T>
void ensure_keys(KeyPack<T>& kp, const Problem& P, GemmImpl impl, int want, const Tile& t,
                 const std::vector<Piece>& pieces, const T* kbase, int64_t ksS, const T* vbase, int64_t vsS) {
  if (pieces.empty() || P.bm || P.km || !packs_keys<T>(impl, P.D)) return;
  int64_t lo = pieces.front().j0, hi = pieces.front().j1;
  for (const Piece& pc : pieces) lo = std::min(lo, pc.j0), hi = std::max(hi, pc.j1);
  if (kp.covers(t.b, t.kvh, lo, hi, want)) return;
  pack_keys<T>(kp, impl, want, t.b, t.kvh, lo, hi, P.D, kbase + lo * ksS, ksS, vbase + lo * vsS, vsS);
}

// The saved log-sum-exp: float32, float64 for float64 inputs (a float32 lse would leave the
// backward's recomputed P of a float64 call off by a float32 rounding).
template <typename T>
using lse_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

template <typename T>
void attention_fwd_impl(const Problem& P, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                        at::Tensor& out, at::Tensor& lse, const Isa& isa, const Extras<acc_t<T>>& ex) {
  using Acc = acc_t<T>;
  const Gemm<T> gemm{isa.gemm};
  const Rows<Acc, T> rows{isa.rows};
  const Cfg<Acc> cf0 = make_cfg<Acc>(P);
  const Cfg<Acc> cf = ex.rows_cfg(cf0);
  const Acc qk_alpha = static_cast<Acc>(P.scale * (cf0.softcap ? 1.0 : kLog2e));
  const T* qp = q.const_data_ptr<T>();
  const T* kp = k.const_data_ptr<T>();
  const T* vp = v.const_data_ptr<T>();
  T* op = out.data_ptr<T>();
  const int64_t osB = out.stride(0), osH = out.stride(1), osS = out.stride(2);
  lse_t<T>* lp = lse.data_ptr<lse_t<T>>();
  const int64_t qsB = q.stride(0), qsH = q.stride(1), qsS = q.stride(2);
  const int64_t ksB = k.stride(0), ksH = k.stride(1), ksS = k.stride(2);
  const int64_t vsB = v.stride(0), vsH = v.stride(1), vsS = v.stride(2);
  const int64_t D = P.D, BK = P.BK;
  const int64_t ldS = BK + 16;
  const std::vector<int64_t> order = tile_order(P);
  const int64_t ntile = static_cast<int64_t>(P.qtiles.size());

  auto tile_of = [&](int64_t item) {
    const int64_t tt = order[item % ntile];
    int64_t rest = item / ntile;
    const int64_t grp = rest % P.ngroups;
    rest /= P.ngroups;
    return P.tile(rest / P.Hkv, rest % P.Hkv, grp, tt);
  };
  // Online softmax of tile t over keys [L0, L1): leaves acc (unnormalised), m, l in st.
  auto compute = [&](const Tile& t, int64_t L0, int64_t L1, FwdState<T>& st) {
    const int64_t R = t.rows();
    st.S.resize(R * ldS);
    st.P.resize(R * ldS);
    st.acc.assign(R * D, Acc(0));
    st.m.assign(R, -std::numeric_limits<Acc>::infinity());
    st.l.assign(R, Acc(0));
    fill_rows<Acc>(P, t, st.ri);
    int64_t lda = 0;
    const T* A = tile_rows<T>(qp, qsB, qsH, qsS, t, D, st.qbuf, lda);
    tile_pieces(P, t, L0, L1, st.pieces, st.any_buf, st.all_buf);
    const T* kbase = kp + t.b * ksB + t.kvh * ksH;
    const T* vbase = vp + t.b * vsB + t.kvh * vsH;
    RowsArgs<Acc, T> ra;
    ra.rows = R;
    ra.ri = st.ri.data();
    ra.cf = &cf;
    ra.S = st.S.data();
    ra.ldS = ldS;
    ra.m = st.m.data();
    ra.l = st.l.data();
    ra.acc = st.acc.data();
    ra.ldacc = D;
    ra.D = D;
    ra.P = st.P.data();
    ra.ldP = ldS;
    if (ex.dropout) st.keep.resize(R * ldS);
    ensure_keys<T>(st.keys, P, isa.gemm, kPackKT | kPackVR, t, st.pieces, kbase, ksS, vbase, vsS);
    // nearest keys first: with causal ALiBi the row max then comes with the first piece
    for (auto it = st.pieces.rbegin(); it != st.pieces.rend(); ++it) {
      const Piece& pc = *it;
      const int64_t n = pc.j1 - pc.j0;
      gemm_nt_keys<T>(gemm, st.keys, 0, t.b, t.kvh, pc.j0, R, n, D, qk_alpha, A, lda, kbase + pc.j0 * ksS, ksS,
                      Acc(0), st.S.data(), ldS, piece_tri(P, t, pc, Tri::kSkipCols));
      if (ex.rel()) add_rel_bias<Acc>(P, t, ex, cf0, pc.j0, n, st.S.data(), ldS, nullptr);
      if (pc.partial) piece_colmasks<Acc>(P, t, pc, st.cmbuf, st.ri);
      ra.n = n;
      ra.j0 = pc.j0;
      ra.partial = pc.partial;
      rows.fwd(ra);
      if (ex.dropout) {  // (l keeps the undropped sum; 1 / (1 - p) is applied in finish)
        dropout_keep<Acc>(P, t, ex, pc.j0, n, st.words, st.keep.data(), ldS);
        drop_rows<T>(ra.P, ra.P, R, n, ldS, st.keep.data(), ldS);
      }
      gemm_nn_keys<T>(gemm, st.keys, 1, t.b, t.kvh, pc.j0, R, D, n, Acc(1), ra.P, ldS, vbase + pc.j0 * vsS, vsS,
                      Acc(1), st.acc.data(), D, piece_tri(P, t, pc, Tri::kKeysUpTo));
    }
  };
  // out = acc / l, lse = (m + log2 l) ln 2; a row without visible keys: zeros, -inf
  auto finish = [&](const Tile& t, const Acc* acc, const Acc* m, const Acc* l) {
    const int64_t nr = t.nr();
    for (int64_t r = 0; r < t.rows(); ++r) {
      const int64_t h = t.h0 + r / nr, i = t.i0 + r % nr;
      T* o = op + t.b * osB + h * osH + i * osS;
      const Acc* a = acc + r * D;
      lse_t<T>* lo = lp + (t.b * P.Hq + h) * P.Sq + i;
      if (l[r] != Acc(0)) {  // (NaN: a NaN reached the row; it propagates)
        const Acc inv = Acc(1) / l[r] * ex.inv_keep;
        for (int64_t d = 0; d < D; ++d) o[d] = static_cast<T>(a[d] * inv);
        *lo = static_cast<lse_t<T>>((static_cast<double>(m[r]) + std::log2(static_cast<double>(l[r]))) * kLn2);
      } else {
        for (int64_t d = 0; d < D; ++d) o[d] = T(0);
        *lo = kNegInf;
      }
    }
  };

  // Few work items (decoding, one long head): split the keys too and merge the partial
  // softmaxes in a fixed order (flash-decoding). The split depends on the problem only, so
  // results do not depend on the thread count.
  const int64_t items = P.items_fwd();
  const int64_t nsplit = fwd_key_splits(P);
  if (nsplit == 1) {
    run_items<FwdState<T>>(items, [&](int64_t item, FwdState<T>& st) {
      const Tile t = tile_of(item);
      compute(t, 0, P.Sk, st);
      finish(t, st.acc.data(), st.m.data(), st.l.data());
    });
    return;
  }
  int64_t rmax = 0;
  for (int64_t it = 0; it < std::min<int64_t>(items, ntile * P.ngroups); ++it) rmax = std::max(rmax, tile_of(it).rows());
  const int64_t slot = rmax * (D + 2);  // acc, m, l of one (item, split)
  std::vector<Acc> part(items * nsplit * slot);
  std::unique_ptr<std::atomic<int64_t>[]> done(new std::atomic<int64_t>[items]);
  for (int64_t it = 0; it < items; ++it) done[it].store(0);
  // One parallel region: the job finishing an item's last split merges that item's splits
  // (in split order, so the result does not depend on which thread merges).
  run_items<FwdState<T>>(items * nsplit, [&](int64_t job, FwdState<T>& st) {
    const int64_t item = job / nsplit, sp = job % nsplit;
    const Tile t = tile_of(item);
    const int64_t L0 = P.Sk * sp / nsplit, L1 = P.Sk * (sp + 1) / nsplit;
    compute(t, L0, L1, st);
    const int64_t R = t.rows();
    Acc* dst = part.data() + job * slot;
    std::copy(st.acc.begin(), st.acc.begin() + R * D, dst);
    std::copy(st.m.begin(), st.m.begin() + R, dst + rmax * D);
    std::copy(st.l.begin(), st.l.begin() + R, dst + rmax * (D + 1));
    if (done[item].fetch_add(1, std::memory_order_acq_rel) != nsplit - 1) return;
    st.acc.assign(R * D, Acc(0));
    st.m.assign(R, -std::numeric_limits<Acc>::infinity());
    st.l.assign(R, Acc(0));
    for (int64_t k2 = 0; k2 < nsplit; ++k2) {
      const Acc* src = part.data() + (item * nsplit + k2) * slot;
      for (int64_t r = 0; r < R; ++r) {
        const Acc ms = src[rmax * D + r], ls = src[rmax * (D + 1) + r];
        if (ls == Acc(0)) continue;  // no visible key in this split (NaN merges: it propagates)
        const Acc mn = max_nan(st.m[r], ms);
        const Acc a_old = std::exp2(st.m[r] - mn), a_new = std::exp2(ms - mn);
        st.l[r] = st.l[r] * a_old + ls * a_new;
        Acc* o = st.acc.data() + r * D;
        const Acc* x = src + r * D;
        for (int64_t d = 0; d < D; ++d) o[d] = o[d] * a_old + x[d] * a_new;
        st.m[r] = mn;
      }
    }
    finish(t, st.acc.data(), st.m.data(), st.l.data());
  });
}

// float16 operands as float32 (inner stride 1 kept; the kernels read the strides). The
// attention work is O(Sq Sk D) and this copy O((Sq + Sk) D), so float16 runs at the float32
// kernel's speed on every path (MKL / AVX-512 / portable), with P and dS kept in float32.
at::Tensor widen_half(const at::Tensor& t) { return rows_unit(t.to(at::kFloat)); }

std::tuple<at::Tensor, at::Tensor> attention_fwd(const at::Tensor& q_, const at::Tensor& k_, const at::Tensor& v_,
                                                 double scale, int64_t window_left, int64_t window_right,
                                                 const c10::optional<at::Tensor>& alibi_slopes,
                                                 const c10::optional<at::Tensor>& block_mask, int64_t block_size,
                                                 const c10::optional<at::Tensor>& key_mask, double softcap,
                                                 const c10::optional<at::Tensor>& rel_bias, double dropout_p,
                                                 const c10::optional<at::Tensor>& dropout_seed) {
  TORCH_CHECK(q_.scalar_type() == k_.scalar_type() && q_.scalar_type() == v_.scalar_type(),
              "attention: q, k, v must share a dtype");
  TORCH_CHECK(k_.sizes() == v_.sizes(), "attention: k and v must have the same shape");
  Problem P;
  at::Tensor bm_keep, km_keep;
  const at::Tensor q = rows_unit(q_), k = rows_unit(k_), v = rows_unit(v_);
  setup_problem(P, q, k, scale, window_left, window_right, alibi_slopes, block_mask, block_size, key_mask, softcap,
                bm_keep, km_keep);
  plan_tiles(P);
  const ExtraArgs xa = extra_args(P, q.scalar_type(), rel_bias, dropout_p, dropout_seed);
  // out in q's memory order (see new_output_bhsd), like flash-attn's (B, S, H, D) output
  at::Tensor out = cpu::new_output_bhsd({P.B, P.Hq, P.Sq, P.D}, q.scalar_type(), q_);
  at::Tensor lse = at::empty({P.B, P.Hq, P.Sq}, q.options().dtype(q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat));
  if (out.numel() == 0) return {out, lse};
  auto run = [&](auto tag, const at::Tensor& qq, const at::Tensor& kk, const at::Tensor& vv, at::Tensor& oo) {
    using T = decltype(tag);
    const Isa isa = choose_isa<T>();
    attention_fwd_impl<T>(P, qq, kk, vv, oo, lse, isa, make_extras<acc_t<T>>(P, xa, isa));
  };
  switch (q.scalar_type()) {
    case at::kFloat: run(float{}, q, k, v, out); break;
    case at::kDouble: run(double{}, q, k, v, out); break;
    case at::kBFloat16: run(bf16{}, q, k, v, out); break;
    case at::kHalf: {  // float16: the float32 kernel on widened operands (see the header)
      at::Tensor of = at::empty(out.sizes(), out.options().dtype(at::kFloat));
      run(float{}, widen_half(q), widen_half(k), widen_half(v), of);
      out.copy_(of);
      break;
    }
    default: TORCH_CHECK(false, "attention (cpu): dtype ", q.scalar_type(), " is not supported (float32, bfloat16, float16, float64)");
  }
  return {out, lse};
}

// ============================================================================ backward
template <typename T>
struct BwdState {
  using Acc = acc_t<T>;
  std::vector<Acc> S, dP, G, dq, dk, dv, tbuf;  // dk, dv: D x keys (transposed)
  std::vector<T> Pl, dSl, qbuf, dobuf;
  std::vector<RowInfo<Acc>> ri;
  std::vector<int64_t> one_key;  // per tile row: its only visible key, or -1
  std::vector<Piece> pieces;
  std::vector<uint8_t> cmbuf, any_buf, all_buf;
  std::vector<T> Pd;             // dropout: the dropped P of dV (fp32 / fp64)
  std::vector<uint8_t> keep;     // dropout: keep bytes of a piece
  std::vector<uint32_t> words;   // dropout: Philox words of a row
  KeyPack<T> keys;               // K^T, V^T and K of a work item's keys (AVX-512 GEMMs)
};

constexpr int kBwdKeys = kPackKT | kPackVT | kPackKR;

template <typename T>
struct BwdCtx {
  using Acc = acc_t<T>;
  const Problem* P;
  Gemm<T> gemm;
  Rows<Acc, T> rows;
  Cfg<Acc> cf;       // the problem's score transform
  Cfg<Acc> cf_rows;  // the row kernels' (no softcap when rel_bias applies it)
  const Extras<Acc>* ex;
  Acc qk_alpha, scale;
  const T *q, *k, *v, *dout, *out;
  int64_t qsB, qsH, qsS, ksB, ksH, ksS, vsB, vsH, vsS, dsB, dsH, dsS, osB, osH, osS;
  const lse_t<T>* lse;  // (B, Hq, Sq) contiguous
};

// The key a row sees when it sees exactly one, else -1 (none, or several). Such a row's
// softmax is the constant 1, so its dS is exactly 0: bwd_tile sets its delta to dP at that
// key (delta = rowsum(P dP) exactly, P being 1 there and 0 elsewhere), and dS = P (dP - delta)
// cancels bit for bit, whatever order the GEMM summed dP in. rowsum(dO O) would leave the
// rounding difference of two differently ordered sums (~1e-7 in dQ, dK). Costs O(1) per row
// (prefix counts of the key mask), plus a walk over the key blocks of the window with a block
// mask that stops at the second visible key.
int64_t single_visible_key(const Problem& P, int64_t b, int64_t h, int64_t i) {
  const int64_t lo = P.lo(i), hi = P.hi(i);
  if (lo > hi) return -1;
  const int32_t* kc = P.km ? P.kmc.data() + b * (P.Sk + 1) : nullptr;
  auto count = [&](int64_t a, int64_t e) { return kc ? int64_t{kc[e + 1] - kc[a]} : e - a + 1; };  // [a, e]
  auto first = [&](int64_t a, int64_t e) {  // the first visible key of [a, e] (which holds one)
    if (!kc) return a;
    while (a < e) {  // the first j with kc[j + 1] > kc[a_0]: binary search on the prefix counts
      const int64_t mid = a + (e - a) / 2;
      if (kc[mid + 1] - kc[a] > 0) e = mid; else a = mid + 1;
    }
    return a;
  };
  if (!P.bm) return count(lo, hi) == 1 ? first(lo, hi) : -1;
  int64_t total = 0, at = -1;
  for (int64_t kb = lo / P.bs; kb <= hi / P.bs && total < 2; ++kb) {
    if (!P.bmask(b, h, i / P.bs, kb)) continue;
    const int64_t a = std::max(lo, kb * P.bs), e = std::min(hi, (kb + 1) * P.bs - 1);
    const int64_t c = count(a, e);
    if (c == 1 && total == 0) at = first(a, e);
    total += c;
  }
  return total == 1 ? at : -1;
}

// Accumulates one tile's contributions over its pieces: dq (rows x D, if non-null), and
// dk/dv transposed (D x keys, column j - kofs, row stride ldkv; if non-null), and the
// rel_bias gradient (if non-null: the row of head h at drel + (h - t.h0) * drel_ld).
// dK^T += scale Q^T dS and dV^T += dO^T P read dS and P as they lie (their k-pairs are
// rows): dK = dS^T Q would transpose the (rows x keys) dS and P of every piece.
template <typename T>
void bwd_tile(const BwdCtx<T>& c, BwdState<T>& st, const Tile& t, int64_t L0, int64_t L1, acc_t<T>* dq,
              acc_t<T>* dk, acc_t<T>* dv, int64_t kofs, int64_t ldkv, acc_t<T>* drel = nullptr,
              int64_t drel_ld = 0) {
  using Acc = acc_t<T>;
  constexpr bool kLowP = !std::is_same<T, Acc>::value;
  const Problem& P = *c.P;
  tile_pieces(P, t, L0, L1, st.pieces, st.any_buf, st.all_buf);
  if (st.pieces.empty()) return;
  const int64_t R = t.rows(), nr = t.nr(), D = P.D, BK = P.BK;
  const int64_t ldS = BK + 16;
  st.S.resize(R * ldS);
  st.dP.resize(R * ldS);
  if (c.cf.softcap) st.G.resize(R * ldS);
  if (kLowP) {
    st.Pl.resize(R * ldS);
    st.dSl.resize(R * ldS);
  }
  fill_rows<Acc>(P, t, st.ri);
  st.one_key.resize(R);
  constexpr int64_t kAhead = 8;  // rows of dO and O prefetched ahead (O is often (B, S, H, D))
  auto prefetch_rows = [&](int64_t r) {
    const int64_t h = t.h0 + r / nr, i = t.i0 + r % nr;
    const char* a = reinterpret_cast<const char*>(c.dout + t.b * c.dsB + h * c.dsH + i * c.dsS);
    const char* o = reinterpret_cast<const char*>(c.out + t.b * c.osB + h * c.osH + i * c.osS);
    for (int64_t x = 0; x < D * static_cast<int64_t>(sizeof(T)); x += 64) {
      __builtin_prefetch(a + x);
      __builtin_prefetch(o + x);
    }
  };
  for (int64_t r = 0; r < std::min(R, kAhead); ++r) prefetch_rows(r);
  for (int64_t r = 0; r < R; ++r) {
    if (r + kAhead < R) prefetch_rows(r + kAhead);
    const int64_t h = t.h0 + r / nr, i = t.i0 + r % nr;
    const int64_t idx = (t.b * P.Hq + h) * P.Sq + i;
    const lse_t<T> l = c.lse[idx];
    st.ri[r].lse2 = std::isinf(l) && l < 0 ? -std::numeric_limits<Acc>::infinity() : static_cast<Acc>(l * kLog2e);
    // delta = rowsum(dO * O), in the accumulation precision (one-key rows: see below)
    st.ri[r].delta = c.rows.dot(c.dout + t.b * c.dsB + h * c.dsH + i * c.dsS,
                                c.out + t.b * c.osB + h * c.osH + i * c.osS, D);
    st.one_key[r] = single_visible_key(P, t.b, h, i);
  }
  int64_t lda = 0, ldo = 0;
  const T* A = tile_rows<T>(c.q, c.qsB, c.qsH, c.qsS, t, D, st.qbuf, lda);
  const T* dO = tile_rows<T>(c.dout, c.dsB, c.dsH, c.dsS, t, D, st.dobuf, ldo);
  const T* kbase = c.k + t.b * c.ksB + t.kvh * c.ksH;
  const T* vbase = c.v + t.b * c.vsB + t.kvh * c.vsH;
  RowsArgs<Acc, T> ra;
  ra.rows = R;
  ra.ri = st.ri.data();
  ra.cf = &c.cf_rows;
  ra.S = st.S.data();
  ra.ldS = ldS;
  ra.dP = st.dP.data();
  ra.G = c.cf.softcap ? st.G.data() : nullptr;
  ra.P = kLowP ? st.Pl.data() : nullptr;
  ra.dSl = kLowP ? st.dSl.data() : nullptr;
  ra.ldP = ldS;
  const T* Pm = kLowP ? reinterpret_cast<const T*>(st.Pl.data()) : reinterpret_cast<const T*>(st.S.data());
  const T* dSm = kLowP ? reinterpret_cast<const T*>(st.dSl.data()) : reinterpret_cast<const T*>(st.dP.data());
  const Extras<Acc>& ex = *c.ex;
  const T* Pdm = Pm;  // the P of dV: dropout zeroes the dropped entries (in Pl, or a copy of S)
  if (ex.dropout) {
    st.keep.resize(R * ldS);
    if (!kLowP) {
      st.Pd.resize(R * ldS);
      Pdm = st.Pd.data();
    }
  }
  ensure_keys<T>(st.keys, P, c.gemm.impl, kBwdKeys, t, st.pieces, kbase, c.ksS, vbase, c.vsS);
  for (const Piece& pc : st.pieces) {
    const int64_t n = pc.j1 - pc.j0;
    const T* kp = kbase + pc.j0 * c.ksS;
    const T* vp = vbase + pc.j0 * c.vsS;
    const Tri skip = piece_tri(P, t, pc, Tri::kSkipCols), upto = piece_tri(P, t, pc, Tri::kKeysUpTo),
              from = piece_tri(P, t, pc, Tri::kRowsFrom);
    gemm_nt_keys<T>(c.gemm, st.keys, 0, t.b, t.kvh, pc.j0, R, n, D, c.qk_alpha, A, lda, kp, c.ksS, Acc(0),
                    st.S.data(), ldS, skip);
    if (ex.rel()) add_rel_bias<Acc>(P, t, ex, c.cf, pc.j0, n, st.S.data(), ldS, c.cf.softcap ? st.G.data() : nullptr);
    if (pc.partial) piece_colmasks<Acc>(P, t, pc, st.cmbuf, st.ri);
    ra.n = n;
    ra.j0 = pc.j0;
    ra.partial = pc.partial;
    c.rows.bwd_p(ra);
    if (ex.dropout) {  // dV += (P keep)^T dO / (1 - p); dP = (dO V^T) keep / (1 - p)
      dropout_keep<Acc>(P, t, ex, pc.j0, n, st.words, st.keep.data(), ldS);
      drop_rows<T>(Pm, const_cast<T*>(Pdm), R, n, ldS, st.keep.data(), ldS);
      if (dv) c.gemm(Op::TN, D, n, R, ex.inv_keep, dO, ldo, Pdm, ldS, Acc(1), dv + (pc.j0 - kofs), ldkv, from);
      gemm_nt_keys<T>(c.gemm, st.keys, 1, t.b, t.kvh, pc.j0, R, n, D, ex.inv_keep, dO, ldo, vp, c.vsS, Acc(0),
                      st.dP.data(), ldS, skip);
      drop_rows<Acc>(st.dP.data(), st.dP.data(), R, n, ldS, st.keep.data(), ldS);
    } else {
      if (dv) c.gemm(Op::TN, D, n, R, Acc(1), dO, ldo, Pm, ldS, Acc(1), dv + (pc.j0 - kofs), ldkv, from);
      gemm_nt_keys<T>(c.gemm, st.keys, 1, t.b, t.kvh, pc.j0, R, n, D, Acc(1), dO, ldo, vp, c.vsS, Acc(0),
                      st.dP.data(), ldS, skip);
    }
    for (int64_t r = 0; r < R; ++r) {  // a row's only key is in this piece: delta = dP there
      const int64_t j = st.one_key[r];
      if (j >= pc.j0 && j < pc.j1) st.ri[r].delta = st.dP[r * ldS + (j - pc.j0)];
    }
    if (drel) acc_rel_bias_grad<Acc>(P, t, st.ri.data(), pc.j0, n, st.S.data(), st.dP.data(), ldS, drel, drel_ld);
    c.rows.bwd_ds(ra);
    if (dq)
      gemm_nn_keys<T>(c.gemm, st.keys, 0, t.b, t.kvh, pc.j0, R, D, n, c.scale, dSm, ldS, kp, c.ksS, Acc(1), dq, D, upto);
    if (dk) c.gemm(Op::TN, D, n, R, c.scale, A, lda, dSm, ldS, Acc(1), dk + (pc.j0 - kofs), ldkv, from);
  }
}

template <typename T>
void store_dq(const BwdCtx<T>& c, const Tile& t, const acc_t<T>* dq, at::Tensor& out) {
  const int64_t nr = t.nr(), D = c.P->D;
  T* base = out.data_ptr<T>();
  for (int64_t r = 0; r < t.rows(); ++r) {
    const int64_t h = t.h0 + r / nr, i = t.i0 + r % nr;
    c.rows.store(base + t.b * out.stride(0) + h * out.stride(1) + i * out.stride(2), dq + r * D, D);
  }
}

template <typename T>
void attention_bwd_impl(const Problem& P, const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k,
                        const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse, at::Tensor& dq,
                        at::Tensor& dk, at::Tensor& dv, const Isa& isa, const Extras<acc_t<T>>& ex,
                        at::Tensor& drel) {
  using Acc = acc_t<T>;
  BwdCtx<T> c{};
  c.P = &P;
  c.gemm = Gemm<T>{isa.gemm};
  c.rows = Rows<Acc, T>{isa.rows};
  c.cf = make_cfg<Acc>(P);
  c.cf_rows = ex.rows_cfg(c.cf);
  c.ex = &ex;
  c.qk_alpha = static_cast<Acc>(P.scale * (c.cf.softcap ? 1.0 : kLog2e));
  c.scale = static_cast<Acc>(P.scale);
  c.q = q.const_data_ptr<T>();
  c.k = k.const_data_ptr<T>();
  c.v = v.const_data_ptr<T>();
  c.dout = dout.const_data_ptr<T>();
  c.qsB = q.stride(0), c.qsH = q.stride(1), c.qsS = q.stride(2);
  c.ksB = k.stride(0), c.ksH = k.stride(1), c.ksS = k.stride(2);
  c.vsB = v.stride(0), c.vsH = v.stride(1), c.vsS = v.stride(2);
  c.dsB = dout.stride(0), c.dsH = dout.stride(1), c.dsS = dout.stride(2);
  c.out = out.const_data_ptr<T>();
  c.osB = out.stride(0), c.osH = out.stride(1), c.osS = out.stride(2);
  c.lse = lse.const_data_ptr<lse_t<T>>();
  T* dkp = dk.data_ptr<T>();
  T* dvp = dv.data_ptr<T>();
  const int64_t dksB = dk.stride(0), dksH = dk.stride(1), dksS = dk.stride(2);
  const int64_t dvsB = dv.stride(0), dvsH = dv.stride(1), dvsS = dv.stride(2);
  const int64_t D = P.D, ntile = static_cast<int64_t>(P.qtiles.size());

  // One item per (batch, kv head) owns dK, dV and the dQ of its query heads: one pass.
  // With fewer such items than threads: dK/dV per key block, then dQ per query tile.
  const int64_t n_single = P.B * P.Hkv;
  const bool single = bwd_single_pass(P);

  // rel_bias gradient: each work item sums into its own rows of `part` ((B, Hq, nchunk, L):
  // one chunk in the one-pass schedule; in the two-pass one the dQ pass does it, its items
  // being (batch, kv head, head group, chunk of query tiles), the chunks a fixed round-robin
  // of the tile order), then the rows are summed over chunks and the batch in a fixed order.
  const int64_t L = ex.L;
  const int64_t nqitems = P.B * P.Hkv * P.ngroups;
  const int64_t nchunk =
      ex.rel() && !single ? std::min<int64_t>(ntile, std::max<int64_t>(1, (64 + nqitems - 1) / nqitems)) : 1;
  std::vector<Acc> part(ex.rel() ? P.B * P.Hq * nchunk * L : 0, Acc(0));
  auto part_at = [&](const Tile& t, int64_t chunk) {
    return ex.rel() ? part.data() + ((t.b * P.Hq + t.h0) * nchunk + chunk) * L : nullptr;
  };
  auto reduce_drel = [&]() {
    if (!ex.rel()) return;
    Acc* o = drel.data_ptr<Acc>();
    for (int64_t h = 0; h < P.Hq; ++h) {
      Acc* oh = o + h * L;
      std::fill(oh, oh + L, Acc(0));
      for (int64_t b = 0; b < P.B; ++b)
        for (int64_t ch = 0; ch < nchunk; ++ch) {
          const Acc* src = part.data() + ((b * P.Hq + h) * nchunk + ch) * L;
          for (int64_t x = 0; x < L; ++x) oh[x] += src[x];
        }
    }
  };

  // all the keys a work item's tiles read (the tiles of the one-pass schedule run in query
  // order: packing each tile's span as it comes would pack the causal prefix again each time)
  auto pack_item_keys = [&](BwdState<T>& st, int64_t b, int64_t kvh, int64_t j0, int64_t j1) {
    if (P.bm || P.km || !packs_keys<T>(c.gemm.impl, D)) return;
    pack_keys<T>(st.keys, c.gemm.impl, kBwdKeys, b, kvh, j0, j1, D, c.k + b * c.ksB + kvh * c.ksH + j0 * c.ksS,
                 c.ksS, c.v + b * c.vsB + kvh * c.vsH + j0 * c.vsS, c.vsS);
  };
  // keys [j0, j0 + n) of dK, dV from their transposed accumulators (D x n)
  auto write_kv = [&](BwdState<T>& st, int64_t b, int64_t kvh, int64_t j0, int64_t n) {
    const Acc* acc[2] = {st.dk.data(), st.dv.data()};
    T* out[2] = {dkp + b * dksB + kvh * dksH + j0 * dksS, dvp + b * dvsB + kvh * dvsH + j0 * dvsS};
    const int64_t so[2] = {dksS, dvsS};
    for (int w = 0; w < 2; ++w) c.rows.store_transposed(out[w], so[w], acc[w], D, n, st.tbuf);
  };

  if (single) {
    run_items<BwdState<T>>(n_single, [&](int64_t item, BwdState<T>& st) {
      const int64_t b = item / P.Hkv, kvh = item % P.Hkv;
      st.dk.assign(P.Sk * D, Acc(0));
      st.dv.assign(P.Sk * D, Acc(0));
      pack_item_keys(st, b, kvh, 0, P.Sk);
      for (int64_t grp = 0; grp < P.ngroups; ++grp)
        for (int64_t tt = 0; tt < ntile; ++tt) {
          const Tile t = P.tile(b, kvh, grp, tt);
          st.dq.assign(t.rows() * D, Acc(0));
          bwd_tile<T>(c, st, t, 0, P.Sk, st.dq.data(), st.dk.data(), st.dv.data(), 0, P.Sk, part_at(t, 0), L);
          store_dq<T>(c, t, st.dq.data(), dq);
        }
      write_kv(st, b, kvh, 0, P.Sk);
    });
    reduce_drel();
    return;
  }
  const int64_t KB = P.BK;
  const int64_t nkb = (P.Sk + KB - 1) / KB;
  run_items<BwdState<T>>(P.B * P.Hkv * nkb, [&](int64_t item, BwdState<T>& st) {
    const int64_t kb = item % nkb, bh = item / nkb;
    const int64_t b = bh / P.Hkv, kvh = bh % P.Hkv;
    const int64_t j0 = kb * KB, j1 = std::min<int64_t>(j0 + KB, P.Sk);
    st.dk.assign((j1 - j0) * D, Acc(0));
    st.dv.assign((j1 - j0) * D, Acc(0));
    pack_item_keys(st, b, kvh, j0, j1);
    for (int64_t grp = 0; grp < P.ngroups; ++grp)
      for (int64_t tt = 0; tt < ntile; ++tt) {
        const Tile t = P.tile(b, kvh, grp, tt);
        bwd_tile<T>(c, st, t, j0, j1, nullptr, st.dk.data(), st.dv.data(), j0, j1 - j0);
      }
    write_kv(st, b, kvh, j0, j1 - j0);
  });
  const std::vector<int64_t> order = tile_order(P);
  auto dq_tile = [&](const Tile& t, BwdState<T>& st, Acc* dr) {
    st.dq.assign(t.rows() * D, Acc(0));
    bwd_tile<T>(c, st, t, 0, P.Sk, st.dq.data(), nullptr, nullptr, 0, 0, dr, nchunk * L);
    store_dq<T>(c, t, st.dq.data(), dq);
  };
  if (!ex.rel()) {
    run_items<BwdState<T>>(P.items_fwd(), [&](int64_t item, BwdState<T>& st) {
      const int64_t tt = order[item % ntile];
      int64_t rest = item / ntile;
      const int64_t grp = rest % P.ngroups;
      rest /= P.ngroups;
      dq_tile(P.tile(rest / P.Hkv, rest % P.Hkv, grp, tt), st, nullptr);
    });
    return;
  }
  run_items<BwdState<T>>(nqitems * nchunk, [&](int64_t item, BwdState<T>& st) {
    const int64_t ch = item % nchunk;
    int64_t rest = item / nchunk;
    const int64_t grp = rest % P.ngroups;
    rest /= P.ngroups;
    for (int64_t x = ch; x < ntile; x += nchunk) {
      const Tile t = P.tile(rest / P.Hkv, rest % P.Hkv, grp, order[x]);
      dq_tile(t, st, part_at(t, ch));
    }
  });
  reduce_drel();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_bwd(
    const at::Tensor& grad_out_, const at::Tensor& q_, const at::Tensor& k_, const at::Tensor& v_,
    const at::Tensor& out_, const at::Tensor& lse_, double scale, int64_t window_left, int64_t window_right,
    const c10::optional<at::Tensor>& alibi_slopes, const c10::optional<at::Tensor>& block_mask, int64_t block_size,
    const c10::optional<at::Tensor>& key_mask, double softcap, const c10::optional<at::Tensor>& rel_bias,
    double dropout_p, const c10::optional<at::Tensor>& dropout_seed) {
  TORCH_CHECK(q_.scalar_type() == k_.scalar_type() && q_.scalar_type() == v_.scalar_type(),
              "attention: q, k, v must share a dtype");
  Problem P;
  at::Tensor bm_keep, km_keep;
  const at::Tensor q = rows_unit(q_), k = rows_unit(k_), v = rows_unit(v_);
  const at::Tensor dout = rows_unit(grad_out_.to(q.scalar_type()));
  setup_problem(P, q, k, scale, window_left, window_right, alibi_slopes, block_mask, block_size, key_mask, softcap,
                bm_keep, km_keep);
  plan_tiles(P);
  const ExtraArgs xa = extra_args(P, q.scalar_type(), rel_bias, dropout_p, dropout_seed);
  at::Tensor drel = xa.rel.defined() ? at::zeros({P.Hq, std::max<int64_t>(P.Sq + P.Sk - 1, 0)}, xa.rel.options())
                                     : at::empty({0}, q_.options().dtype(at::kFloat));
  // each gradient in its input's memory order (see new_output_bhsd)
  at::Tensor dq = cpu::new_output_bhsd({P.B, P.Hq, P.Sq, P.D}, q.scalar_type(), q_);
  at::Tensor dk = cpu::new_output_bhsd({P.B, P.Hkv, P.Sk, P.D}, k.scalar_type(), k_);
  at::Tensor dv = cpu::new_output_bhsd({P.B, P.Hkv, P.Sk, P.D}, v.scalar_type(), v_);
  if (dq.numel() == 0 || dk.numel() == 0) {
    dq.zero_();
    dk.zero_();
    dv.zero_();
    return {dq, dk, dv, drel};
  }
  // (no torch ops with intra-op threads in here: on a busy machine each one costs milliseconds)
  const at::ScalarType lse_dt = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor lse = lse_.scalar_type() == lse_dt && lse_.is_contiguous() ? lse_ : lse_.to(lse_dt).contiguous();
  const at::Tensor out = rows_unit(out_.to(q.scalar_type()));
  auto run = [&](auto tag, const at::Tensor& ddo, const at::Tensor& qq, const at::Tensor& kk, const at::Tensor& vv,
                 const at::Tensor& oo, at::Tensor& gq, at::Tensor& gk, at::Tensor& gv) {
    using T = decltype(tag);
    const Isa isa = choose_isa<T>();
    attention_bwd_impl<T>(P, ddo, qq, kk, vv, oo, lse, gq, gk, gv, isa, make_extras<acc_t<T>>(P, xa, isa), drel);
  };
  switch (q.scalar_type()) {
    case at::kFloat: run(float{}, dout, q, k, v, out, dq, dk, dv); break;
    case at::kDouble: run(double{}, dout, q, k, v, out, dq, dk, dv); break;
    case at::kBFloat16: run(bf16{}, dout, q, k, v, out, dq, dk, dv); break;
    case at::kHalf: {
      at::Tensor dqf = at::empty_like(dq, dq.options().dtype(at::kFloat));
      at::Tensor dkf = at::empty_like(dk, dk.options().dtype(at::kFloat));
      at::Tensor dvf = at::empty_like(dv, dv.options().dtype(at::kFloat));
      run(float{}, widen_half(dout), widen_half(q), widen_half(k), widen_half(v), widen_half(out), dqf, dkf, dvf);
      dq.copy_(dqf);
      dk.copy_(dkf);
      dv.copy_(dvf);
      break;
    }
    default: TORCH_CHECK(false, "attention (cpu): dtype ", q.scalar_type(), " is not supported (float32, bfloat16, float16, float64)");
  }
  return {dq, dk, dv, drel};
}

template <typename T>
std::string isa_path() {
  const Isa isa = choose_isa<T>();
  const bool bf = std::is_same<T, bf16>::value;
  std::string gemm = isa.gemm == GemmImpl::Mkl      ? (bf ? "MKL bf16 tile GEMMs" : "MKL tile GEMMs")
                     : isa.gemm == GemmImpl::Avx512 ? (bf ? "AVX512-BF16 tile GEMMs" : "AVX-512 tile GEMMs")
                                                    : "portable tile GEMMs";
  return gemm + (isa.rows == RowsImpl::Avx512 ? " + AVX-512 rows"
                 : isa.rows == RowsImpl::Avx2 ? " + AVX2 rows"
                                               : " + portable rows");
}

}  // namespace

// Described for logging and tk.explain (csrc/cpu/info.cpp); the same choices the kernels make.
std::string attention_cpu_path(c10::ScalarType dtype) {
  switch (dtype) {
    case at::kFloat: return isa_path<float>();
    case at::kDouble: return isa_path<double>();
    case at::kBFloat16: return isa_path<bf16>();
    case at::kHalf: return isa_path<float>() + " (float16 widened to float32)";
    default: return "no CPU attention kernel for this dtype";
  }
}

std::string attention_cpu_plan(const at::Tensor& q, const at::Tensor& k, double scale, int64_t window_left,
                               int64_t window_right, const c10::optional<at::Tensor>& alibi_slopes,
                               const c10::optional<at::Tensor>& block_mask, int64_t block_size,
                               const c10::optional<at::Tensor>& key_mask, double softcap) {
  Problem P;
  at::Tensor bm_keep, km_keep;
  setup_problem(P, q, k, scale, window_left, window_right, alibi_slopes, block_mask,
                block_size, key_mask, softcap, bm_keep, km_keep);
  plan_tiles(P);
  const int64_t nsplit = fwd_key_splits(P);
  std::string s = attention_cpu_path(q.scalar_type()) + "; tiles " + std::to_string(P.BQ) + "x" +
                  std::to_string(P.BK) + ", " + std::to_string(P.items_fwd()) + " work items";
  s += nsplit > 1 ? ", split-key decode (" + std::to_string(nsplit) + " key splits)" : ", no key split";
  s += bwd_single_pass(P) ? "; backward: one pass per (batch, kv head)"
                          : "; backward: dK/dV per key block, then dQ per query tile";
  return s;
}

TORCH_LIBRARY_IMPL(truthgpt, CPU, m) {
  m.impl("attention_fwd", &attention_fwd);
  m.impl("attention_bwd", &attention_bwd);
}

}  // namespace truthgpt
