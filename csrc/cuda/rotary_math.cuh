// Index arithmetic and per-element math of the rotary CUDA kernel (csrc/cuda/rotary.cu), for
// host and device (TG_HD), so the CPU extension can test them (csrc/testing/rotary.cpp).
//
// Work decomposition. One launch rotates q and (optionally) k, each (B, H, S, D) with any strides,
// into contiguous outputs. Every (b, h, s) row of D elements is cut into `units`: first
// half / V rotary units, each holding V pairs, then (D - R) / V pass-through units of V elements
// (R = 2 * half). The flat item index enumerates q's items then k's, each in (b, h, s, unit)
// order, which is the memory order of a contiguous tensor, so neighbouring threads touch
// neighbouring addresses. A rotary unit u reads two groups of V elements, e1 at `first` and e2 at
// `second`, and the angles half-index u * V .. u * V + V - 1:
//   NeoX/Llama (x[d], x[d + R/2]):  first = u V,  second = u V + R/2; pair i is (e1[i], e2[i]);
//   GPT-J interleaved (x[2d], x[2d+1]): first = 2 u V, second = 2 u V + V; the 2V elements
//     e1 ++ e2 hold the pairs (e[2i], e[2i+1]).
// With V > 1 each group is one aligned vector access (rotary::pick_vec checks the alignment).
#pragma once
#include <cstdint>

#include "common/host_device.h"
#include "vector_math.cuh"

namespace truthgpt::cuda::rotary {

// One (B, H, S, D) input, any strides (elements), and its contiguous output.
struct Operand {
  const void* x;
  void* out;
  int64_t heads;
  int64_t stride_b, stride_h, stride_s, stride_d;
};

// cos/sin (P, R/2), any strides (elements).
struct Table {
  const void* cos;
  const void* sin;
  int64_t cos_stride0, cos_stride1, sin_stride0, sin_stride1;
  int64_t rows;  // P
};

// position_ids int64 (B, S), any strides (0 for a broadcast view).
struct Positions {
  const int64_t* ids;
  int64_t stride_b, stride_s;
};

struct Item {
  int64_t b, h, s, unit;
};

// Flat item index within one operand -> (b, h, s, unit); (b, h, s, unit) order.
TG_HD Item decode(int64_t idx, int64_t heads, int64_t seq, int64_t units) {
  Item it;
  int64_t rest = idx / units;
  it.unit = idx - rest * units;
  int64_t next = rest / seq;
  it.s = rest - next * seq;
  rest = next;
  next = rest / heads;
  it.h = rest - next * heads;
  it.b = next;
  return it;
}

struct Unit {
  bool rotate;     // a rotary unit (else pass-through)
  int64_t first;   // element offset (within the head) of the first group of V elements
  int64_t second;  // ... of the second group (rotary units only)
  int64_t angle;   // half-index of the angle of pair 0 (rotary units only)
};

TG_HD int64_t rot_units(int64_t half, int v) { return half / v; }
TG_HD int64_t units_per_row(int64_t head_dim, int64_t half, int v) { return (head_dim - 2 * half) / v + half / v; }

TG_HD Unit unit_layout(int64_t unit, int64_t half, int v, bool interleaved) {
  Unit u;
  const int64_t nrot = rot_units(half, v);
  u.rotate = unit < nrot;
  if (u.rotate) {
    u.angle = unit * v;
    u.first = interleaved ? 2 * unit * v : unit * v;
    u.second = interleaved ? u.first + v : u.first + half;
  } else {
    u.angle = 0;
    u.first = 2 * half + (unit - nrot) * v;
    u.second = u.first;
  }
  return u;
}

// One pair (a, b) rotated by the angle with cosine c and sine s: (a c - b s, b c + a s), with
// explicit fused multiply-adds so every instantiation (and the host build) rounds alike.
TG_HD void rotate_pair(float& a, float& b, float c, float s) {
  const float a0 = a;
  a = fmaf(a0, c, -(b * s));
  b = fmaf(b, c, a0 * s);
}

// Rotates the V pairs of a unit in place (see the header comment).
template <int V, bool Interleaved>
TG_HD void rotate_unit(float (&e1)[V], float (&e2)[V], const float (&c)[V], const float (&s)[V]) {
  if constexpr (!Interleaved || V == 1) {  // pair i is (e1[i], e2[i])
TG_UNROLL
    for (int i = 0; i < V; ++i) rotate_pair(e1[i], e2[i], c[i], s[i]);
  } else {  // pairs (e[2i], e[2i+1]) of e1 ++ e2: angles 0 .. V/2-1 in e1, V/2 .. V-1 in e2
TG_UNROLL
    for (int i = 0; i < V / 2; ++i) {
      rotate_pair(e1[2 * i], e1[2 * i + 1], c[i], s[i]);
      rotate_pair(e2[2 * i], e2[2 * i + 1], c[V / 2 + i], s[V / 2 + i]);
    }
  }
}

// Position of a token, clamped into the table (the public op validates positions; the clamp
// only keeps a misused kernel op from reading out of bounds).
TG_HD int64_t clamp_position(int64_t p, int64_t rows) { return p < 0 ? 0 : (p >= rows ? rows - 1 : p); }

// Offset (elements) of row (b, h, s) of an operand's input, and of its contiguous output.
TG_HD int64_t in_offset(const Operand& t, const Item& it) {
  return it.b * t.stride_b + it.h * t.stride_h + it.s * t.stride_s;
}
TG_HD int64_t out_offset(const Operand& t, const Item& it, int64_t seq, int64_t head_dim) {
  return ((it.b * t.heads + it.h) * seq + it.s) * head_dim;
}

// Widest vector width V whose accesses are all aligned: half and D multiples of V, unit inner
// stride, the other strides multiples of V, and every pointer V-aligned (operands with no
// heads are ignored).
TG_HD int pick_vec(int elem_size, int64_t batch, int64_t seq, int64_t head_dim, int64_t half,
                   const Operand* ops, int count) {
  return vec::widest(elem_size, [&](int v) {
    if (half % v || head_dim % v) return false;
    for (int i = 0; i < count; ++i) {
      const Operand& t = ops[i];
      if (t.heads == 0) continue;
      if (t.stride_d != 1 || !vec::stride_ok(t.stride_b, batch, v) ||
          !vec::stride_ok(t.stride_h, t.heads, v) || !vec::stride_ok(t.stride_s, seq, v) ||
          !vec::aligned(t.x, v, elem_size) || !vec::aligned(t.out, v, elem_size))
        return false;
    }
    return true;
  });
}

// Can a rotary unit read its V cos and V sin values (angles u V .. u V + V - 1 of one position)
// as one aligned vector each? Unit inner strides, row strides multiples of V, V-aligned
// pointers (table_elem_size: bytes of a cos/sin element).
TG_HD bool table_vec(const Table& t, int v, int table_elem_size) {
  return v > 1 && t.cos_stride1 == 1 && t.sin_stride1 == 1 && t.cos_stride0 % v == 0 &&
         t.sin_stride0 % v == 0 && vec::aligned(t.cos, v, table_elem_size) &&
         vec::aligned(t.sin, v, table_elem_size);
}

}  // namespace truthgpt::cuda::rotary
