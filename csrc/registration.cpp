// Every kernel-level op schema of the truthgpt namespace, in one block. Kernels register
// per device in csrc/cpu/<op>.cpp (CPU) and csrc/cuda/<op>_binding.cpp (CUDA); the public,
// autograd-aware ops (truthgpt::attention, truthgpt::swiglu, ...) are defined in Python
// (truthgpt_kernels/ops/<op>.py) and call these through truthgpt_kernels/backends.py.
//
// Conventions (normalised and validated in Python before any kernel runs):
//   attention: q (B,Hq,Sq,D), k/v (B,Hkv,Sk,D), any strides. Causal is folded into the window:
//     key j visible for query i iff  i'-window_left <= j <= i'+window_right  (-1 = unbounded),
//     i' = i + Sk - Sq. alibi_slopes float32 (B,Hq); block_mask bool (B,Hq,ceil(Sq/bs),ceil(Sk/bs));
//     key_mask bool (B,Sk); all may be broadcast views (stride 0). lse float32 (B,Hq,Sq).
//     rel_bias float32 (float64 for float64 q) (Hq, Sq+Sk-1), contiguous: the relative-position bias by distance,
//     score(i,j) += rel_bias[h, j - i + Sq - 1] (after softcap, like ALiBi; T5 buckets are
//     gathered into it in Python); the backward's 4th output is its gradient (sum over the
//     batch; an empty tensor when rel_bias is None). dropout_p in [0,1): P is multiplied by
//     keep/(1-p) before P V (lse is of the undropped P); keep(b,h,i,j) = philox_word(seed, e)
//     >= floor(p 2^32), e = ((b Hq + h) Sq + i) Sk + j (csrc/common/philox.h); dropout_seed
//     int64 0-dim CPU tensor (None only when dropout_p == 0).
//   rotary: position_ids int64 (B,S) (may be a broadcast view); cos/sin (P, R/2).
//   rms_norm: rstd float32 of x.shape[:-1]; dweight is an empty tensor when weight is None.
//   add_rms_norm: h = residual + x in residual's dtype (x's dtype, or float32 with bf16/fp16 x),
//     out = rms_norm(h) in x's dtype; returns (out, h, rstd). The backward takes grad (of out)
//     and grad_residual (of h, or None) and returns (dh in h's dtype, dx in x_dtype: empty when
//     that is h's dtype, dweight).
//   linear_cross_entropy: x (N,d), weight (V,d), bias (V,), target int64 (N,). Returns per-row
//     (loss, z-loss term) in float32 (float64 for float64 x), 0 on ignored rows, and when
//     grad_scale (N,) is given the gradients (dx, dweight, dbias) of sum_i grad_scale_i loss_i
//     (dweight/dbias empty unless need_dweight and a bias); chunk_size 0 = auto.
//   cross_entropy: logits (N,V) (unit inner stride, or copied), target int64 (N,). Returns per-row
//     (loss, z-loss term) as linear_cross_entropy's (float32; float64 for float64 logits), and
//     when grad_scale (N,) is given, in a new (N,V) tensor of logits' dtype, the gradient of
//     sum_i grad_scale_i loss_i w.r.t. the logits (else an empty tensor); logits are not written.
//   cross_entropy_grad_: that gradient written over the logits (N,V) themselves (unit inner
//     stride), no (N,V) buffer: flash-attn's inplace_backward.
//   layer_norm: mean, rstd of x.shape[:-1], float32 (float64 for float64 x); weight and bias
//     have x's dtype or float32; dweight / dbias are empty tensors when weight / bias is None.
//   attention_varlen: q (Tq,Hq,D), k/v (Tk,Hkv,D) packed, cu_seqlens int32 (B+1,) (0 first,
//     non-decreasing, last = total), per-sequence semantics of attention; alibi_slopes float32
//     (B,Hq); lse float32 (Hq,Tq). rel_bias: one bias by distance (Hq, max_seqlen_q +
//     max_seqlen_k - 1), entry (j - i') + max_seqlen_k - 1 (sequence b's dense vector is its
//     columns max_seqlen_k - len_k ..); the backward returns its gradient (else an empty tensor).
//     Dropout: sequence b draws attention's Philox stream of its
//     own (1,Hq,len_q,len_k) scores with key dropout_seed + b * 0x9E3779B97F4A7C15 (mod 2^64).
//   geglu: approximate is "tanh" or "none" (erf), as F.gelu.
//   swiglu_bwd_packed / geglu_bwd_packed: gate_up (..., 2n) holds the [gate | up] halves (a
//     fused gate-up projection's output), grad (..., n); returns the (..., 2n) gradient of
//     gate_up in one tensor (CPU only; elsewhere the two halves of *_bwd are concatenated).
//   embedding_bwd: grad (*, d) float32/float64, indices (*) int32/int64 in [0, num_weights);
//     returns the (num_weights, d) gradient of the weight of F.embedding (rows == padding_idx
//     get nothing; padding_idx -1: none). CPU only (elsewhere aten::embedding_dense_backward).
//   linear: x (M,K), weight (N,K), bias (N,), one dtype; y = x weight^T + bias (M,N). The
//     backward takes grad (M,N) and returns (dx, dweight, dbias), each empty when not asked for.
//   attention_with_kvcache: cache (B,Hkv,S_max,D), or paged (num_pages,page_size,Hkv,D) with
//     block_table int32 (B,max_pages); cache_seqlens int32 (B,); k_new/v_new (B,Hkv,S_new,D) are
//     written into k_cache/v_cache (mutated) at cache_seqlens first; window as attention with
//     i' = i + L_b - Sq, L_b = cache_seqlens[b] + S_new. cache_batch_idx int32 (B,) (contiguous
//     cache only): sequence b uses cache row cache_batch_idx[b]; cache_leftpad int32 (B,): keys
//     before cache_leftpad[b] are not attended. rel_bias: T5 bias by distance over the cache
//     capacity S_cap (S_max, or max_pages*page_size), (Hq, Sq+S_cap-1) float32 (float64 for
//     float64): the score of query i and key j gets rel_bias[h, j - i' + S_cap - 1]. Returns out
//     (B,Hq,Sq,D) and lse (B,Hq,Sq) (float32; float64 for float64), -inf for a row with no
//     visible key.
#include <torch/library.h>

