// torch binding of the CUDA attention kernels (attention_*.cu): checks what the kernels
// support, converts tensors to AttentionParams (attention.h) and launches on the current
// stream. The only attention file that includes torch headers.
#include <torch/library.h>

#include <optional>
#include <vector>

#include "attention.h"
#include "binding_utils.h"
#include "common/attention_extras.h"

namespace truthgpt::cuda {
namespace {

// What to use instead when these kernels cannot run a call.
constexpr const char* kOtherBackends =
    "; backends that can: \"triton\" (CUDA tensors), \"cpu\" (CPU tensors) or \"reference\"";

// The kernels read every row with unit inner stride; other strides are free.
at::Tensor unit_inner(const at::Tensor& t) {
  return (t.size(-1) <= 1 || t.stride(-1) == 1) ? t : t.contiguous();
}

BhsdArg bhsd(const at::Tensor& t) { return BhsdArg{t.data_ptr(), t.stride(0), t.stride(1), t.stride(2)}; }

// 16-byte vector loads are safe for t: aligned base, and every stride that moves the row
// pointer a multiple of 16 bytes.
bool vec_ok(const at::Tensor& t) {
  const int64_t vec = 16 / static_cast<int64_t>(t.element_size());
  if (reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 != 0) return false;
  for (int dim = 0; dim < 3; ++dim)
    if (t.size(dim) > 1 && t.stride(dim) % vec != 0) return false;
  return true;
}

void check_operand(const char* name, const at::Tensor& t, const at::Tensor& q) {
  TORCH_CHECK(t.is_cuda(), "truthgpt cuda attention: ", name, " must be a CUDA tensor, got ", t.device());
  TORCH_CHECK(t.device() == q.device(), "truthgpt cuda attention: ", name, " must be on ", q.device(), " like q");
  TORCH_CHECK(t.dim() == 4, "truthgpt cuda attention: ", name, " must have 4 dimensions, got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == q.scalar_type(), "truthgpt cuda attention: ", name,
              " must have the dtype of q (", q.scalar_type(), "), got ", t.scalar_type());
}

// Validates q/k/v/masks and fills everything but the outputs. Keeps the (possibly copied)
// operands alive in `keep`.
AttentionParams make_params(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale,
                            int64_t window_left, int64_t window_right,
                            const std::optional<at::Tensor>& alibi_slopes,
                            const std::optional<at::Tensor>& block_mask, int64_t block_size,
                            const std::optional<at::Tensor>& key_mask, double softcap,
                            const std::optional<at::Tensor>& rel_bias, double dropout_p,
                            const std::optional<at::Tensor>& dropout_seed, std::vector<at::Tensor>& keep) {
  TORCH_CHECK(q.is_cuda(), "truthgpt cuda attention: q must be a CUDA tensor, got ", q.device(), kOtherBackends);
  TORCH_CHECK(q.dim() == 4, "truthgpt cuda attention: q must have 4 dimensions, got ", q.sizes());
  const auto dt = q.scalar_type();
  TORCH_CHECK(dt == at::kHalf || dt == at::kBFloat16 || dt == at::kFloat,
              "truthgpt cuda attention takes float16, bfloat16 or float32, got ", dt, kOtherBackends);
  check_operand("k", k, q);
  check_operand("v", v, q);
  const int64_t B = q.size(0), Hq = q.size(1), Sq = q.size(2), D = q.size(3);
  const int64_t Hkv = k.size(1), Sk = k.size(2);
  TORCH_CHECK(k.size(0) == B && k.size(3) == D && v.sizes() == k.sizes(),
              "truthgpt cuda attention: k and v must be (", B, ", Hkv, Sk, ", D, "), got ", k.sizes(), " and ",
              v.sizes());
  TORCH_CHECK(Hkv >= 1 && Hq % Hkv == 0, "truthgpt cuda attention: q heads (", Hq,
              ") must be a multiple of k/v heads (", Hkv, ")");
  TORCH_CHECK(attention_head_dim_bucket(D) != 0, "truthgpt cuda attention supports head dims 1 to 256, got ", D,
              kOtherBackends);
  int major = 0, minor = 0;
  const cudaError_t err = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, q.get_device());
  TORCH_CHECK(err == cudaSuccess && cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor,
                                                           q.get_device()) == cudaSuccess,
              "truthgpt cuda attention: cannot query the compute capability: ", cudaGetErrorString(err));
  TORCH_CHECK(major >= 8, "truthgpt cuda attention needs compute capability 8.0 or newer (mma.sync "
              "bf16/f16), this GPU has ", major, ".", minor, kOtherBackends);
  TORCH_CHECK(window_left >= -1 && window_right >= -1, "truthgpt cuda attention: window sides must be >= -1, got (",
              window_left, ", ", window_right, ")");
  TORCH_CHECK(softcap >= 0, "truthgpt cuda attention: softcap must be >= 0, got ", softcap);

