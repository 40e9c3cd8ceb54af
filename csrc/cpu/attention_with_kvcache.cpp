// Attention against a KV cache on the CPU (decoding and chunked prefill), contiguous or paged:
// truthgpt::attention_with_kvcache_fwd. Semantics: truthgpt_kernels/ops/attention_with_kvcache.py.
//
// One kernel serves both layouts: a contiguous cache (B_cache, Hkv, S_max, D) is addressed as one
// "page" of S_max tokens per sequence (page cache_batch_idx[b], or b), a paged cache (num_pages,
// page_size, Hkv, D) through block_table; keys are read as (page, slot, head) strides, so neither
// layout copies. Keys before cache_leftpad[b] are left out of each item's key range. The T5 bias
// (rel_bias) comes by distance over the cache capacity S_cap, (Hq, Sq + S_cap - 1): query
// position p and key t read entry t - p + S_cap - 1, added with the ALiBi term. Returns the
// output and the rows' logsumexp (float32; float64 for float64).
//   1. append: k_new/v_new rows are copied into their (page, slot) of the cache, in place;
//   2. work items (sequence b, kv heads [h, h + nh), block of query positions, range of keys):
//      each item loads its queries (all G query heads of each kv head: one pass over the keys
//      serves the group), walks its keys page by page in blocks of up to kKeyBlock with an
//      online softmax (float accumulation; double for double inputs; bf16/fp16 read and
//      widened), scores then P V of a block in the order of the cache's memory (paged: a few
//      slots across all heads at a time; contiguous: one head at a time), with software
//      prefetch of the values and of the next block's keys, through the per-instruction-set
//      vectors of cpu/vec_utils.h;
//   3. when there are few (sequence, head) pairs for the threads (B * Hkv < 2 threads), long
//      key ranges are split into chunks whose partial (max, sum, acc) are merged afterwards in
//      chunk order: deterministic for a given thread count.
// Items are taken longest first from a shared counter (caches of mixed lengths balance).
// Rows with no visible key give 0; NaN scores give NaN rows. 64-bit index arithmetic.
#ifndef TRUTHGPT_KERNEL_SECTION  // ================================================ host part

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>
#include <numeric>
#include <tuple>
#include <vector>

#include "cpu/tensor_utils.h"

namespace truthgpt {
namespace cpu {
namespace kvc {

constexpr int64_t kKeyBlock = 64;    // keys scored per online-softmax step
constexpr int64_t kQueryRows = 64;   // query rows (positions x group heads) per item, at most
constexpr int64_t kMinChunk = 256;   // shortest key chunk worth a split
constexpr int64_t kSlotTile = 4;     // keys per tile when a page holds the heads of a slot side by side
constexpr int64_t kKeyAhead = 4;     // keys ahead of the scores whose rows are prefetched

// Element strides; q, the cache rows and out have unit stride in the head dim.
struct Args {
  const void* q;
  int64_t q_b, q_h, q_s;
  const void* k;
  const void* v;
  int64_t k_page, k_slot, k_head, v_page, v_slot, v_head;
  const int32_t* block_table;  // (B, max_pages) contiguous, or null: page cache_row[b], page_size S_max
  const int64_t* cache_row;    // (B,) contiguous cache: the cache row of sequence b (cache_batch_idx)
  int64_t max_pages, page_size;
  const int64_t* lens;         // keys per sequence after the append
  int64_t Hq, Sq, D, G;
  double scale, softcap;
  int64_t left, right;         // window, -1 = unbounded
  const float* slopes;         // ALiBi (B, Hq) with strides, or null
  int64_t sl_b, sl_h;
  const void* rel;             // T5 bias by distance (Hq, Sq + S_cap - 1) of the accumulation type, or null
  int64_t rel_h, rel_cap;      // its row stride (unit inner stride); S_cap (the cache capacity)
  void* out;                   // (B, Hq, Sq, D) contiguous
  void* lse;                   // (B, Hq, Sq) contiguous, of the accumulation type
};

// Query positions [i0, i1) of kv heads [h, h + nh) of sequence b against keys [k0, k1);
// part >= 0: a chunk of a split range, whose partial result goes to slot `part` of the
// partial buffers. Row r of an item: query head h * G + r / (i1 - i0), query i0 + r % (i1 - i0).
// Decoding puts all kv heads in one item, so a paged cache's page (slots x heads) is read
// front to back rather than one 4 KiB-strided head row at a time.
struct Item {
  int64_t b, h, nh, i0, i1, k0, k1, part;
};

// Head dim padded for the per-row buffers, and the scratch elements one thread needs:
// queries, accumulators, scores, row state.
inline int64_t padded_dim(int64_t D) { return (D + 15) / 16 * 16; }
inline int64_t scratch_size(int64_t D) {
  return 2 * kQueryRows * padded_dim(D) + kQueryRows * kKeyBlock + 2 * kQueryRows;
}

}  // namespace kvc
}  // namespace cpu
}  // namespace truthgpt

