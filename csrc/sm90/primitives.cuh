// Hopper (sm_90a) building blocks of the ETAP kernel, as thin PTX wrappers: mbarriers,
// the bulk tensor copy engine (TMA), proxy fences, named barriers, register
// reallocation, warpgroup MMA bookkeeping, shared-memory matrix descriptors and stmatrix.
// Semantics follow the PTX ISA 8.x sections of the same names.
#pragma once

#include <cuda.h>  // CUtensorMap (a plain struct; nothing from libcuda is linked)

#include <cstdint>

#include "common/copy.cuh"

namespace jax_etap {
namespace sm90 {

// ---- mbarrier ---------------------------------------------------------------------

__device__ __forceinline__ void mbarrier_init(uint64_t* bar, uint32_t arrivals) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(smem_address(bar)), "r"(arrivals));
}

// Makes the initialised barriers visible to the async proxy (TMA completes on them).
__device__ __forceinline__ void fence_barrier_init() {
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
}

__device__ __forceinline__ void mbarrier_arrive(uint64_t* bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(smem_address(bar)) : "memory");
}

// Arrives and announces `bytes` of asynchronous transactions (TMA) the phase waits for.
__device__ __forceinline__ void mbarrier_arrive_expect_tx(uint64_t* bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(smem_address(bar)), "r"(bytes)
               : "memory");
}

// Waits until the phase with the given parity has completed. The retry loop stays inside
// the asm: a C++ loop would be a data-dependent branch, and ptxas then treats every later
// wgmma as sitting on a divergent path and serialises it.
__device__ __forceinline__ void mbarrier_wait(uint64_t* bar, uint32_t parity) {
  asm volatile(
      "{\n.reg .pred done;\nwait_again:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
      "@!done bra wait_again;\n}\n" ::"r"(smem_address(bar)),
      "r"(parity)
      : "memory");
}

// ---- TMA ----------------------------------------------------------------------------

// Copies the box at coordinates (c0, c1, c2) of a 3-D tensor map into shared memory;
// completion is counted in bytes on `bar`.
__device__ __forceinline__ void tma_load_3d(void* dst, const CUtensorMap* map, uint64_t* bar, int c0, int c1, int c2) {
  asm volatile(
      "cp.async.bulk.tensor.3d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {%3, %4, %5}], "
      "[%2];\n" ::"r"(smem_address(dst)),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(smem_address(bar)), "r"(c0), "r"(c1), "r"(c2)
      : "memory");
}

__device__ __forceinline__ void prefetch_tensor_map(const CUtensorMap* map) {
  asm volatile("prefetch.tensormap [%0];\n" ::"l"(reinterpret_cast<uint64_t>(map)) : "memory");
}

// Orders this thread's generic-proxy shared-memory writes before later async-proxy
// accesses (wgmma operands, TMA) that a barrier makes depend on them.
__device__ __forceinline__ void fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }

// ---- named barriers ------------------------------------------------------------------

__device__ __forceinline__ void barrier_sync(int id, int threads) {
  asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}

// ---- registers ------------------------------------------------------------------------

// Per-warpgroup register budgets; every warp of the warpgroup must execute them.
template <int kRegisters>
__device__ __forceinline__ void raise_register_budget() {
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(kRegisters));
}
template <int kRegisters>
__device__ __forceinline__ void lower_register_budget() {
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(kRegisters));
}

// ---- warpgroup MMA bookkeeping ----------------------------------------------------------

// Orders earlier register writes of accumulators before the wgmma that reads them.
__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int kPending>
__device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(kPending) : "memory");
}

// Keeps the compiler from moving accesses of accumulator registers across the
// asynchronous wgmma region.
template <int kCount>
__device__ __forceinline__ void pin_registers(float (&r)[kCount]) {
#pragma unroll
  for (int i = 0; i < kCount; ++i) asm volatile("" : "+f"(r[i])::"memory");
}

// ---- shared-memory matrix descriptors ----------------------------------------------------

// Every wgmma operand of the kernel lives in tiles of 128-byte rows with the 128-byte
// swizzle (16-byte chunk c of row r stored at chunk c ^ (r % 8)), starting on 1024-byte
// boundaries, as TMA writes them. Then (PTX ISA, "Matrix Descriptor Format"):
//  * K-major operands: 8-row groups lie `stride_bytes` apart (1024 for dense rows); a
//    16-element K step is a 32-byte advance of the start address inside the row;
//  * M-major operands (A transposed): 8-row groups along K lie `stride_bytes` apart, and
//    `leading_bytes` separate consecutive 64-element blocks along M.
__device__ __forceinline__ uint64_t matrix_descriptor(const void* start, uint32_t leading_bytes, uint32_t stride_bytes) {
  constexpr uint64_t kSwizzle128B = 1;
  return uint64_t((smem_address(start) & 0x3FFFF) >> 4) | (uint64_t((leading_bytes & 0x3FFFF) >> 4) << 16) |
         (uint64_t((stride_bytes & 0x3FFFF) >> 4) << 32) | (kSwizzle128B << 62);
}

// Byte offset of 16-byte chunk `chunk` of row `row` in a 128-byte-swizzled tile.
__device__ __forceinline__ uint32_t swizzled_offset(int row, int chunk) {
  return uint32_t(row) * 128u + (uint32_t(chunk ^ (row & 7)) << 4);
}

// Four 8x8 16-bit matrices: lane 8i + j gives the address of row j of matrix i, and
// element (r, c) of matrix i is half c % 2 of register i in lane 4r + c / 2 (the layout of
// a row pair of wgmma's accumulators, rounded to 16 bits).
__device__ __forceinline__ void stmatrix_x4(uint32_t address, uint32_t r0, uint32_t r1, uint32_t r2, uint32_t r3) {
  asm volatile("stmatrix.sync.aligned.m8n8.x4.shared.b16 [%0], {%1, %2, %3, %4};\n" ::"r"(address), "r"(r0), "r"(r1),
               "r"(r2), "r"(r3)
               : "memory");
}

// Four 8x8 16-bit matrices stored transposed: lane 8i + j gives the address of row j of
// matrix i, which receives column j of the fragment (element (r, c) of matrix i is half
// c % 2 of register i in lane 4r + c / 2).
__device__ __forceinline__ void stmatrix_x4_trans(uint32_t address, uint32_t r0, uint32_t r1, uint32_t r2,
                                                  uint32_t r3) {
  asm volatile("stmatrix.sync.aligned.m8n8.x4.trans.shared.b16 [%0], {%1, %2, %3, %4};\n" ::"r"(address), "r"(r0),
               "r"(r1), "r"(r2), "r"(r3)
               : "memory");
}

}  // namespace sm90
}  // namespace jax_etap
