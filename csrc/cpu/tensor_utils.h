// Host-side helpers of the CPU kernels: tensor views, dtype dispatch, raw pointers.
// (The kernel sections themselves see only cpu/vec_utils.h; see there.)
#pragma once

#include <ATen/ATen.h>
#include <ATen/EmptyTensor.h>
#include <ATen/Parallel.h>
#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>

#include <algorithm>
#include <cstdlib>
#include <deque>
#include <mutex>
#include <new>
#include <string>

#if defined(__linux__)
#include <pthread.h>
#include <sys/mman.h>
#include <unistd.h>
#endif

#include "cpu/vec_utils.h"

namespace truthgpt {
namespace cpu {

template <class T>
struct AtType {
  using type = T;
};
template <>
struct AtType<bf16> {
  using type = at::BFloat16;
};
template <>
struct AtType<f16> {
  using type = at::Half;
};

template <class T>
const T* cptr(const at::Tensor& t) {
  return reinterpret_cast<const T*>(t.const_data_ptr<typename AtType<T>::type>());
}
template <class T>
T* mptr(at::Tensor& t) {
  return reinterpret_cast<T*>(t.mutable_data_ptr<typename AtType<T>::type>());
}

template <class T>
struct Tag {
  using type = T;
};

// Calls f(Tag<T>{}) with T the kernel element type of `st`: float, double, bf16 or f16.
template <class F>
void dispatch_kernel_types(at::ScalarType st, const char* op, F&& f) {
  switch (st) {
    case at::kFloat:
      f(Tag<float>{});
      return;
    case at::kDouble:
      f(Tag<double>{});
      return;
    case at::kBFloat16:
      f(Tag<bf16>{});
      return;
    case at::kHalf:
      f(Tag<f16>{});
      return;
    default:
      TORCH_CHECK(false, op, ": the CPU kernels take float32, bfloat16, float16 and float64, got ", st);
  }
}

// Rows of `t` as a (rows, n) view with unit inner stride (any row stride); copies only
// when the layout cannot be viewed so.
inline at::Tensor as_rows(const at::Tensor& t) {
  auto r = t.reshape({-1, t.size(-1)});
  return (r.size(1) <= 1 || r.stride(1) == 1) ? r : r.contiguous();
}

// Allocator of the kernels' large outputs. A fresh multi-megabyte buffer is paid for in page
// faults and in the OS zeroing its pages on first touch, which with 4 KiB pages cost more
// than the kernel itself (measured here: allocating and filling 64 MiB took 3x filling an
// allocated buffer). So buffers of 4 MiB and more
//   - are 2 MiB-aligned and marked MADV_HUGEPAGE (as PyTorch does for all its allocations
//     under THP_MEM_ALLOC_ENABLE=1): 512x fewer faults where transparent huge pages are
//     "always" or "madvise";
//   - when freed, are kept in a small cache and handed out again for the next request of
//     the same rounded size (a training or decoding loop asks for the same sizes each step),
//     so steady-state outputs cost neither faults nor zeroing. The cache holds at most
//     TRUTHGPT_CPU_CACHE_MB MiB (default: 1/16 of physical memory, at most 1024; 0 turns it
//     off), dropping its oldest blocks first.
// Smaller buffers, other OSes, and TRUTHGPT_CPU_HUGEPAGES=0 use PyTorch's CPU allocator.
class OutputAllocator final : public c10::Allocator {
 public:
  static constexpr size_t kHugePage = size_t(2) << 20;
  static constexpr size_t kMinBytes = size_t(4) << 20;

  c10::DataPtr allocate(size_t nbytes) override {
#if defined(__linux__)
    if (nbytes >= kMinBytes && env_flag("TRUTHGPT_CPU_HUGEPAGES", true)) {
      const size_t size = (nbytes + kHugePage - 1) / kHugePage * kHugePage;
      void* p = state().take(size);
      if (p == nullptr && posix_memalign(&p, kHugePage, size) == 0) {
        madvise(p, size, MADV_HUGEPAGE);  // advice only: failure is harmless
      }
      if (p != nullptr) {
        // reported like PyTorch's CPU allocator does, so that the profiler's memory events
        // (torch.profiler profile_memory=True, the bench's peak memory) count these buffers
        c10::profiledCPUMemoryReporter().New(p, size);
        return {p, new Block{p, size}, &release, c10::Device(c10::DeviceType::CPU)};
      }
    }
#endif
    return c10::GetCPUAllocator()->allocate(nbytes);
  }
  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

 private:
#if defined(__linux__)
  struct Block {
    void* p;
    size_t size;
  };

  struct State {
    std::mutex mu;
    std::deque<Block> free_blocks;  // oldest first
    size_t cached = 0, cap = 0;

