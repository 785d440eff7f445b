// The merge of split sequences, by warps: what the decode kernels leave open (schedule.cuh).
//  * a sequence cut into several pieces: out = sum_i exp(lse_i - lse) * out_i over its
//    pieces, with lse = logsumexp_i(lse_i); a NaN piece (a bad block, NaN inputs) makes
//    the whole row NaN, as the reference does;
//  * an empty sequence (length 0): out 0, lse -inf.
// Sequences held whole by one CTA were finished by the decode kernel; their units return
// at once.
//
// Two callers run the same warps: the combine kernel (combine_splits.cu), launched after
// the decode kernel, and the Hopper decode kernels themselves after a grid barrier
// (sm90_pipeline.cuh), which saves the second launch. So the partial results are read with
// ld.global.cg: written by this very launch, they must come from L2, never from a stale
// L1 line or the read-only path.
#pragma once

#include <cmath>
#include <cstdint>

#include "device_utils.cuh"
#include "mla_decode.h"
#include "schedule.cuh"

namespace jax_etap {

constexpr int kCombineVector = 4;      // value channels in one float4 column of a partial row
constexpr int kMaxCombineVectors = 4;  // float4 columns a lane sums per piece

__device__ __forceinline__ float warp_max_nan(float x) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) x = nan_max(x, __shfl_xor_sync(0xffffffffu, x, offset));
  return x;
}

__device__ __forceinline__ float warp_sum_float(float x) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) x += __shfl_xor_sync(0xffffffffu, x, offset);
  return x;
}

__host__ __device__ inline int64_t combine_units(const MlaDecodeParams& p) {
  return int64_t(p.batch) * p.h_kv * p.rows * p.combine.chunks;
}

// Unit `unit` of the plan, by the whole calling warp.
template <typename T>
__device__ void combine_unit(const MlaDecodeParams& p, int64_t unit) {
  const CombinePlan& plan = p.combine;
  const int chunk = int(unit % plan.chunks);
  const int64_t row_unit = unit / plan.chunks;
  const int row = int(row_unit % p.rows);
  const int kv_head = int(row_unit / p.rows % p.h_kv);
  const int b = int(row_unit / p.rows / p.h_kv);
  const int tiles = sequence_tiles(p, b);
  const int first_part = __ldcg(p.sequence_parts + 2 * b), last_part = __ldcg(p.sequence_parts + 2 * b + 1);
  if (tiles > 0 && last_part == first_part) return;  // one piece: the decode kernel wrote it

  const int lane = threadIdx.x % 32, group = lane / plan.lanes, column = lane % plan.lanes;
  const QueryRow query(p, kv_head, row);
  T* out = static_cast<T*>(p.out) + query.out_offset(p, b);
  float* lse = p.lse + query.lse_offset(p, b);
  const bool writes_lse = chunk == 0 && lane == 0;
  const int v_begin = chunk * plan.chunk_channels();
  const int v_end = min(v_begin + plan.chunk_channels(), p.d_v);
  const auto write_empty = [&] {  // a row that sees no key: out 0, lse -inf
    for (int v = v_begin + lane; v < v_end; v += 32) out[v] = from_float<T>(0.f);
    if (writes_lse) *lse = -INFINITY;
  };
  if (tiles == 0) return write_empty();  // an empty sequence: no key, no block looked up

  // Piece i sits in slot first_part + i + b; slots are [partial_slots, h_kv, rows].
  const int pieces = last_part - first_part + 1;
  const int64_t slot_stride = int64_t(p.h_kv) * p.rows;
  const int64_t first = int64_t(first_part + b) * slot_stride + int64_t(kv_head) * p.rows + row;
  const float* piece_lse = p.partial_lse + first;
  float max_lse = -INFINITY;
  for (int i = lane; i < pieces; i += 32) max_lse = nan_max(max_lse, __ldcg(piece_lse + i * slot_stride));
  max_lse = warp_max_nan(max_lse);
  if (max_lse == -INFINITY) return write_empty();  // no key in any piece (causal rows before the sequence)
  float sum = 0.f;
  for (int i = lane; i < pieces; i += 32) sum += expf(__ldcg(piece_lse + i * slot_stride) - max_lse);
  const float total_lse = max_lse + logf(warp_sum_float(sum));

  // Column j of this lane starts at channel v_begin + (j * lanes + column) * 4.
  float acc[kMaxCombineVectors][kCombineVector] = {};
  const bool vectorised = p.d_v % kCombineVector == 0;  // whole, 16-byte aligned float4 columns
#pragma unroll 2
  for (int i = group; i < pieces; i += plan.groups()) {
    const float weight = expf(__ldcg(piece_lse + i * slot_stride) - total_lse);
    const float* piece_out = p.partial_out + (first + i * slot_stride) * p.d_v;
#pragma unroll
    for (int j = 0; j < kMaxCombineVectors; ++j) {
      const int v = v_begin + (j * plan.lanes + column) * kCombineVector;
      if (j >= plan.vectors || v >= v_end) continue;
      if (vectorised) {
        const float4 x = __ldcg(reinterpret_cast<const float4*>(piece_out + v));
        acc[j][0] = fmaf(weight, x.x, acc[j][0]);
        acc[j][1] = fmaf(weight, x.y, acc[j][1]);
        acc[j][2] = fmaf(weight, x.z, acc[j][2]);
        acc[j][3] = fmaf(weight, x.w, acc[j][3]);
      } else {
#pragma unroll
        for (int e = 0; e < kCombineVector; ++e)
          if (v + e < v_end) acc[j][e] = fmaf(weight, __ldcg(piece_out + v + e), acc[j][e]);
      }
    }
  }
  // The groups' sums, added over the lane bits above `column`.
  for (int offset = plan.lanes; offset < 32; offset *= 2)
#pragma unroll
    for (int j = 0; j < kMaxCombineVectors; ++j)
#pragma unroll
      for (int e = 0; e < kCombineVector; ++e) acc[j][e] += __shfl_xor_sync(0xffffffffu, acc[j][e], offset);
  if (group == 0) {
#pragma unroll
    for (int j = 0; j < kMaxCombineVectors; ++j) {
      const int v = v_begin + (j * plan.lanes + column) * kCombineVector;
#pragma unroll
      for (int e = 0; e < kCombineVector; ++e)
        if (j < plan.vectors && v + e < v_end) out[v + e] = from_float<T>(acc[j][e]);
    }
  }
  if (writes_lse) *lse = total_lse;
}

