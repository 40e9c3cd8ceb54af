// truthgpt::attention_with_kvcache_fwd for a device without its own KV-cache kernel (CUDA): per
// sequence, append k_new / v_new into the cache in place, gather the sequence's cached keys
// (contiguous slice, or its pages through block_table) and run that device's dense attention
// kernel (truthgpt::attention_fwd, reached through the dispatcher) on them. Bottom-right
// alignment of the dense kernel puts query i at L_b - Sq + i, L_b = cache_seqlens[b] + S_new,
// which is the op's contract; cache_leftpad[b] drops the first keys (the alignment counts from the
// end, so it is unchanged), cache_batch_idx[b] picks the cache row of a contiguous cache. The T5
// bias by distance over the cache capacity S_cap, (Hq, Sq + S_cap - 1) (entry j - i' + S_cap - 1),
// is narrowed to the dense kernel's (Hq, Sq + Sk - 1) of keys [leftpad, L_b), Sk = L_b - leftpad
// (entry j - leftpad - i + Sq - 1): a view from column S_cap - Sk, no copy. The rows' lse comes
// from the dense kernel. Inputs are validated in Python before any kernel runs
// (truthgpt_kernels/ops/attention_with_kvcache.py): shapes, dtypes, lengths within capacity,
// block_table entries inside the page pool.
#pragma once
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <tuple>
#include <vector>

namespace truthgpt {
namespace kvcache {

using Opt = c10::optional<at::Tensor>;
using DenseFwd = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&, double,
                                                    int64_t, int64_t, const Opt&, const Opt&, int64_t, const Opt&,
                                                    double, const Opt&, double, const Opt&);

inline std::vector<int64_t> host_ints(const at::Tensor& t) {
  const at::Tensor c = t.to(at::kCPU, at::kLong).contiguous();
  const int64_t* p = c.const_data_ptr<int64_t>();
  return std::vector<int64_t>(p, p + c.numel());
}

// Page and slot (int64, on the cache's device) of tokens [start, start + n) of sequence b.
inline std::tuple<at::Tensor, at::Tensor> slots(const at::Tensor& block_table, int64_t b, int64_t start, int64_t n,
                                                int64_t page_size) {
  const at::Tensor pos = at::arange(start, start + n, block_table.options().dtype(at::kLong));
  const at::Tensor page = block_table.select(0, b).to(at::kLong).index_select(0, at::floor_divide(pos, page_size));
  return {page, at::remainder(pos, page_size)};
}

inline std::tuple<at::Tensor, at::Tensor> fwd(const at::Tensor& q, at::Tensor& k_cache, at::Tensor& v_cache,
                                              const at::Tensor& cache_seqlens, const Opt& block_table,
                                              const Opt& k_new, const Opt& v_new, const Opt& cache_batch_idx,
                                              const Opt& cache_leftpad, double scale, int64_t window_left,
                                              int64_t window_right, const Opt& alibi, double softcap,
                                              const Opt& rel_bias) {
  static const auto dense =
      c10::Dispatcher::singleton().findSchemaOrThrow("truthgpt::attention_fwd", "").typed<DenseFwd>();
  const bool paged = block_table.has_value();
  const std::vector<int64_t> lens = host_ints(cache_seqlens);
  const int64_t B = q.size(0), S_new = k_new.has_value() ? k_new->size(2) : 0;
  const int64_t page_size = paged ? k_cache.size(1) : 0;
  const int64_t Hq = q.size(1), Sq = q.size(2);
  const int64_t capacity = paged ? block_table->size(1) * page_size : k_cache.size(2);  // S_cap
  const int64_t rel_len = std::max<int64_t>(Sq + capacity - 1, 0);
  TORCH_CHECK(!rel_bias.has_value() ||
                  (rel_bias->dim() == 2 && rel_bias->size(0) == Hq && rel_bias->size(1) == rel_len),
              "attention_with_kvcache_fwd: rel_bias must be (Hq, Sq + cache capacity - 1) = (", Hq, ", ", rel_len,
              "), got ", rel_bias.has_value() ? rel_bias->sizes() : at::IntArrayRef());
  std::vector<int64_t> rows(static_cast<size_t>(B)), leftpad(static_cast<size_t>(B), 0);
  if (cache_batch_idx.has_value()) rows = host_ints(*cache_batch_idx);
  else for (int64_t b = 0; b < B; ++b) rows[b] = b;
  if (cache_leftpad.has_value()) leftpad = host_ints(*cache_leftpad);
  at::Tensor out = at::zeros(q.sizes(), q.options());
  at::Tensor lse = at::full({B, Hq, Sq}, -std::numeric_limits<double>::infinity(),
                            q.options().dtype(q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat));
  for (int64_t b = 0; b < B; ++b) {
    const int64_t L = lens[b] + S_new, row = rows[b], lp = leftpad[b];
    if (S_new > 0) {  // append in place: (Hkv, S_new, D) rows at positions lens[b] ..
      if (paged) {
        auto [page, slot] = slots(*block_table, b, lens[b], S_new, page_size);
        k_cache.index_put_({page, slot}, k_new->select(0, b).transpose(0, 1));
        v_cache.index_put_({page, slot}, v_new->select(0, b).transpose(0, 1));
      } else {
        k_cache.select(0, row).narrow(1, lens[b], S_new).copy_(k_new->select(0, b));
        v_cache.select(0, row).narrow(1, lens[b], S_new).copy_(v_new->select(0, b));
      }
    }
    const int64_t Sk = L - lp;
    if (Sk <= 0 || Sq == 0) continue;
    at::Tensor k, v;
    if (paged) {  // (L, Hkv, D) gathered from the pages -> (1, Hkv, L, D)
      const int64_t n_pages = (L + page_size - 1) / page_size;
      const at::Tensor pages = block_table->select(0, b).narrow(0, 0, n_pages).to(at::kLong);
      k = k_cache.index_select(0, pages).flatten(0, 1).narrow(0, lp, Sk).transpose(0, 1).unsqueeze(0);
      v = v_cache.index_select(0, pages).flatten(0, 1).narrow(0, lp, Sk).transpose(0, 1).unsqueeze(0);
    } else {
      k = k_cache.narrow(0, row, 1).narrow(2, lp, Sk);
      v = v_cache.narrow(0, row, 1).narrow(2, lp, Sk);
    }
    const Opt slopes = alibi.has_value() ? Opt(alibi->narrow(0, b, 1)) : Opt();
    // the dense entry of (i, j), j - lp - i + Sq - 1, is entry j - i' + S_cap - 1 (i' = L - Sq + i) of
    // rel_bias less S_cap - Sk: the columns [S_cap - Sk, S_cap + Sq - 1)
    const Opt rel = rel_bias.has_value() ? Opt(rel_bias->narrow(1, capacity - Sk, Sq + Sk - 1)) : Opt();
    auto [o, l] = dense.call(q.narrow(0, b, 1), k, v, scale, window_left, window_right, slopes, Opt(), 64, Opt(),
                             softcap, rel, 0.0, Opt());
    out.narrow(0, b, 1).copy_(o);
    lse.narrow(0, b, 1).copy_(l.view({1, Hq, Sq}));
  }
  return {out, lse};
}

}  // namespace kvcache
}  // namespace truthgpt
