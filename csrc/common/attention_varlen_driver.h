// truthgpt::attention_varlen_fwd / _bwd for one device: packed (total, heads, head_dim)
// sequences run one after another through that device's dense kernels
// (truthgpt::attention_fwd / _bwd, reached through the dispatcher) on strided per-sequence
// views; nothing is padded and no (total x total) mask exists. Included by
// csrc/cpu/attention_varlen.cpp (CPU) and csrc/cuda/attention_varlen_binding.cpp (CUDA).
//
// Inputs are validated in Python (truthgpt_kernels/ops/attention_varlen.py) before any kernel
// runs: cu_seqlens int32 (B + 1,), 0 first, non-decreasing, last = total; alibi float32 (B, Hq).
// A sequence's outputs are written into its rows of the packed outputs; sequences with no
// query rows are skipped, sequences with no keys give zero rows, lse -inf and zero gradients.
// rel_bias: sequence b reads (and its gradient lands in) its slice of the call's one bias by
// distance (rel_slice). Dropout: sequence b runs the dense kernel's Philox stream on its own (1, Hq, len_q, len_k)
// scores with key seq_seed(seed, b) (a Weyl step per sequence), so sequences never share words
// and a one-sequence batch draws what tk.attention draws with the same seed.
#pragma once
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <cstdint>
#include <limits>
#include <optional>
#include <tuple>
#include <vector>

namespace truthgpt {
namespace varlen {

using Opt = c10::optional<at::Tensor>;
using FwdFn = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&, double,
                                                 int64_t, int64_t, const Opt&, const Opt&, int64_t, const Opt&,
                                                 double, const Opt&, double, const Opt&);
using BwdFn = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
    double, int64_t, int64_t, const Opt&, const Opt&, int64_t, const Opt&, double, const Opt&, double, const Opt&);

// Cumulative lengths on the host (one copy; a device sync for CUDA tensors).
inline std::vector<int64_t> host_offsets(const at::Tensor& cu) {
  const at::Tensor c = cu.to(at::kCPU, at::kLong).contiguous();
  const int64_t* p = c.const_data_ptr<int64_t>();
  return std::vector<int64_t>(p, p + c.numel());
}

// (1, H, len, D) view of rows [start, start + len) of a packed (total, H, D) tensor.
inline at::Tensor seq_view(const at::Tensor& t, int64_t start, int64_t len) {
  return t.narrow(0, start, len).transpose(0, 1).unsqueeze(0);
}

inline Opt slopes_of(const Opt& alibi, int64_t b) {
  return alibi.has_value() ? Opt(alibi->narrow(0, b, 1)) : Opt();
}

// Sequence (nq, nk)'s bias by distance (Hq, nq + nk - 1) in the call's one vector
// (Hq, max_q + max_k - 1) whose entry (j - i') + max_k - 1 holds distance j - i': its columns
// from max_k - nk (the lengths are checked against max_q / max_k in Python).
inline at::Tensor rel_slice(const at::Tensor& rel, int64_t max_k, int64_t nq, int64_t nk) {
  return rel.narrow(1, max_k - nk, nq + nk - 1);
}
inline Opt rel_of(const Opt& rel, int64_t max_k, int64_t nq, int64_t nk) {
  return rel.has_value() ? Opt(rel_slice(*rel, max_k, nq, nk)) : Opt();
}

// The dropout key of sequence b: seed + b * 0x9E3779B97F4A7C15 (mod 2^64), as a one-element CPU
// int64 tensor (the dense kernels' dropout_seed); none without dropout.
inline Opt seq_seed(double dropout_p, const Opt& seed, int64_t b) {
  if (dropout_p <= 0 || !seed.has_value()) return Opt();
  const uint64_t key = static_cast<uint64_t>(seed->item<int64_t>()) + static_cast<uint64_t>(b) * 0x9E3779B97F4A7C15ull;
  return Opt(at::scalar_tensor(static_cast<int64_t>(key), at::TensorOptions().dtype(at::kLong)));
}

