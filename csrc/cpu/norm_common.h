// Host side shared by the row norms on the CPU (cpu/layer_norm.cpp, cpu/rms_norm.cpp): the
// parameter checks, the row and chunk splits over at::parallel_for, and the deterministic
// reduction of the backward's partial parameter-gradient rows (cpu/norm_kernels.h sums them).
//
// The parameter gradients are deterministic: rows are cut into chunks that depend only on the
// row count, each chunk sums its rows in order into its own partial row, and the partial rows
// are added in chunk order; the thread count changes nothing.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>

namespace truthgpt {
namespace cpu {
namespace norm {

constexpr int64_t kGrainElems = 16384;  // minimum elements per thread
constexpr int64_t kMaxChunks = 128;     // partial rows per parameter (fewer when rows are few)
constexpr int64_t kMinChunkRows = 8;
constexpr int64_t kReduceCols = 512;    // columns per task of the partial-row reduction

// Rows per chunk of the backward.
inline int64_t chunk_rows(int64_t rows) {
  return std::max(kMinChunkRows, (rows + kMaxChunks - 1) / kMaxChunks);
}

// The backward's split of `rows` rows: chunks of `chunk` rows, `count` of them.
struct Chunks {
  int64_t chunk, count;
};
inline Chunks chunks_of(int64_t rows) {
  const int64_t chunk = chunk_rows(rows);
  return {chunk, (rows + chunk - 1) / chunk};
}

// The partial parameter-gradient rows (count x n, in the accumulation type A) when `need`.
template <class A>
at::Tensor partial_rows(bool need, int64_t count, int64_t n, const at::TensorOptions& opts) {
  return need ? at::empty({count, n}, opts.dtype(c10::CppTypeToScalarType<A>::value)) : at::Tensor();
}

inline void check_x(const char* op, const at::Tensor& x) {
  TORCH_CHECK(x.dim() >= 1, op, ": x must have at least one dimension");
}

// An optional per-column parameter `name` of x (weight, bias): shape (n,), x's dtype or float32.
inline void check_param(const char* op, const char* name, const at::Tensor& x,
                        const c10::optional<at::Tensor>& p) {
  if (!p.has_value()) return;
  TORCH_CHECK(p->dim() == 1 && p->size(0) == x.size(-1), op, ": ", name, " must have shape (",
              x.size(-1), ",), got ", p->sizes());
  TORCH_CHECK(p->scalar_type() == x.scalar_type() || p->scalar_type() == at::kFloat, op, ": ",
              name, " must have x's dtype (", x.scalar_type(), ") or float32, got ",
              p->scalar_type());
}

inline void check_grad(const char* op, const at::Tensor& grad, const at::Tensor& x) {
  TORCH_CHECK(grad.sizes() == x.sizes() && grad.scalar_type() == x.scalar_type(), op,
              ": grad must have the shape and dtype of x");
}

// Forward: fn(r0, r1) over the rows of a (rows, n) problem.
template <class F>
void for_rows(int64_t rows, int64_t n, F&& fn) {
  at::parallel_for(0, rows, std::max<int64_t>(1, kGrainElems / n), fn);
}

// Backward: fn(c0, c1) over the chunks of `chunk` rows (n columns each).
template <class F>
void for_chunks(int64_t nchunks, int64_t chunk, int64_t n, F&& fn) {
  at::parallel_for(0, nchunks, std::max<int64_t>(1, kGrainElems / (chunk * n)), fn);
}

// The reduction of `params` parameters' partial rows ((nchunks, n) each): fn(j0, j1) over
// blocks of columns [j0, j1).
template <class F>
void for_reduce_cols(int64_t params, int64_t nchunks, int64_t n, F&& fn) {
  const int64_t nblocks = (n + kReduceCols - 1) / kReduceCols;
  const int64_t grain = std::max<int64_t>(1, kGrainElems / (params * nchunks * kReduceCols));
  at::parallel_for(0, nblocks, grain, [&](int64_t b0, int64_t b1) {
    fn(b0 * kReduceCols, std::min(n, b1 * kReduceCols));
  });
}

}  // namespace norm
}  // namespace cpu
}  // namespace truthgpt
