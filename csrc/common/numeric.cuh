// Numeric helpers shared by every kernel: integer rounding, float conversions and the
// softmax's NaN-propagating max, fast exponent, output scale and lse.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>
#include <cstdint>

namespace jax_etap {

__host__ __device__ __forceinline__ int ceil_div(int a, int b) { return (a + b - 1) / b; }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ __nv_bfloat16 from_float(float x) { return __float2bfloat16(x); }
template <>
__device__ __forceinline__ __half from_float(float x) { return __float2half(x); }

// Two floats packed as one 32-bit pair of T (the A/B operand element format).
template <typename T>
__device__ __forceinline__ uint32_t pack_pair(float lo, float hi);

template <>
__device__ __forceinline__ uint32_t pack_pair<__nv_bfloat16>(float lo, float hi) {
  const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&v);
}

template <>
__device__ __forceinline__ uint32_t pack_pair<__half>(float lo, float hi) {
  const __half2 v = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&v);
}

template <typename T>
__device__ __forceinline__ float2 unpack_pair(uint32_t packed);

template <>
__device__ __forceinline__ float2 unpack_pair<__nv_bfloat16>(uint32_t packed) {
  return __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&packed));
}

template <>
__device__ __forceinline__ float2 unpack_pair<__half>(uint32_t packed) {
  return __half22float2(*reinterpret_cast<const __half2*>(&packed));
}

// What rounding (lo, hi) to `rounded` = pack_pair<T>(lo, hi) lost, itself rounded to T:
// the two terms together carry lo and hi to about 2^-17 of their size in bf16.
template <typename T>
__device__ __forceinline__ uint32_t rounding_residual(uint32_t rounded, float lo, float hi) {
  const float2 kept = unpack_pair<T>(rounded);
  return pack_pair<T>(lo - kept.x, hi - kept.y);
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