// Every unit of the plan, spread over all warps of the grid: warp w takes units w,
// w + (warps in the grid), ...
template <typename T>
__device__ void combine_by_grid_warps(const MlaDecodeParams& p) {
  const int warps_per_cta = blockDim.x / 32;
  const int64_t warp = (int64_t(blockIdx.y) * gridDim.x + blockIdx.x) * warps_per_cta + threadIdx.x / 32;
  const int64_t warps = int64_t(gridDim.x) * gridDim.y * warps_per_cta;
  const int64_t units = combine_units(p);
  for (int64_t unit = warp; unit < units; unit += warps) combine_unit<T>(p, unit);
}

// The plan for `warps` warps. Each lane should have several loads in flight and every warp
// a unit: a lane sums about 4 pieces of a typical split sequence (a few at large batches,
// where a warp then takes whole 512-channel rows; one per SM at batch 1, where 32 groups
// of one lane split them and the rows are cut into many chunks), and the value channels
// are cut into about as many chunks as there are warps per row.
inline CombinePlan plan_combine(const MlaDecodeParams& p, int64_t warps) {
  const int typical_pieces = ceil_div(p.num_parts, p.batch) + 1;
  int groups = 1;
  while (groups < 32 && 4 * groups < typical_pieces) groups *= 2;
  CombinePlan plan;
  plan.lanes = 32 / groups;
  const int columns_per_lane = ceil_div(ceil_div(p.d_v, kCombineVector), plan.lanes);
  const int64_t row_units = int64_t(p.batch) * p.h_kv * p.rows;
  const int64_t wanted_chunks = (warps + row_units - 1) / row_units;
  const int chunks = int(wanted_chunks < columns_per_lane ? wanted_chunks : columns_per_lane);
  plan.vectors = min(kMaxCombineVectors, ceil_div(columns_per_lane, chunks));
  plan.chunks = ceil_div(columns_per_lane, plan.vectors);
  return plan;
}

}  // namespace jax_etap
