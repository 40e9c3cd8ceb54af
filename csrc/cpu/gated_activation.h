// Host side of the gated activations on the CPU (cpu/geglu.cpp, cpu/swiglu.cpp):
// out = act(gate) * up and its backward, act given by the op. Input checks, the (row, column
// block) task split over at::parallel_for, and the driver (run) of the per-ISA task functions
// of cpu/gated_activation_kernels.h.
//
// An op names its activation with a key type declared here (the kernel sections see it, as
// they sit inside truthgpt::cpu) and specialises GatedAct<Key> in its kernel section; the
// host picks the kernel with TRUTHGPT_ISA_FN(isa, gated_fwd_tasks<T, Key>) (or _bwd_).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <array>
#include <vector>

#include "cpu/tensor_utils.h"

namespace truthgpt {
namespace cpu {

// Activation keys.
struct SiluKey;
template <bool Tanh>
struct GeluKey;

// An input of the task functions: rows with unit inner stride, `stride` elements apart.
template <class T>
struct TaskIn {
  const T* p;
  int64_t stride;
};

namespace gated {

// Columns per task: rows are cut into blocks of this many, so one long row still spreads
// over the threads.
constexpr int64_t kBlock = 16384;
// Minimum elements per thread: below this, threading costs more than it saves.
constexpr int64_t kGrainElems = 16384;

inline void check_inputs(const char* op, const at::Tensor& gate, const at::Tensor& up) {
  TORCH_CHECK(gate.dim() >= 1, op, ": gate must have at least one dimension");
  TORCH_CHECK(gate.sizes() == up.sizes(), op, ": gate ", gate.sizes(), " and up ", up.sizes(),
              " must have the same shape");
  TORCH_CHECK(gate.scalar_type() == up.scalar_type(), op, ": gate (", gate.scalar_type(),
              ") and up (", up.scalar_type(), ") must have the same dtype");
}

inline void check_grad(const char* op, const at::Tensor& grad, const at::Tensor& gate) {
  TORCH_CHECK(grad.sizes() == gate.sizes() && grad.scalar_type() == gate.scalar_type(), op,
              ": grad must have the shape and dtype of gate");
}

// Runs fn(t0, t1) over the (row, column block) tasks of a (rows, n) problem.
template <class F>
void for_tasks(int64_t rows, int64_t n, F&& fn) {
  const int64_t nb = (n + kBlock - 1) / kBlock;
  const int64_t grain = std::max<int64_t>(1, kGrainElems / std::min(n, kBlock));
  at::parallel_for(0, rows * nb, grain, fn);
}

// Runs a task function of cpu/gated_activation_kernels.h on checked inputs ins (of like's
// shape and dtype) and returns its NOut outputs (like's shape and dtype): pick(Tag<T>{}, isa)
// gives the function for element type T, e.g. TRUTHGPT_ISA_FN(isa, gated_fwd_tasks<T, Key>)
// with ins {gate, up} and one output. The outputs are contiguous, or with packed=true the
// halves of one (..., 2n) buffer (the gradient of a packed [gate | up] input: out[0]'s base).
template <size_t NOut, size_t NIn, class Pick>
std::array<at::Tensor, NOut> run(const char* op, const at::Tensor& like,
                                 const at::Tensor (&ins)[NIn], Pick&& pick, bool packed = false) {
  std::array<at::Tensor, NOut> outs;
  const int64_t n = like.dim() ? like.size(-1) : 1;
  if (packed) {
    std::vector<int64_t> sizes(like.sizes().begin(), like.sizes().end());
    sizes.back() = n * static_cast<int64_t>(NOut);
    const at::Tensor buf = new_output(sizes, like.scalar_type());
    for (size_t k = 0; k < NOut; ++k) outs[k] = buf.narrow(-1, static_cast<int64_t>(k) * n, n);
  } else {
    for (auto& o : outs) o = new_output(like.sizes(), like.scalar_type());
  }
  if (like.numel() == 0) return outs;
  const int64_t ostride = packed ? n * static_cast<int64_t>(NOut) : n;
  std::array<at::Tensor, NIn> in_rows;
  for (size_t k = 0; k < NIn; ++k) in_rows[k] = as_rows(ins[k]);
  const int64_t rows = in_rows[0].size(0);
  const Isa isa = active_isa();
  dispatch_kernel_types(like.scalar_type(), op, [&](auto tag) {
    using T = typename decltype(tag)::type;
    const auto fn = pick(tag, isa);
    std::array<TaskIn<T>, NIn> in;
    for (size_t k = 0; k < NIn; ++k) in[k] = {cptr<T>(in_rows[k]), row_stride(in_rows[k])};
    std::array<T*, NOut> out;
    for (size_t k = 0; k < NOut; ++k) out[k] = static_cast<T*>(outs[k].data_ptr());
    for_tasks(rows, n, [&](int64_t t0, int64_t t1) {
      fn(in.data(), out.data(), ostride, n, kBlock, t0, t1);
    });
  });
  return outs;
}

// The (..., 2n) gradient of a packed [gate | up] input from the two halves run() returned
// with packed=true.
inline at::Tensor packed_base(const at::Tensor& first_half) {
  return first_half.as_strided(
      [&] {
        std::vector<int64_t> s(first_half.sizes().begin(), first_half.sizes().end());
        s.back() *= 2;
        return s;
      }(),
      first_half.strides());
}

// Checks of the packed backward: gate_up (..., 2n) against grad (..., n).
inline void check_packed(const char* op, const at::Tensor& grad, const at::Tensor& gate_up) {
  TORCH_CHECK(gate_up.dim() >= 1 && gate_up.size(-1) % 2 == 0, op,
              ": gate_up must have an even last dim (the [gate | up] halves), got ", gate_up.sizes());
  auto half = gate_up.sizes().vec();
  half.back() /= 2;
  TORCH_CHECK(grad.sizes() == at::IntArrayRef(half) && grad.scalar_type() == gate_up.scalar_type(),
              op, ": grad must have gate_up's dtype and shape with the last dim halved, got ",
              grad.sizes(), " and ", gate_up.sizes());
}

}  // namespace gated
}  // namespace cpu
}  // namespace truthgpt
