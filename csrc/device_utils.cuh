// Small device helpers shared by the decode kernels.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>
#include <cstdint>

#include "mla_decode.h"

namespace jax_etap {

__host__ __device__ __forceinline__ int ceil_div(int a, int b) { return (a + b - 1) / b; }

// The valid length of sequence b: cache_seqlens clamped to [0, capacity], so a bad
// runtime value can never move a read past the cache.
__device__ __forceinline__ int clamped_seqlen(const MlaDecodeParams& p, int b) {
  const int64_t len = p.seqlens[b];
  return int(len < 0 ? 0 : (len > p.capacity() ? p.capacity() : len));
}

// Query position s of a causal decode step sees keys [0, end): the s_q queries are the
// last s_q tokens of the sequence.
__device__ __forceinline__ int position_key_end(const MlaDecodeParams& p, int seqlen, int s) {
  if (!p.causal) return seqlen;
  const int end = seqlen - p.s_q + s + 1;
  return end < 0 ? 0 : end;
}

// The same for packed row r = s * groups + g.
__device__ __forceinline__ int row_key_end(const MlaDecodeParams& p, int seqlen, int row) {
  return position_key_end(p, seqlen, row / p.groups);
}

// The query behind packed row r of KV head `kv_head`: position r / groups of head
// kv_head * groups + r % groups. Gives its offsets in q, out and lse.
struct QueryRow {
  int s, h;

  __device__ QueryRow(const MlaDecodeParams& p, int kv_head, int row)
      : s(row / p.groups), h(kv_head * p.groups + row % p.groups) {}
  __device__ int64_t q_offset(const MlaDecodeParams& p, int b) const {
    return ((int64_t(b) * p.s_q + s) * p.h_q + h) * p.d_qk;
  }
  __device__ int64_t out_offset(const MlaDecodeParams& p, int b) const {
    return ((int64_t(b) * p.s_q + s) * p.h_q + h) * p.d_v;
  }
  __device__ int64_t lse_offset(const MlaDecodeParams& p, int b) const { return (int64_t(b) * p.h_q + h) * p.s_q + s; }
};

__device__ __forceinline__ bool block_index_valid(const MlaDecodeParams& p, int block) {
  return block >= 0 && block < p.num_blocks;
}

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ __nv_bfloat16 from_float(float x) { return __float2bfloat16(x); }
template <>
__device__ __forceinline__ __half from_float(float x) { return __float2half(x); }

// 16-byte global->shared copy through cp.async (sm_80+). When `valid` is false nothing
// is read and the 16 bytes are zero-filled: cache rows past a sequence's end (K is V,
// so NaN there would poison P.V even where P = 0) and rows of bad blocks land as zeros.
__device__ __forceinline__ void cp_async_16_or_zero(void* smem, const void* gmem, bool valid) {
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  const int src_bytes = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(gmem), "r"(src_bytes));
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }

template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending));
}

// max that propagates NaN (fmaxf drops it): a NaN score, from NaN in q or in a visible
// key, must reach the output as it does in the reference, not vanish behind -inf. One
// instruction (max.NaN, sm_80+) where the comparisons and select took four.
__device__ __forceinline__ float nan_max(float a, float b) {
  float m;
  asm("max.NaN.f32 %0, %1, %2;" : "=f"(m) : "f"(a), "f"(b));
  return m;
}

// 2^x in one MUFU.EX2 (ex2.approx.ftz: relative error ~2^-22, subnormal results flushed
// to 0), for the softmax weights and rescale factors: exp2f's exact range handling
// around it cost three more instructions per weight in the kernels' critical warpgroup.
// ex2(-inf) = 0 and ex2(NaN) = NaN, as the softmax needs.
__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// What a row's unnormalised output is multiplied by: 1 / sum, or 0 where the row (or a
// split piece of it) saw no key with weight (sum 0). Multiplying rather than writing 0
// keeps a NaN that P.V made from a zero weight and an infinite value (0 * inf) in the
// output, as the reference has it; a NaN sum stays NaN.
__device__ __forceinline__ float output_scale(float sum) { return sum == 0.f ? 0.f : __frcp_rn(sum); }

// A row's lse from its running max (log2 units) and its row sum: NaN stays NaN (a NaN
// score, or a block-table entry outside the cache), a row that saw no key with weight
// (sum 0) gets -inf, and otherwise ln(sum * 2^max).
__device__ __forceinline__ float row_lse(float max_log2, float sum) {
  return sum != sum ? NAN : sum == 0.f ? -INFINITY : (max_log2 + log2f(sum)) * float(M_LN2);
}

}  // namespace jax_etap