    State() {
      const char* env = std::getenv("TRUTHGPT_CPU_CACHE_MB");
      if (env != nullptr && *env != '\0') {
        cap = static_cast<size_t>(std::max(0L, std::atol(env))) << 20;
      } else {
        const long pages = sysconf(_SC_PHYS_PAGES), page = sysconf(_SC_PAGESIZE);
        const size_t phys = pages > 0 && page > 0 ? size_t(pages) * size_t(page) : 0;
        cap = std::min(phys / 16, size_t(1024) << 20);
      }
      // A child forked while another thread held the lock must not inherit it locked.
      pthread_atfork(nullptr, nullptr, [] { new (&state().mu) std::mutex(); });
    }
    void* take(size_t size) {
      std::lock_guard<std::mutex> lock(mu);
      for (auto it = free_blocks.begin(); it != free_blocks.end(); ++it) {
        if (it->size == size) {
          void* p = it->p;
          cached -= size;
          free_blocks.erase(it);
          return p;
        }
      }
      return nullptr;
    }
    void give(Block b) {
      std::lock_guard<std::mutex> lock(mu);
      if (b.size > cap) {
        std::free(b.p);
        return;
      }
      free_blocks.push_back(b);
      cached += b.size;
      while (cached > cap) {
        std::free(free_blocks.front().p);
        cached -= free_blocks.front().size;
        free_blocks.pop_front();
      }
    }
  };

  // Never destroyed: tensors may be freed during interpreter teardown, after static
  // destructors would have run.
  static State& state() {
    static State* s = new State();
    return *s;
  }
  static void release(void* ctx) {
    auto* b = static_cast<Block*>(ctx);
    c10::profiledCPUMemoryReporter().Delete(b->p);
    state().give(*b);
    delete b;
  }
#endif
  static bool env_flag(const char* name, bool dflt) {
    const char* env = std::getenv(name);
    return env == nullptr || *env == '\0' ? dflt : std::string(env) != "0";
  }
};

// A contiguous, uninitialised CPU tensor for a kernel's output (see OutputAllocator).
inline at::Tensor new_output(at::IntArrayRef sizes, at::ScalarType dtype) {
  static OutputAllocator allocator;
  return at::detail::empty_generic(sizes, &allocator, c10::DispatchKeySet(c10::DispatchKey::CPU),
                                   dtype, c10::nullopt);
}

// A new (B, H, S, D) output (sizes) in the memory order of `like`, a (B, H', S, D) input:
// (B, S, H, D) memory when like's heads sit within a position (like is a view of a (B, S,
// H' * D) projection, stride(1) < stride(2)), so that the result transposed back to (B, S, H,
// D) and flattened is a free view (no copy around the kernel, forward or backward); else
// contiguous (B, H, S, D).
inline at::Tensor new_output_bhsd(at::IntArrayRef sizes, at::ScalarType dtype, const at::Tensor& like) {
  if (like.dim() == 4 && sizes.size() == 4 && like.size(1) > 1 && like.size(2) > 1 &&
      like.stride(1) < like.stride(2)) {
    return new_output({sizes[0], sizes[2], sizes[1], sizes[3]}, dtype).transpose(1, 2);
  }
  return new_output(sizes, dtype);
}

// Row stride of a (rows, n) view; any value works for a single row.
inline int64_t row_stride(const at::Tensor& r) { return r.size(0) <= 1 ? r.size(1) : r.stride(0); }

// dst = src^T for 2-D tensors of one 2-byte dtype: src (R, C) with unit inner stride, dst (C, R)
// with unit inner stride, in 32 x 32 tiles over both threads (at::copy_ of a transposed bfloat16
// view walks the source column by column: ~6x slower for a (512, 2048) block).
inline void transpose_2byte(const at::Tensor& src, at::Tensor& dst) {
  TORCH_INTERNAL_ASSERT(src.dim() == 2 && dst.dim() == 2 && src.element_size() == 2 &&
                        dst.scalar_type() == src.scalar_type() && dst.size(0) == src.size(1) &&
                        dst.size(1) == src.size(0) && src.stride(1) == 1 && dst.stride(1) == 1);
  const int64_t R = src.size(0), C = src.size(1), ls = row_stride(src), ld = row_stride(dst);
  const auto* s = static_cast<const uint16_t*>(src.const_data_ptr());
  auto* d = static_cast<uint16_t*>(dst.mutable_data_ptr());
  constexpr int64_t kT = 32;
  at::parallel_for(0, (C + kT - 1) / kT, 4, [&](int64_t b0, int64_t b1) {
    for (int64_t c0 = b0 * kT; c0 < std::min(C, b1 * kT); c0 += kT) {
      const int64_t c1 = std::min(C, c0 + kT);
      for (int64_t r0 = 0; r0 < R; r0 += kT) {
        const int64_t r1 = std::min(R, r0 + kT);
        for (int64_t r = r0; r < r1; ++r)  // a source line per r; the tile's 32 dst lines stay in L1
          for (int64_t c = c0; c < c1; ++c) d[c * ld + r] = s[r * ls + c];
      }
    }
  });
}

}  // namespace cpu
}  // namespace truthgpt