  AttentionParams p{};
  p.dtype = dtype_of(q);
  attn::Problem& pr = p.prob;
  pr.B = B, pr.Hq = Hq, pr.Hkv = Hkv, pr.Sq = Sq, pr.Sk = Sk, pr.D = D;
  pr.scale = static_cast<float>(scale);
  pr.softcap = static_cast<float>(softcap);
  pr.window_left = window_left, pr.window_right = window_right;
  pr.block_size = 1;

  if (alibi_slopes.has_value()) {
    const at::Tensor& a = *alibi_slopes;
    TORCH_CHECK(a.device() == q.device() && a.scalar_type() == at::kFloat && a.dim() == 2 && a.size(0) == B &&
                    a.size(1) == Hq,
                "truthgpt cuda attention: alibi_slopes must be float32 (", B, ", ", Hq, ") on ", q.device(),
                ", got ", a.scalar_type(), " ", a.sizes(), " on ", a.device());
    pr.alibi = a.data_ptr<float>();
    pr.alibi_sb = a.stride(0), pr.alibi_sh = a.stride(1);
  }
  if (block_mask.has_value()) {
    const at::Tensor& m = *block_mask;
    TORCH_CHECK(block_size >= 1, "truthgpt cuda attention: block_size must be >= 1, got ", block_size);
    const int64_t nq = (Sq + block_size - 1) / block_size, nk = (Sk + block_size - 1) / block_size;
    TORCH_CHECK(m.device() == q.device() && m.scalar_type() == at::kBool && m.dim() == 4 && m.size(0) == B &&
                    m.size(1) == Hq && m.size(2) == nq && m.size(3) == nk,
                "truthgpt cuda attention: block_mask must be bool (", B, ", ", Hq, ", ", nq, ", ", nk, ") on ",
                q.device(), ", got ", m.scalar_type(), " ", m.sizes(), " on ", m.device());
    pr.block_mask = reinterpret_cast<const uint8_t*>(m.data_ptr<bool>());
    pr.bm_sb = m.stride(0), pr.bm_sh = m.stride(1), pr.bm_sq = m.stride(2), pr.bm_sk = m.stride(3);
    pr.block_size = block_size;
  }
  if (key_mask.has_value()) {
    const at::Tensor& m = *key_mask;
    TORCH_CHECK(m.device() == q.device() && m.scalar_type() == at::kBool && m.dim() == 2 && m.size(0) == B &&
                    m.size(1) == Sk,
                "truthgpt cuda attention: key_mask must be bool (", B, ", ", Sk, ") on ", q.device(), ", got ",
                m.scalar_type(), " ", m.sizes(), " on ", m.device());
    pr.key_mask = reinterpret_cast<const uint8_t*>(m.data_ptr<bool>());
    pr.km_sb = m.stride(0), pr.km_ss = m.stride(1);
  }
  attn::set_rel_and_dropout(pr, q.device(), rel_bias, dropout_p, dropout_seed);

  keep = {unit_inner(q), unit_inner(k), unit_inner(v)};
  p.q = bhsd(keep[0]);
  p.k = bhsd(keep[1]);
  p.v = bhsd(keep[2]);
  p.vec_loads = vec_ok(keep[0]) && vec_ok(keep[1]) && vec_ok(keep[2]);
  return p;
}