#define TRUTHGPT_KERNELS_FILE "cpu/attention_with_kvcache.cpp"
#include "cpu/foreach_isa.h"

namespace truthgpt {
namespace {

using namespace cpu;

int64_t key_page(const kvc::Args& a, int64_t b, int64_t t) {
  return a.block_table == nullptr ? a.cache_row[b] : a.block_table[b * a.max_pages + t / a.page_size];
}

// Copies the S_new new rows of every (sequence, kv head) into their cache slots.
void append(const kvc::Args& a, at::Tensor& cache, const at::Tensor& fresh, const std::vector<int64_t>& start,
            int64_t page_stride, int64_t slot_stride, int64_t head_stride) {
  const int64_t B = fresh.size(0), H = fresh.size(1), S = fresh.size(2), D = fresh.size(3);
  const auto src = fresh.stride(-1) == 1 ? fresh : fresh.contiguous();
  const int64_t es = src.element_size();
  const char* sp = static_cast<const char*>(src.const_data_ptr());
  char* cp = static_cast<char*>(cache.mutable_data_ptr());
  at::parallel_for(0, B * H, 1, [&](int64_t w0, int64_t w1) {
    for (int64_t w = w0; w < w1; ++w) {
      const int64_t b = w / H, h = w % H;
      for (int64_t s = 0; s < S; ++s) {
        const int64_t t = start[b] + s;
        const int64_t off = key_page(a, b, t) * page_stride + (t % a.page_size) * slot_stride + h * head_stride;
        std::memcpy(cp + off * es, sp + (b * src.stride(0) + h * src.stride(1) + s * src.stride(2)) * es,
                    static_cast<size_t>(D * es));
      }
    }
  });
}

// out rows of split ranges: the partial (max, sum, acc) of chunks merged in chunk order.
template <class T>
void merge_parts(const kvc::Args& a, const std::vector<kvc::Item>& items,
                 const std::vector<std::pair<int64_t, int64_t>>& splits, const acc_t<T>* pm,
                 const acc_t<T>* pl, const acc_t<T>* pacc) {
  using A = acc_t<T>;
  const int64_t D = a.D;
  T* out = static_cast<T*>(a.out);
  A* lse = static_cast<A*>(a.lse);
  at::parallel_for(0, static_cast<int64_t>(splits.size()), 1, [&](int64_t g0, int64_t g1) {
    std::vector<A> acc(static_cast<size_t>(D));
    for (int64_t g = g0; g < g1; ++g) {
      const kvc::Item& first = items[splits[g].first];
      const int64_t n_parts = splits[g].second;
      const int64_t nq = first.i1 - first.i0, rows = nq * a.G * first.nh;
      for (int64_t r = 0; r < rows; ++r) {
        A M = -std::numeric_limits<A>::infinity();
        for (int64_t c = 0; c < n_parts; ++c) {
          const A m = pm[(first.part + c) * kvc::kQueryRows + r];
          M = (m != m || M != M) ? std::numeric_limits<A>::quiet_NaN() : std::max(M, m);
        }
        A l = 0;
        std::fill(acc.begin(), acc.end(), A(0));
        if (M != -std::numeric_limits<A>::infinity()) {
          for (int64_t c = 0; c < n_parts; ++c) {
            const int64_t slot = (first.part + c) * kvc::kQueryRows + r;
            if (pm[slot] == -std::numeric_limits<A>::infinity()) continue;
            const A w = std::exp(pm[slot] - M);
            l += pl[slot] * w;
            for (int64_t d = 0; d < D; ++d) acc[d] += pacc[slot * D + d] * w;
          }
        }
        const int64_t hq = first.h * a.G + r / nq, i = first.i0 + r % nq;
        const int64_t row = (first.b * a.Hq + hq) * a.Sq + i;
        T* o = out + row * D;
        for (int64_t d = 0; d < D; ++d) o[d] = from_acc<T>(l == A(0) ? A(0) : acc[d] / l);
        lse[row] = l == A(0) ? -std::numeric_limits<A>::infinity() : M + std::log(l);
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> attention_with_kvcache_fwd(
    const at::Tensor& q_in, at::Tensor& k_cache, at::Tensor& v_cache, const at::Tensor& cache_seqlens,
    const c10::optional<at::Tensor>& block_table, const c10::optional<at::Tensor>& k_new,
    const c10::optional<at::Tensor>& v_new, const c10::optional<at::Tensor>& cache_batch_idx,
    const c10::optional<at::Tensor>& cache_leftpad, double scale, int64_t window_left, int64_t window_right,
    const c10::optional<at::Tensor>& alibi_slopes, double softcap, const c10::optional<at::Tensor>& rel_bias) {
  const char* op = "attention_with_kvcache_fwd";
  TORCH_CHECK(q_in.dim() == 4 && k_cache.dim() == 4 && v_cache.sizes() == k_cache.sizes(), op,
              ": q must be (B, Hq, Sq, D) and k_cache/v_cache 4-D of one shape");
  TORCH_CHECK(k_cache.scalar_type() == q_in.scalar_type() && v_cache.scalar_type() == q_in.scalar_type(), op,
              ": q, k_cache and v_cache must have one dtype");
  const bool paged = block_table.has_value();
  const int64_t B = q_in.size(0), Hq = q_in.size(1), Sq = q_in.size(2), D = q_in.size(3);
  const int64_t Hkv = paged ? k_cache.size(2) : k_cache.size(1);
  const int64_t page_size = paged ? k_cache.size(1) : k_cache.size(2);
  const bool remap = cache_batch_idx.has_value();
  TORCH_CHECK(!(paged && remap), op, ": cache_batch_idx needs a contiguous cache (not block_table)");
  TORCH_CHECK(k_cache.size(3) == D && Hkv >= 1 && Hq % Hkv == 0 && (paged || remap || k_cache.size(0) == B), op,
              ": cache shape does not match q");
  TORCH_CHECK(D <= 1 || (k_cache.stride(3) == 1 && v_cache.stride(3) == 1), op,
              ": k_cache and v_cache need a unit stride in the head dim");
  TORCH_CHECK(cache_seqlens.scalar_type() == at::kInt && cache_seqlens.numel() == B, op,
              ": cache_seqlens must be int32 (B,)");
  TORCH_CHECK(k_new.has_value() == v_new.has_value(), op, ": k_new and v_new go together");
  const int64_t S_new = k_new.has_value() ? k_new->size(2) : 0;
  if (k_new.has_value()) {
    TORCH_CHECK(k_new->dim() == 4 && k_new->size(0) == B && k_new->size(1) == Hkv && k_new->size(3) == D &&
                    v_new->sizes() == k_new->sizes() && k_new->scalar_type() == q_in.scalar_type() &&
                    v_new->scalar_type() == q_in.scalar_type(),
                op, ": k_new/v_new must be (B, Hkv, S_new, D) in q's dtype");
  }
  at::Tensor bt;
  if (paged) {
    TORCH_CHECK(block_table->scalar_type() == at::kInt && block_table->dim() == 2 && block_table->size(0) == B,
                op, ": block_table must be int32 (B, max_pages)");
    bt = block_table->contiguous();
  }
  const int64_t max_pages = paged ? bt.size(1) : 1;
  const int64_t capacity = paged ? max_pages * page_size : page_size;
  at::Tensor rel;
  if (rel_bias.has_value()) {  // by distance over the capacity: position p, key t at t - p + capacity - 1
    const at::ScalarType want = q_in.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
    const int64_t L = std::max<int64_t>(Sq + capacity - 1, 0);
    TORCH_CHECK(rel_bias->scalar_type() == want && rel_bias->dim() == 2 && rel_bias->size(0) == Hq &&
                    rel_bias->size(1) == L,
                op, ": rel_bias must be ", want, " (Hq, Sq + cache capacity - 1) = (", Hq, ", ", L, "), got ",
                rel_bias->scalar_type(), " ", rel_bias->sizes());
    rel = rel_bias->contiguous();
  }
  auto host_longs = [&](const c10::optional<at::Tensor>& t, const char* name, int64_t fill) {
    if (!t.has_value()) return std::vector<int64_t>(static_cast<size_t>(B), fill);
    TORCH_CHECK(t->scalar_type() == at::kInt && t->dim() == 1 && t->size(0) == B, op, ": ", name,
                " must be int32 (B,)");
    const auto c = t->to(at::kLong).contiguous();
    return std::vector<int64_t>(c.const_data_ptr<int64_t>(), c.const_data_ptr<int64_t>() + B);
  };
  const std::vector<int64_t> start = host_longs(cache_seqlens, "cache_seqlens", 0);
  const std::vector<int64_t> leftpad = host_longs(cache_leftpad, "cache_leftpad", 0);
  std::vector<int64_t> rows = host_longs(cache_batch_idx, "cache_batch_idx", 0), lens(B);
  for (int64_t b = 0; b < B; ++b) {  // (validated in Python; re-checked here: memory safety)
    lens[b] = start[b] + S_new;
    TORCH_CHECK(start[b] >= 0 && lens[b] <= capacity, op, ": cache_seqlens[", b, "] out of range");
    TORCH_CHECK(leftpad[b] >= 0 && leftpad[b] <= start[b], op, ": cache_leftpad[", b, "] out of range");
    if (!remap) rows[b] = b;
    TORCH_CHECK(paged || (rows[b] >= 0 && rows[b] < k_cache.size(0)), op, ": cache_batch_idx[", b,
                "] out of range");
    for (int64_t p = 0; paged && p * page_size < lens[b]; ++p) {
      const int32_t pg = bt.const_data_ptr<int32_t>()[b * max_pages + p];
      TORCH_CHECK(pg >= 0 && pg < k_cache.size(0), op, ": block_table[", b, ", ", p, "] out of range");
    }
  }

  const auto q = q_in.stride(3) == 1 || D <= 1 ? q_in : q_in.contiguous();
  auto out = new_output(q.sizes(), q.scalar_type());
  auto lse = at::empty({B, Hq, Sq}, q.options().dtype(q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat));
  kvc::Args a{};
  a.q = q.const_data_ptr();
  a.q_b = q.stride(0), a.q_h = q.stride(1), a.q_s = q.stride(2);
  // (page, slot, head) strides; contiguous: the sequence is the page
  const int64_t kp = k_cache.stride(0), vp = v_cache.stride(0);
  a.k_page = kp, a.v_page = vp;
  a.k_slot = paged ? k_cache.stride(1) : k_cache.stride(2);
  a.v_slot = paged ? v_cache.stride(1) : v_cache.stride(2);
  a.k_head = paged ? k_cache.stride(2) : k_cache.stride(1);
  a.v_head = paged ? v_cache.stride(2) : v_cache.stride(1);
  a.block_table = paged ? bt.const_data_ptr<int32_t>() : nullptr;
  a.cache_row = rows.data();
  a.max_pages = max_pages, a.page_size = page_size;
  a.lens = lens.data();
  a.Hq = Hq, a.Sq = Sq, a.D = D, a.G = Hq / Hkv;
  a.scale = scale, a.softcap = softcap, a.left = window_left, a.right = window_right;
  at::Tensor sl;
  if (alibi_slopes.has_value()) {
    sl = alibi_slopes->to(at::kFloat).expand({B, Hq});
    a.slopes = sl.const_data_ptr<float>(), a.sl_b = sl.stride(0), a.sl_h = sl.stride(1);
  }
  if (rel.defined()) a.rel = rel.const_data_ptr(), a.rel_h = rel.stride(0), a.rel_cap = capacity;
  a.out = out.mutable_data_ptr();
  a.lse = lse.mutable_data_ptr();

  if (S_new > 0) {
    append(a, k_cache, *k_new, start, a.k_page, a.k_slot, a.k_head);
    append(a, v_cache, *v_new, start, a.v_page, a.v_slot, a.v_head);
  }
  a.k = k_cache.const_data_ptr();
  a.v = v_cache.const_data_ptr();
  if (out.numel() == 0) return {out, lse.fill_(-std::numeric_limits<double>::infinity())};

  // work items: (b, h, query block) groups, each one key range or several chunks of it
  const int64_t G = a.G, qb = std::max<int64_t>(1, kvc::kQueryRows / G);
  struct Group {
    int64_t b, h, nh, i0, i1, k0, k1;
  };
  std::vector<Group> groups;
  int64_t total_keys = 0;
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t i0 = 0; i0 < Sq; i0 += qb) {
      const int64_t i1 = std::min(Sq, i0 + qb);
      const int64_t p0 = lens[b] - Sq + i0, p1 = lens[b] - Sq + i1 - 1;  // positions
      // keys before cache_leftpad[b] are not part of the sequence (left padding)
      const int64_t k0 = std::max(leftpad[b], window_left >= 0 ? p0 - window_left : 0);
      int64_t k1 = window_right >= 0 ? std::min(lens[b], p1 + window_right + 1) : lens[b];
      k1 = std::max(k1, k0);
      const int64_t nh = std::max<int64_t>(1, std::min(Hkv, kvc::kQueryRows / (G * (i1 - i0))));
      for (int64_t h = 0; h < Hkv; h += nh) groups.push_back({b, h, std::min(nh, Hkv - h), i0, i1, k0, k1});
      total_keys += (k1 - k0) * Hkv;
    }
  }
  const int64_t threads = at::get_num_threads();
  const int64_t n_groups = static_cast<int64_t>(groups.size());
  int64_t chunk = std::numeric_limits<int64_t>::max();
  if (threads > 1 && n_groups < 2 * threads) {
    chunk = std::max(kvc::kMinChunk, (total_keys + 4 * threads - 1) / (4 * threads));
  }
  std::vector<kvc::Item> items;
  std::vector<std::pair<int64_t, int64_t>> splits;  // (first item, chunks) of each split range
  int64_t parts = 0;
  for (const Group& g : groups) {
    const int64_t n = g.k1 - g.k0, pieces = n > chunk ? (n + chunk - 1) / chunk : 1;
    if (pieces == 1) {
      items.push_back({g.b, g.h, g.nh, g.i0, g.i1, g.k0, g.k1, -1});
      continue;
    }
    splits.emplace_back(static_cast<int64_t>(items.size()), pieces);
    for (int64_t c = 0; c < pieces; ++c) {
      const int64_t c0 = g.k0 + n * c / pieces, c1 = g.k0 + n * (c + 1) / pieces;
      items.push_back({g.b, g.h, g.nh, g.i0, g.i1, c0, c1, parts++});
    }
  }
  // longest first, taken from a shared counter (ties keep their order: deterministic)
  std::vector<int64_t> order(items.size());
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int64_t x, int64_t y) {
    return (items[x].k1 - items[x].k0) * (items[x].i1 - items[x].i0) * items[x].nh >
           (items[y].k1 - items[y].k0) * (items[y].i1 - items[y].i0) * items[y].nh;
  });

  const Isa isa = active_isa();
  dispatch_kernel_types(q.scalar_type(), op, [&](auto tag) {
    using T = typename decltype(tag)::type;
    using A = acc_t<T>;
    const auto fn = TRUTHGPT_ISA_FN(isa, kvcache_items<T>);
    std::vector<A> pm(static_cast<size_t>(parts * kvc::kQueryRows)), pl(pm.size());
    std::vector<A> pacc(static_cast<size_t>(parts * kvc::kQueryRows * D));
    std::atomic<int64_t> next{0};
    const int64_t n_items = static_cast<int64_t>(items.size());
    at::parallel_for(0, std::min(threads, n_items), 1, [&](int64_t, int64_t) {
      std::vector<A> scratch(static_cast<size_t>(kvc::scratch_size(D)));
      for (int64_t i; (i = next.fetch_add(1)) < n_items;) {
        fn(a, items[order[i]], scratch.data(), pm.data(), pl.data(), pacc.data());
      }
    });
    if (parts > 0) merge_parts<T>(a, items, splits, pm.data(), pl.data(), pacc.data());
  });
  return {out, lse};
}

}  // namespace

TORCH_LIBRARY_IMPL(truthgpt, CPU, m) { m.impl("attention_with_kvcache_fwd", &attention_with_kvcache_fwd); }

}  // namespace truthgpt

#else  // ========================================== kernel section (once per instruction set)

// Prefetches rows [j0, j1) of D elements at p + j * ps.
template <class T>
inline void prefetch_rows(const T* p, int64_t ps, int64_t j0, int64_t j1, int64_t D) {
  constexpr int64_t kLine = 64 / static_cast<int64_t>(sizeof(T));
  for (int64_t j = j0; j < j1; ++j)
    for (int64_t d = 0; d < D; d += kLine) prefetch(p + j * ps + d);
}

// Scores of R query rows (qr, row stride dp; all of one kv head) against the keys [j0, j1) at
// k + j * ks, two keys at a time (2R accumulators, each key vector loaded once per two keys):
// s[r * kKeyBlock + j]. pf (or null): per key j < pn, the row pf + j * ps (its value) and the
// key kKeyAhead ahead are prefetched.
template <int R, class T, class A>
inline void kvcache_scores(const A* qr, int64_t dp, const T* k, int64_t ks, int64_t j0, int64_t j1, int64_t D,
                           A* s, const T* pf, int64_t ps, int64_t pn) {
  using V = VecFor<T>;
  constexpr int64_t W = V::W;
  int64_t j = j0;
  for (; j + 2 <= j1; j += 2) {
    const T* ka = k + j * ks;
    const T* kb = ka + ks;
    if (pf != nullptr) {
      prefetch_rows(pf, ps, j, std::min(j + 2, pn), D);
      prefetch_rows(k, ks, j + kvc::kKeyAhead, std::min(j + kvc::kKeyAhead + 2, pn), D);
    }
    V x[R], y[R];
    for (int r = 0; r < R; ++r) x[r] = y[r] = V::zero();
    for (int64_t d = 0; d < D; d += W) {
      const V u = V::load(ka + d, D - d), w = V::load(kb + d, D - d);
      for (int r = 0; r < R; ++r) {
        const V qv = V::load(qr + r * dp + d, D - d);
        x[r] = V::fma(qv, u, x[r]);
        y[r] = V::fma(qv, w, y[r]);
      }
    }
    for (int r = 0; r < R; ++r) {
      s[r * kvc::kKeyBlock + j] = x[r].hsum();
      s[r * kvc::kKeyBlock + j + 1] = y[r].hsum();
    }
  }
  if (j < j1) {
    const T* ka = k + j * ks;
    if (pf != nullptr) prefetch_rows(pf, ps, j, std::min(j + 1, pn), D);
    V x[R];
    for (int r = 0; r < R; ++r) x[r] = V::zero();
    for (int64_t d = 0; d < D; d += W) {
      const V u = V::load(ka + d, D - d);
      for (int r = 0; r < R; ++r) x[r] = V::fma(V::load(qr + r * dp + d, D - d), u, x[r]);
    }
    for (int r = 0; r < R; ++r) s[r * kvc::kKeyBlock + j] = x[r].hsum();
  }
}

// acc rows (stride dp) += p rows (stride kKeyBlock) times the values [j0, j1) at v + j * vs:
// R rows x W columns held in registers over the keys, in key order (deterministic). pf (or
// null): the rows pf + j * ps, j < pn, are prefetched a cache line per column step.
template <int R, class T, class A>
inline void kvcache_pv(A* acc, int64_t dp, const A* p, const T* v, int64_t vs, int64_t j0, int64_t j1, int64_t D,
                       const T* pf, int64_t ps, int64_t pn) {
  using V = VecFor<T>;
  constexpr int64_t W = V::W;
  constexpr int64_t kLine = 64 / static_cast<int64_t>(sizeof(T));
  const int64_t pj1 = pf != nullptr ? std::min(j1, pn) : j0;
  for (int64_t d = 0; d < D; d += W) {
    if (d % kLine == 0)
      for (int64_t j = j0; j < pj1; ++j) prefetch(pf + j * ps + d);
    V t[R];
    for (int i = 0; i < R; ++i) t[i] = V::load(acc + i * dp + d, D - d);
    for (int64_t j = j0; j < j1; ++j) {
      const V vv = V::load(v + j * vs + d, D - d);
      for (int i = 0; i < R; ++i) t[i] = V::fma(V::set1(p[i * kvc::kKeyBlock + j]), vv, t[i]);
    }
    for (int i = 0; i < R; ++i) t[i].store(acc + i * dp + d, D - d);
  }
}

template <class T>
void kvcache_items(const kvc::Args& a, const kvc::Item& it, acc_t<T>* scratch, acc_t<T>* pm, acc_t<T>* pl,
                   acc_t<T>* pacc) {
  using A = acc_t<T>;
  using V = VecFor<T>;
  constexpr int64_t W = V::W;
  constexpr int64_t KB = kvc::kKeyBlock;
  constexpr A kNegInf = -std::numeric_limits<A>::infinity();
  const int64_t D = a.D, dp = kvc::padded_dim(D), G = a.G, nq = it.i1 - it.i0, hrows = nq * G;
  const int64_t rows = hrows * it.nh;
  const int64_t L = a.lens[it.b];
  A* qbuf = scratch;                        // rows x dp, scaled queries
  A* acc = qbuf + kvc::kQueryRows * dp;     // rows x dp
  A* s = acc + kvc::kQueryRows * dp;        // rows x KB scores, then probabilities
  A* m = s + kvc::kQueryRows * KB;
  A* l = m + kvc::kQueryRows;
  // row r: query head h * G + r / nq, query i0 + r % nq at position L - Sq + i
  const T* q = static_cast<const T*>(a.q);
  const V vscale = V::set1(static_cast<A>(a.scale));
  for (int64_t r = 0; r < rows; ++r) {
    const T* qr = q + it.b * a.q_b + (it.h * G + r / nq) * a.q_h + (it.i0 + r % nq) * a.q_s;
    for (int64_t d = 0; d < D; d += W) (V::load(qr + d, D - d) * vscale).store(qbuf + r * dp + d, D - d);
    for (int64_t d = 0; d < D; ++d) acc[r * dp + d] = A(0);
    m[r] = kNegInf;
    l[r] = A(0);
  }
  const T* kc = static_cast<const T*>(a.k);
  const T* vc = static_cast<const T*>(a.v);
  const A softcap = static_cast<A>(a.softcap);
  // Keys are walked in the order of the cache's memory, in tiles of keys x one head: a paged
  // cache holds the heads of one slot side by side (slot-major: tiles of kSlotTile keys, each
  // across all heads, so a page is read front to back), a contiguous cache the keys of one head
  // (head-major: each head across the whole block). The scores prefetch their tile's values
  // and the keys kKeyAhead ahead, P V the next block's keys, a few rows per tile step (a burst
  // of prefetches would overflow the miss buffers).
  const bool slot_major = a.k_slot > a.k_head;
  const int64_t tile = slot_major ? kvc::kSlotTile : KB;
  for (int64_t k0 = it.k0; k0 < it.k1;) {
    const int64_t slot = k0 % a.page_size;
    const int64_t n = std::min({KB, a.page_size - slot, it.k1 - k0});
    const int64_t pg = k0 / a.page_size;
    const int64_t page = a.block_table == nullptr ? a.cache_row[it.b] : a.block_table[it.b * a.max_pages + pg];
    // the next block: its keys are prefetched while this block's values are multiplied
    const int64_t k0n = k0 + n;
    const int64_t nn = std::min({KB, a.page_size - k0n % a.page_size, it.k1 - k0n});
    const T* kpn = nullptr;
    if (nn > 0) {
      const int64_t pn = k0n % a.page_size != 0 || a.block_table == nullptr
                             ? page : a.block_table[it.b * a.max_pages + pg + 1];
      kpn = kc + pn * a.k_page + (k0n % a.page_size) * a.k_slot + it.h * a.k_head;
    }
    // fn(head hh, rows [r, r1) of the head, keys [j0, j1)) over the tiles in memory order
    const int64_t n_tiles = (n + tile - 1) / tile;
    const int64_t outer = slot_major ? n_tiles : it.nh, inner = slot_major ? it.nh : n_tiles;
    auto for_tiles = [&](auto&& fn) {
      for (int64_t o = 0; o < outer; ++o) {
        for (int64_t i = 0; i < inner; ++i) {
          const int64_t hh = slot_major ? i : o, j0 = (slot_major ? o : i) * tile;
          fn(hh, hh * hrows, (hh + 1) * hrows, j0, std::min(n, j0 + tile));
        }
      }
    };
    for_tiles([&](int64_t hh, int64_t r, int64_t r1, int64_t j0, int64_t j1) {
      const T* kh = kc + page * a.k_page + slot * a.k_slot + (it.h + hh) * a.k_head;
      const T* pf = vc + page * a.v_page + slot * a.v_slot + (it.h + hh) * a.v_head;  // this tile's values
      for (; r + 4 <= r1; r += 4, pf = nullptr)
        kvcache_scores<4>(qbuf + r * dp, dp, kh, a.k_slot, j0, j1, D, s + r * KB, pf, a.v_slot, n);
      for (; r < r1; ++r, pf = nullptr)
        kvcache_scores<1>(qbuf + r * dp, dp, kh, a.k_slot, j0, j1, D, s + r * KB, pf, a.v_slot, n);
    });
    // per row: softcap, ALiBi, T5 bias, window mask, then the online-softmax step
    for (int64_t r = 0; r < rows; ++r) {
      A* sr = s + r * KB;
      const int64_t pos = L - a.Sq + it.i0 + r % nq, hq = it.h * G + r / nq;
      const A slope = a.slopes == nullptr ? A(0) : static_cast<A>(a.slopes[it.b * a.sl_b + hq * a.sl_h]);
      // the bias of key t at rel[t] (t - pos + S_cap - 1 >= 0: pos < L <= S_cap)
      const A* rel = a.rel == nullptr ? nullptr
                                      : static_cast<const A*>(a.rel) + hq * a.rel_h + (a.rel_cap - 1 - pos);
      A mx = kNegInf;
      bool nan = false;
      for (int64_t j = 0; j < n; ++j) {
        const int64_t t = k0 + j;
        A x = sr[j];
        if (softcap > 0) x = softcap * std::tanh(x / softcap);
        if (a.slopes != nullptr) x -= slope * static_cast<A>(pos > t ? pos - t : t - pos);
        if (rel != nullptr) x += rel[t];
        const bool vis = (a.left < 0 || t >= pos - a.left) && (a.right < 0 || t <= pos + a.right);
        x = vis ? x : kNegInf;
        sr[j] = x;
        nan |= x != x;
        mx = x > mx ? x : mx;
      }
      const A m_new = nan || m[r] != m[r] ? std::numeric_limits<A>::quiet_NaN() : std::max(m[r], mx);
      if (m_new == kNegInf) {  // nothing visible yet: p = 0 for this block
        for (int64_t j = 0; j < n; ++j) sr[j] = A(0);
        continue;
      }
      const A alpha = std::exp(m[r] - m_new);
      const V vm = V::set1(m_new);
      for (int64_t j = 0; j < n; j += W) V::exp(V::load(sr + j, n - j) - vm).store(sr + j, n - j);
      A sum = 0;
      for (int64_t j = 0; j < n; ++j) {
        const int64_t t = k0 + j;
        const bool vis = (a.left < 0 || t >= pos - a.left) && (a.right < 0 || t <= pos + a.right);
        sr[j] = vis ? sr[j] : A(0);  // (the polynomial exp of -inf is tiny, not 0)
        sum += sr[j];
      }
      l[r] = l[r] * alpha + sum;
      if (alpha != A(1)) {
        const V va = V::set1(alpha);
        for (int64_t d = 0; d < D; d += W) (V::load(acc + r * dp + d, D - d) * va).store(acc + r * dp + d, D - d);
      }
      m[r] = m_new;
    }
    // acc += P V, in the same order
    for_tiles([&](int64_t hh, int64_t r, int64_t r1, int64_t j0, int64_t j1) {
      const T* vh = vc + page * a.v_page + slot * a.v_slot + (it.h + hh) * a.v_head;
      const T* pf = kpn != nullptr ? kpn + hh * a.k_head : nullptr;  // next block's keys
      for (; r + 4 <= r1; r += 4, pf = nullptr)
        kvcache_pv<4>(acc + r * dp, dp, s + r * KB, vh, a.v_slot, j0, j1, D, pf, a.k_slot, nn);
      for (; r + 2 <= r1; r += 2, pf = nullptr)
        kvcache_pv<2>(acc + r * dp, dp, s + r * KB, vh, a.v_slot, j0, j1, D, pf, a.k_slot, nn);
      for (; r < r1; ++r, pf = nullptr)
        kvcache_pv<1>(acc + r * dp, dp, s + r * KB, vh, a.v_slot, j0, j1, D, pf, a.k_slot, nn);
    });
    k0 += n;
  }
  if (it.part >= 0) {  // a chunk of a split range: keep (max, sum, acc) for the merge
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t sl = it.part * kvc::kQueryRows + r;
      pm[sl] = m[r];
      pl[sl] = l[r];
      for (int64_t d = 0; d < D; ++d) pacc[sl * D + d] = acc[r * dp + d];
    }
    return;
  }
  T* out = static_cast<T*>(a.out);
  A* lse = static_cast<A*>(a.lse);
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t row = (it.b * a.Hq + it.h * G + r / nq) * a.Sq + it.i0 + r % nq;
    T* o = out + row * D;
    lse[row] = l[r] == A(0) ? kNegInf : m[r] + std::log(l[r]);
    if (l[r] == A(0)) {
      for (int64_t d = 0; d < D; ++d) o[d] = from_acc<T>(A(0));
      continue;
    }
    const V inv = V::set1(A(1) / l[r]);
    for (int64_t d = 0; d < D; d += W) (V::load(acc + r * dp + d, D - d) * inv).store(o + d, D - d);
  }
}

#endif  // TRUTHGPT_KERNEL_SECTION
