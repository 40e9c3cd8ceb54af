// truthgpt_info: which kernel path the CPU extension dispatches to, for the INFO logs of
// truthgpt_kernels/backends.py and tk.explain. Runs no kernel; reads the same runtime choices
// (CPU features, TRUTHGPT_CPU_ISA, TRUTHGPT_CPU_ATTN, ...) the kernels read at each call.
#include <torch/library.h>

#include <string>

#include "cpu/gemm_engine.h"
#include "cpu/vec_utils.h"

namespace truthgpt {

// csrc/cpu/attention.cpp
std::string attention_cpu_path(c10::ScalarType dtype);
std::string attention_cpu_plan(const at::Tensor& q, const at::Tensor& k, double scale, int64_t window_left,
                               int64_t window_right, const c10::optional<at::Tensor>& alibi_slopes,
                               const c10::optional<at::Tensor>& block_mask, int64_t block_size,
                               const c10::optional<at::Tensor>& key_mask, double softcap);

namespace {

// The kernel path of op family `family` for inputs of `dtype`.
std::string cpu_path(const std::string& family, c10::ScalarType dtype) {
  if (family == "attention") {
    return attention_cpu_path(dtype) + "; split-key decode when there are few work items";
  }
  std::string s = std::string(cpu::isa_name(cpu::active_isa())) + " vector kernels";
  if (family == "linear") {
    s += " (up to 8 rows); more rows: " +
         (dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf ? cpu::gemm_engine_description()
                                                                              : std::string("at::mm"));
  }
  return s;
}

std::string cpu_gemm() { return cpu::gemm_engine_description(); }
bool cpu_gemm_onednn() { return cpu::use_onednn_fp32(); }
bool cpu_is_intel() { return cpu::cpu_is_intel(); }

}  // namespace

TORCH_LIBRARY(truthgpt_info, m) {
  m.def("cpu_path(str family, ScalarType dtype) -> str", &cpu_path);
  m.def("cpu_gemm() -> str", &cpu_gemm);
  m.def("cpu_gemm_onednn() -> bool", &cpu_gemm_onednn);
  m.def("cpu_is_intel() -> bool", &cpu_is_intel);
  m.def("attention_plan(Tensor q, Tensor k, float scale, int window_left, int window_right, "
        "Tensor? alibi_slopes, Tensor? block_mask, int block_size, Tensor? key_mask, float softcap) -> str",
        &attention_cpu_plan);
}

}  // namespace truthgpt
