// Shared-memory addresses and cp.async copies (sm_80 and newer, Hopper included).
#pragma once

#include <cstdint>

namespace jax_etap {

// The shared-window address of a generic pointer into shared memory, as PTX's
// shared-state-space operands take it.
__device__ __forceinline__ uint32_t smem_address(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte global->shared copy through cp.async (sm_80+). When `valid` is false nothing
// is read and the 16 bytes are zero-filled: cache rows past a sequence's end (K is V,
// so NaN there would poison P.V even where P = 0) and rows of bad blocks land as zeros.
__device__ __forceinline__ void cp_async_16_or_zero(void* smem, const void* gmem, bool valid) {
  const unsigned dst = smem_address(smem);
  const int src_bytes = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(gmem), "r"(src_bytes));
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }

template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending));
}

}  // namespace jax_etap
