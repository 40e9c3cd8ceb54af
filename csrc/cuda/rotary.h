// Launcher of the rotary CUDA kernel (csrc/cuda/rotary.cu); types in rotary_math.cuh.
#pragma once
#include "launch.h"
#include "rotary_math.cuh"

namespace truthgpt::cuda {

// Rotates q and, when k.heads > 0, k (both (batch, heads, seq, head_dim) of element type
// `dtype`) by the angles of cos/sin (element type `table_dtype`: F32 or `dtype`) at the tokens'
// positions; the first 2 * half dims rotate, the rest are copied. One launch.
cudaError_t rotary_fwd(DType dtype, DType table_dtype, int64_t batch, int64_t seq,
                       int64_t head_dim, int64_t half, bool interleaved, rotary::Operand q,
                       rotary::Operand k, rotary::Table table, rotary::Positions pos,
                       cudaStream_t stream);

}  // namespace truthgpt::cuda