inline std::tuple<at::Tensor, at::Tensor> fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                              const at::Tensor& cu_q, const at::Tensor& cu_k, int64_t /*max_q*/,
                                              int64_t max_k, double scale, int64_t window_left,
                                              int64_t window_right, const Opt& alibi, double softcap,
                                              const Opt& rel_bias, double dropout_p, const Opt& dropout_seed) {
  static const auto dense =
      c10::Dispatcher::singleton().findSchemaOrThrow("truthgpt::attention_fwd", "").typed<FwdFn>();
  const std::vector<int64_t> oq = host_offsets(cu_q), ok = host_offsets(cu_k);
  at::Tensor out = at::zeros(q.sizes(), q.options());
  at::Tensor lse = at::full({q.size(1), q.size(0)}, -std::numeric_limits<float>::infinity(),
                            q.options().dtype(q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat));
  for (size_t b = 0; b + 1 < oq.size(); ++b) {
    const int64_t q0 = oq[b], nq = oq[b + 1] - oq[b], k0 = ok[b], nk = ok[b + 1] - ok[b];
    if (nq == 0 || nk == 0) continue;
    auto [o, l] = dense.call(seq_view(q, q0, nq), seq_view(k, k0, nk), seq_view(v, k0, nk), scale, window_left,
                             window_right, slopes_of(alibi, static_cast<int64_t>(b)), Opt(), 64, Opt(), softcap,
                             rel_of(rel_bias, max_k, nq, nk), dropout_p,
                             seq_seed(dropout_p, dropout_seed, static_cast<int64_t>(b)));
    out.narrow(0, q0, nq).copy_(o.select(0, 0).transpose(0, 1));
    lse.narrow(1, q0, nq).copy_(l.select(0, 0));
  }
  return {out, lse};
}

inline std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bwd(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const at::Tensor& cu_q, const at::Tensor& cu_k, int64_t /*max_q*/, int64_t max_k,
    double scale, int64_t window_left, int64_t window_right, const Opt& alibi, double softcap, const Opt& rel_bias,
    double dropout_p, const Opt& dropout_seed) {
  static const auto dense =
      c10::Dispatcher::singleton().findSchemaOrThrow("truthgpt::attention_bwd", "").typed<BwdFn>();
  const std::vector<int64_t> oq = host_offsets(cu_q), ok = host_offsets(cu_k);
  at::Tensor dq = at::zeros(q.sizes(), q.options());
  at::Tensor dk = at::zeros(k.sizes(), k.options());
  at::Tensor dv = at::zeros(v.sizes(), v.options());
  at::Tensor drel = rel_bias.has_value() ? at::zeros(rel_bias->sizes(), rel_bias->options())
                                         : at::empty({0}, q.options().dtype(at::kFloat));
  for (size_t b = 0; b + 1 < oq.size(); ++b) {
    const int64_t q0 = oq[b], nq = oq[b + 1] - oq[b], k0 = ok[b], nk = ok[b + 1] - ok[b];
    if (nq == 0 || nk == 0) continue;
    auto [gq, gk, gv, gr] = dense.call(seq_view(grad_out, q0, nq), seq_view(q, q0, nq), seq_view(k, k0, nk),
                                   seq_view(v, k0, nk), seq_view(out, q0, nq), lse.narrow(1, q0, nq).unsqueeze(0),
                                   scale, window_left, window_right, slopes_of(alibi, static_cast<int64_t>(b)),
                                   Opt(), 64, Opt(), softcap, rel_of(rel_bias, max_k, nq, nk), dropout_p,
                                   seq_seed(dropout_p, dropout_seed, static_cast<int64_t>(b)));
    dq.narrow(0, q0, nq).copy_(gq.select(0, 0).transpose(0, 1));
    dk.narrow(0, k0, nk).copy_(gk.select(0, 0).transpose(0, 1));
    dv.narrow(0, k0, nk).copy_(gv.select(0, 0).transpose(0, 1));
    if (rel_bias.has_value()) rel_slice(drel, max_k, nq, nk).add_(gr);
  }
  return {dq, dk, dv, drel};
}

}  // namespace varlen
}  // namespace truthgpt