std::tuple<at::Tensor, at::Tensor> attention_fwd_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                      double scale, int64_t window_left, int64_t window_right,
                                                      const std::optional<at::Tensor>& alibi_slopes,
                                                      const std::optional<at::Tensor>& block_mask, int64_t block_size,
                                                      const std::optional<at::Tensor>& key_mask, double softcap,
                                                      const std::optional<at::Tensor>& rel_bias, double dropout_p,
                                                      const std::optional<at::Tensor>& dropout_seed) {
  TORCH_CHECK(q.is_cuda(), "truthgpt cuda attention: q must be a CUDA tensor, got ", q.device(), kOtherBackends);
  const c10::cuda::CUDAGuard guard(q.device());
  std::vector<at::Tensor> keep;
  AttentionParams p = make_params(q, k, v, scale, window_left, window_right, alibi_slopes, block_mask, block_size,
                                  key_mask, softcap, rel_bias, dropout_p, dropout_seed, keep);
  auto out = at::empty(q.sizes(), q.options());
  auto lse = at::empty({q.size(0), q.size(1), q.size(2)}, q.options().dtype(at::kFloat));
  p.out = out.data_ptr();
  p.lse = lse.data_ptr<float>();
  check_launch(attention_fwd(p, c10::cuda::getCurrentCUDAStream()), "attention_fwd");
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_bwd_cuda(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, double scale, int64_t window_left, int64_t window_right,
    const std::optional<at::Tensor>& alibi_slopes, const std::optional<at::Tensor>& block_mask, int64_t block_size,
    const std::optional<at::Tensor>& key_mask, double softcap, const std::optional<at::Tensor>& rel_bias,
    double dropout_p, const std::optional<at::Tensor>& dropout_seed) {
  TORCH_CHECK(q.is_cuda(), "truthgpt cuda attention: q must be a CUDA tensor, got ", q.device(), kOtherBackends);
  const c10::cuda::CUDAGuard guard(q.device());
  std::vector<at::Tensor> keep;
  AttentionParams p = make_params(q, k, v, scale, window_left, window_right, alibi_slopes, block_mask, block_size,
                                  key_mask, softcap, rel_bias, dropout_p, dropout_seed, keep);
  check_operand("grad_out", grad_out, q);
  check_operand("out", out, q);
  TORCH_CHECK(grad_out.sizes() == q.sizes() && out.sizes() == q.sizes(),
              "truthgpt cuda attention: grad_out and out must have q's shape ", q.sizes(), ", got ",
              grad_out.sizes(), " and ", out.sizes());
  TORCH_CHECK(lse.device() == q.device() && lse.scalar_type() == at::kFloat && lse.dim() == 3 &&
                  lse.size(0) == q.size(0) && lse.size(1) == q.size(1) && lse.size(2) == q.size(2),
              "truthgpt cuda attention: lse must be float32 (B, Hq, Sq) on ", q.device(), ", got ",
              lse.scalar_type(), " ", lse.sizes());
  const at::Tensor dout_u = unit_inner(grad_out), out_u = unit_inner(out);
  p.dout = bhsd(dout_u);
  p.o = bhsd(out_u);
  p.vec_loads = p.vec_loads && vec_ok(dout_u) && vec_ok(out_u);
  p.lse_in = lse.data_ptr<float>();
  p.lse_sb = lse.stride(0), p.lse_sh = lse.stride(1), p.lse_ss = lse.stride(2);
  auto delta = at::empty({2, q.size(0), q.size(1), q.size(2)}, q.options().dtype(at::kFloat));
  auto dq = at::empty(q.sizes(), q.options());
  auto dk = at::empty(k.sizes(), k.options());
  auto dv = at::empty(v.sizes(), v.options());
  p.delta = delta.data_ptr<float>();
  p.dq = dq.data_ptr();
  p.dk = dk.data_ptr();
  p.dv = dv.data_ptr();
  const int64_t rel_len = std::max<int64_t>(q.size(2) + k.size(2) - 1, 0);
  auto drel = at::empty({rel_bias.has_value() ? q.size(1) * rel_len : 0},
                        q.options().dtype(at::kFloat));
  p.drel = rel_bias.has_value() ? drel.data_ptr<float>() : nullptr;
  check_launch(attention_bwd(p, c10::cuda::getCurrentCUDAStream()), "attention_bwd");
  return {dq, dk, dv, rel_bias.has_value() ? drel.view({q.size(1), rel_len}) : drel};
}

}  // namespace

TORCH_LIBRARY_IMPL(truthgpt, CUDA, m) {
  m.impl("attention_fwd", &attention_fwd_cuda);
  m.impl("attention_bwd", &attention_bwd_cuda);
}

}  // namespace truthgpt::cuda
