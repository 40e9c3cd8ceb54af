// Compiles the kernel section of a CPU kernel file once per instruction set (see vec_utils.h).
// No include guard: each kernel .cpp includes this once, after defining
//   TRUTHGPT_KERNELS_FILE   the path of its own source, e.g. "cpu/swiglu.cpp";
// that file then sees TRUTHGPT_KERNEL_SECTION defined and contributes only its kernel
// section, which lands in truthgpt::cpu::<isa>::(anonymous) with that namespace's VecFor<T>.
// The kernel section must include no headers.
#ifndef TRUTHGPT_KERNELS_FILE
#error "define TRUTHGPT_KERNELS_FILE before including cpu/foreach_isa.h"
#endif
#include "cpu/vec_utils.h"

#define TRUTHGPT_KERNEL_SECTION 1

namespace truthgpt {
namespace cpu {
namespace portable {
namespace {
#include TRUTHGPT_KERNELS_FILE
}  // namespace
}  // namespace portable
}  // namespace cpu
}  // namespace truthgpt

#if TRUTHGPT_X86
TRUTHGPT_BEGIN_AVX2
namespace truthgpt {
namespace cpu {
namespace avx2 {
namespace {
#include TRUTHGPT_KERNELS_FILE
}  // namespace
}  // namespace avx2
}  // namespace cpu
}  // namespace truthgpt
TRUTHGPT_END_TARGET

TRUTHGPT_BEGIN_AVX512
namespace truthgpt {
namespace cpu {
namespace avx512 {
namespace {
#include TRUTHGPT_KERNELS_FILE
}  // namespace
}  // namespace avx512
}  // namespace cpu
}  // namespace truthgpt
TRUTHGPT_END_TARGET

TRUTHGPT_BEGIN_AVX512BF16
namespace truthgpt {
namespace cpu {
namespace avx512bf16 {
namespace {
#include TRUTHGPT_KERNELS_FILE
}  // namespace
}  // namespace avx512bf16
}  // namespace cpu
}  // namespace truthgpt
TRUTHGPT_END_TARGET
#endif

#undef TRUTHGPT_KERNEL_SECTION
