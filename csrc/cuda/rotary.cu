// Rotary embedding CUDA kernel: q and k (any strides, different head counts) in one launch,
// both pairings, partial rotary, positions from an int64 (B, S) tensor. fp32 math; V-wide
// (128-bit when aligned) accesses; 64-bit indices. Decomposition in rotary_math.cuh.
#include "pack.cuh"
#include "rotary.h"

namespace truthgpt::cuda {
namespace {

struct Args {
  int64_t batch, seq, head_dim, half, units;
  bool table_vec;  // cos/sin rows readable as V-wide vectors (rotary::table_vec)
  rotary::Operand q, k;
  rotary::Table table;
  rotary::Positions pos;
};

// Field-wise select (no reference into the parameter space, which would force a local copy).
__device__ __forceinline__ rotary::Operand pick(bool first, const rotary::Operand& p,
                                                const rotary::Operand& q) {
  return {first ? p.x : q.x,           first ? p.out : q.out,
          first ? p.heads : q.heads,   first ? p.stride_b : q.stride_b,
          first ? p.stride_h : q.stride_h, first ? p.stride_s : q.stride_s,
          first ? p.stride_d : q.stride_d};
}

template <typename T, typename C, int V, bool Interleaved>
__global__ void rotary_kernel(const Args a) {
  const int64_t per_head_row = a.seq * a.units;
  const int64_t nq = a.batch * a.q.heads * per_head_row;
  const int64_t total = nq + a.batch * a.k.heads * per_head_row;
  const C* cos = static_cast<const C*>(a.table.cos);
  const C* sin = static_cast<const C*>(a.table.sin);
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const bool is_q = idx < nq;
    const rotary::Operand t = pick(is_q, a.q, a.k);
    const rotary::Item it = rotary::decode(is_q ? idx : idx - nq, t.heads, a.seq, a.units);
    const rotary::Unit u = rotary::unit_layout(it.unit, a.half, V, Interleaved);
    const T* x = static_cast<const T*>(t.x) + rotary::in_offset(t, it);
    T* o = static_cast<T*>(t.out) + rotary::out_offset(t, it, a.seq, a.head_dim);
    if (u.rotate) {
      const int64_t p = rotary::clamp_position(
          a.pos.ids[it.b * a.pos.stride_b + it.s * a.pos.stride_s], a.table.rows);
      const C* cp = cos + p * a.table.cos_stride0 + u.angle * a.table.cos_stride1;
      const C* sp = sin + p * a.table.sin_stride0 + u.angle * a.table.sin_stride1;
      float c[V], s[V], e1[V], e2[V];
      if (a.table_vec) {
        load_floats<V>(cp, c);
        load_floats<V>(sp, s);
      } else {
#pragma unroll
        for (int i = 0; i < V; ++i) {
          c[i] = to_float(cp[i * a.table.cos_stride1]);
          s[i] = to_float(sp[i * a.table.sin_stride1]);
        }
      }
      load_floats<V>(x + u.first * t.stride_d, e1);  // V > 1 implies stride_d == 1
      load_floats<V>(x + u.second * t.stride_d, e2);
      rotary::rotate_unit<V, Interleaved>(e1, e2, c, s);
      store_floats<V>(o + u.first, e1);
      store_floats<V>(o + u.second, e2);
    } else {
      copy_pack<V>(x + u.first * t.stride_d, o + u.first);
    }
  }
}

constexpr int kThreads = 256;

}  // namespace

cudaError_t rotary_fwd(DType dtype, DType table_dtype, int64_t batch, int64_t seq,
                       int64_t head_dim, int64_t half, bool interleaved, rotary::Operand q,
                       rotary::Operand k, rotary::Table table, rotary::Positions pos,
                       cudaStream_t stream) {
  if (half < 1 || 2 * half > head_dim || (table_dtype != dtype && table_dtype != DType::F32))
    return cudaErrorInvalidValue;
  const rotary::Operand ops[2] = {q, k};
  const int v = rotary::pick_vec(element_size(dtype), batch, seq, head_dim, half, ops, 2);
  const bool tv = rotary::table_vec(table, v, element_size(table_dtype));
  Args a{batch, seq, head_dim, half, rotary::units_per_row(head_dim, half, v), tv, q, k, table, pos};
  const int64_t total = batch * seq * (q.heads + k.heads) * a.units;
  if (total == 0) return cudaSuccess;
  return dispatch_dtype(dtype, [&]<typename T>() {
    return dispatch_vec<T>(v, [&]<int V>() {
      auto launch = [&]<typename C>() {
        if (interleaved)
          rotary_kernel<T, C, V, true><<<grid_1d(total, kThreads), kThreads, 0, stream>>>(a);
        else
          rotary_kernel<T, C, V, false><<<grid_1d(total, kThreads), kThreads, 0, stream>>>(a);
        return cudaGetLastError();
      };
      return table_dtype == DType::F32 ? launch.template operator()<float>()
                                       : launch.template operator()<T>();
    });
  });
}

}  // namespace truthgpt::cuda
