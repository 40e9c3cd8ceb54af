// Host build of the rotary CUDA kernel's logic (csrc/cuda/rotary_math.cuh): a test-only op that
// walks the kernel's flat item space on the CPU with the same decomposition, vector width choice,
// offsets and rotation, so tests/ops/test_cuda_host_logic.py can compare it with the reference.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include "cuda/rotary_math.cuh"

namespace truthgpt::testing {
namespace {

namespace rot = truthgpt::cuda::rotary;

rot::Operand operand_of(const at::Tensor& x, at::Tensor& out) {
  return {x.data_ptr(), out.data_ptr(), x.size(1), x.stride(0), x.stride(1), x.stride(2), x.stride(3)};
}

template <typename T, int V, bool I>
void run_items(const rot::Operand* ops, int64_t batch, int64_t seq, int64_t head_dim, int64_t half,
               const float* cos, const float* sin, const rot::Table& table, const int64_t* pos,
               int64_t psb, int64_t pss, int32_t* const* writes) {
  const int64_t units = rot::units_per_row(head_dim, half, V);
  const int64_t nq = batch * ops[0].heads * seq * units;
  const int64_t total = nq + batch * ops[1].heads * seq * units;
  for (int64_t idx = 0; idx < total; ++idx) {  // the kernel's grid-stride loop covers these
    const bool is_q = idx < nq;
    const rot::Operand& t = ops[is_q ? 0 : 1];
    const rot::Item it = rot::decode(is_q ? idx : idx - nq, t.heads, seq, units);
    const rot::Unit u = rot::unit_layout(it.unit, half, V, I);
    const T* x = static_cast<const T*>(t.x) + rot::in_offset(t, it);
    const int64_t out_off = rot::out_offset(t, it, seq, head_dim);
    T* o = static_cast<T*>(t.out) + out_off;
    int32_t* w = writes[is_q ? 0 : 1] + out_off;
    const T* first = x + u.first * t.stride_d;  // V contiguous elements (V > 1: stride_d == 1)
    if (u.rotate) {
      const T* second = x + u.second * t.stride_d;
      const int64_t p = rot::clamp_position(pos[it.b * psb + it.s * pss], table.rows);
      float c[V], s[V], e1[V], e2[V];
      for (int i = 0; i < V; ++i) {
        c[i] = cos[p * table.cos_stride0 + (u.angle + i) * table.cos_stride1];
        s[i] = sin[p * table.sin_stride0 + (u.angle + i) * table.sin_stride1];
        e1[i] = static_cast<float>(first[i]);
        e2[i] = static_cast<float>(second[i]);
      }
      rot::rotate_unit<V, I>(e1, e2, c, s);
      for (int i = 0; i < V; ++i) {
        o[u.first + i] = static_cast<T>(e1[i]);
        o[u.second + i] = static_cast<T>(e2[i]);
        ++w[u.first + i];
        ++w[u.second + i];
      }
    } else {
      for (int i = 0; i < V; ++i) {
        o[u.first + i] = first[i];
        ++w[u.first + i];
      }
    }
  }
}

// Returns (q_out, k_out, V): V as rotary::pick_vec chooses it for these tensors (vec == 0) or
// as forced (vec > 0; then half and D must be multiples of it and the inner stride 1).
// Every output element must be written exactly once.
std::tuple<at::Tensor, at::Tensor, int64_t> rotary_host(const at::Tensor& q, const at::Tensor& k,
                                                        const at::Tensor& cos,
                                                        const at::Tensor& sin,
                                                        const at::Tensor& position_ids,
                                                        bool interleaved, int64_t vec) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && cos.dim() == 2 && position_ids.dim() == 2);
  TORCH_CHECK(cos.scalar_type() == at::kFloat && sin.scalar_type() == at::kFloat &&
              position_ids.scalar_type() == at::kLong && k.scalar_type() == q.scalar_type());
  const int64_t B = q.size(0), S = q.size(2), D = q.size(3), half = cos.size(1);
  at::Tensor qo = at::full(q.sizes(), NAN, q.options());
  at::Tensor ko = at::full(k.sizes(), NAN, k.options());
  at::Tensor qw = at::zeros(q.sizes(), q.options().dtype(at::kInt));
  at::Tensor kw = at::zeros(k.sizes(), k.options().dtype(at::kInt));
  const rot::Operand ops[2] = {operand_of(q, qo), operand_of(k, ko)};
  const int v = vec > 0 ? static_cast<int>(vec)
                        : rot::pick_vec(static_cast<int>(q.element_size()), B, S, D, half, ops, 2);
  TORCH_CHECK(half % v == 0 && D % v == 0 && (v == 1 || (q.stride(3) == 1 && k.stride(3) == 1)),
              "rotary_host: vector width ", v, " does not fit");
  const rot::Table table{cos.data_ptr(), sin.data_ptr(), cos.stride(0), cos.stride(1),
                         sin.stride(0), sin.stride(1), cos.size(0)};
  int32_t* writes[2] = {qw.data_ptr<int32_t>(), kw.data_ptr<int32_t>()};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "rotary_host", [&] {
    auto run = [&]<int V>() {
      const float* c = cos.const_data_ptr<float>();
      const float* s = sin.const_data_ptr<float>();
      const int64_t* p = position_ids.const_data_ptr<int64_t>();
      if (interleaved)
        run_items<scalar_t, V, true>(ops, B, S, D, half, c, s, table, p, position_ids.stride(0),
                                     position_ids.stride(1), writes);
      else
        run_items<scalar_t, V, false>(ops, B, S, D, half, c, s, table, p, position_ids.stride(0),
                                      position_ids.stride(1), writes);
    };
    switch (v) {
      case 1: run.template operator()<1>(); break;
      case 2: run.template operator()<2>(); break;
      case 4: run.template operator()<4>(); break;
      case 8: run.template operator()<8>(); break;
      default: TORCH_CHECK(false, "rotary_host: vector width ", v);
    }
  });
  TORCH_CHECK(qw.eq(1).all().item<bool>() && kw.eq(1).all().item<bool>(),
              "rotary_host: an output element was not written exactly once");
  return {qo, ko, v};
}

// Whether the kernel reads these cos/sin tables with V-wide vector loads.
bool rotary_table_vec(const at::Tensor& cos, const at::Tensor& sin, int64_t vec) {
  const rot::Table t{cos.data_ptr(), sin.data_ptr(), cos.stride(0), cos.stride(1), sin.stride(0),
                     sin.stride(1), cos.size(0)};
  return rot::table_vec(t, static_cast<int>(vec), static_cast<int>(cos.element_size()));
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(truthgpt_test, m) {
  m.def("rotary_table_vec(Tensor cos, Tensor sin, int vec) -> bool");
  m.def("rotary_host(Tensor q, Tensor k, Tensor cos, Tensor sin, Tensor position_ids, "
        "bool interleaved, int vec) -> (Tensor, Tensor, int)");
}

TORCH_LIBRARY_IMPL(truthgpt_test, CPU, m) {
  m.impl("rotary_host", &rotary_host);
  m.impl("rotary_table_vec", &rotary_table_vec);
}

}  // namespace truthgpt::testing