TORCH_LIBRARY(truthgpt, m) {
  m.def("swiglu_fwd(Tensor gate, Tensor up) -> Tensor");
  m.def("swiglu_bwd(Tensor grad, Tensor gate, Tensor up) -> (Tensor, Tensor)");
  m.def("swiglu_bwd_packed(Tensor grad, Tensor gate_up) -> Tensor");
  m.def("rms_norm_fwd(Tensor x, Tensor? weight, float eps) -> (Tensor, Tensor)");
  m.def("rms_norm_bwd(Tensor grad, Tensor x, Tensor? weight, Tensor rstd) -> (Tensor, Tensor)");
  m.def("add_rms_norm_fwd(Tensor x, Tensor residual, Tensor? weight, float eps) -> (Tensor, Tensor, Tensor)");
  m.def("add_rms_norm_bwd(Tensor grad, Tensor? grad_residual, Tensor h, Tensor? weight, Tensor rstd, "
        "ScalarType x_dtype) -> (Tensor, Tensor, Tensor)");
  m.def("layer_norm_fwd(Tensor x, Tensor? weight, Tensor? bias, float eps) -> (Tensor, Tensor, Tensor)");
  m.def("layer_norm_bwd(Tensor grad, Tensor x, Tensor? weight, Tensor? bias, Tensor mean, "
        "Tensor rstd) -> (Tensor, Tensor, Tensor)");
  m.def("geglu_fwd(Tensor gate, Tensor up, str approximate) -> Tensor");
  m.def("geglu_bwd(Tensor grad, Tensor gate, Tensor up, str approximate) -> (Tensor, Tensor)");
  m.def("geglu_bwd_packed(Tensor grad, Tensor gate_up, str approximate) -> Tensor");
  m.def("rotary_fwd(Tensor x, Tensor cos, Tensor sin, Tensor position_ids, bool interleaved) -> Tensor");
  m.def("rotary_qk_fwd(Tensor q, Tensor k, Tensor cos, Tensor sin, Tensor position_ids, "
        "bool interleaved) -> (Tensor, Tensor)");
  m.def("attention_fwd(Tensor q, Tensor k, Tensor v, float scale, int window_left, "
        "int window_right, Tensor? alibi_slopes, Tensor? block_mask, int block_size, "
        "Tensor? key_mask, float softcap, Tensor? rel_bias, float dropout_p, "
        "Tensor? dropout_seed) -> (Tensor, Tensor)");
  m.def("attention_bwd(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
        "float scale, int window_left, int window_right, Tensor? alibi_slopes, "
        "Tensor? block_mask, int block_size, Tensor? key_mask, float softcap, Tensor? rel_bias, "
        "float dropout_p, Tensor? dropout_seed) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("attention_varlen_fwd(Tensor q, Tensor k, Tensor v, Tensor cu_seqlens_q, Tensor cu_seqlens_k, "
        "int max_seqlen_q, int max_seqlen_k, float scale, int window_left, int window_right, "
        "Tensor? alibi_slopes, float softcap, Tensor? rel_bias, float dropout_p, Tensor? dropout_seed) "
        "-> (Tensor, Tensor)");
  m.def("attention_varlen_bwd(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
        "Tensor cu_seqlens_q, Tensor cu_seqlens_k, int max_seqlen_q, int max_seqlen_k, float scale, "
        "int window_left, int window_right, Tensor? alibi_slopes, float softcap, Tensor? rel_bias, "
        "float dropout_p, Tensor? dropout_seed) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("attention_with_kvcache_fwd(Tensor q, Tensor(a!) k_cache, Tensor(b!) v_cache, "
        "Tensor cache_seqlens, Tensor? block_table, Tensor? k_new, Tensor? v_new, "
        "Tensor? cache_batch_idx, Tensor? cache_leftpad, float scale, int window_left, "
        "int window_right, Tensor? alibi_slopes, float softcap, Tensor? rel_bias) -> (Tensor, Tensor)");
  m.def("linear_cross_entropy_fwd(Tensor x, Tensor weight, Tensor? bias, Tensor target, "
        "Tensor? grad_scale, int ignore_index, float label_smoothing, float z_loss, "
        "float softcap, bool need_dweight, int chunk_size) "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("cross_entropy_fwd(Tensor logits, Tensor target, Tensor? grad_scale, int ignore_index, "
        "float label_smoothing, float z_loss, float softcap) -> (Tensor, Tensor, Tensor)");
  m.def("cross_entropy_grad_(Tensor(a!) logits, Tensor target, Tensor grad_scale, int ignore_index, "
        "float label_smoothing, float z_loss, float softcap) -> ()");
  m.def("embedding_bwd(Tensor grad, Tensor indices, int num_weights, int padding_idx) -> Tensor");
  m.def("linear_fwd(Tensor x, Tensor weight, Tensor? bias) -> Tensor");
  m.def("linear_bwd(Tensor grad, Tensor x, Tensor weight, bool need_x, bool need_weight, "
        "bool need_bias) -> (Tensor, Tensor, Tensor)");
  m.def("grouped_linear_fwd(Tensor x, Tensor weight, Tensor offsets) -> Tensor");
  m.def("grouped_linear_bwd(Tensor grad, Tensor x, Tensor weight, Tensor offsets, bool need_x, "
        "bool need_weight) -> (Tensor, Tensor)");
}
