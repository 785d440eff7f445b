// Finishes what the decode kernels leave open (common/schedule.cuh):
//  * a sequence cut into several pieces: out = sum_i exp(lse_i - lse) * out_i over its
//    pieces, with lse = logsumexp_i(lse_i); a NaN piece (a bad block, NaN inputs) makes
//    the whole row NaN, as the reference does;
//  * an empty sequence (length 0): out 0, lse -inf.
// Sequences held whole by one CTA were finished by the decode kernel; their CTAs here
// return at once.
#include <cmath>

#include "common/numeric.cuh"
#include "common/output.cuh"
#include "common/params.h"
#include "common/schedule.cuh"
#include "kernels.h"

namespace jax_etap {
namespace {

constexpr int kMaxThreads = 256;
constexpr int kVector = 4;  // value channels per thread: one 16-byte load of a partial row

__device__ float block_reduce(float x, float* scratch, bool take_max) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) {
    const float y = __shfl_xor_sync(0xffffffffu, x, offset);
    x = take_max ? nan_max(x, y) : x + y;
  }
  __syncthreads();  // scratch may still be read by an earlier reduction
  if (lane == 0) scratch[warp] = x;
  __syncthreads();
  x = scratch[0];
  for (int w = 1; w < int(blockDim.x) / 32; ++w) x = take_max ? nan_max(x, scratch[w]) : x + scratch[w];
  return x;
}

// One CTA per (sequence, packed query row, chunk of value channels) and KV head. Its
// threads are `piece_groups` groups of `lanes`: lane l owns channels 4l .. 4l + 3 of the
// chunk, and group g sums pieces g, g + piece_groups, ...; the groups then add up their
// sums. Splitting the pieces over groups keeps many independent loads in flight when a
// sequence has many pieces (batch 1: up to one per SM), where a serial walk over them
// would wait on memory once per piece.
struct CombineGrid {
  int value_chunks, lanes, piece_groups;

  __host__ __device__ int channels_per_chunk() const { return lanes * kVector; }
  __host__ __device__ int threads() const { return lanes * piece_groups; }
};

// The schedule parts that hold one sequence's tiles.
struct SequenceParts {
  int tiles;
  int first_part, last_part;  // meaningful when tiles > 0

  __device__ SequenceParts(const MlaDecodeParams& p, int b)
      : tiles(sequence_tiles(p, b)), first_part(p.sequence_parts[2 * b]), last_part(p.sequence_parts[2 * b + 1]) {}
  __device__ bool split() const { return tiles > 0 && last_part > first_part; }
};

// This thread's sum over its pieces of weight * partial row, for channels v .. v + 3 (< v_end).
__device__ void sum_pieces(const MlaDecodeParams& p, const float* piece_out, int64_t piece_stride, const float* weight_s,
                           int first_piece, int pieces, int step, int v, int v_end, float (&acc)[kVector]) {
  if (p.d_v % kVector == 0 && v < v_end) {  // whole, 16-byte aligned vectors
#pragma unroll 4
    for (int i = first_piece; i < pieces; i += step) {
      const float4 x = __ldg(reinterpret_cast<const float4*>(piece_out + i * piece_stride + v));
      acc[0] = fmaf(weight_s[i], x.x, acc[0]);
      acc[1] = fmaf(weight_s[i], x.y, acc[1]);
      acc[2] = fmaf(weight_s[i], x.z, acc[2]);
      acc[3] = fmaf(weight_s[i], x.w, acc[3]);
    }
    return;
  }
  for (int i = first_piece; i < pieces; i += step)
#pragma unroll
    for (int j = 0; j < kVector; ++j)
      if (v + j < v_end) acc[j] = fmaf(weight_s[i], __ldg(piece_out + i * piece_stride + v + j), acc[j]);
}

template <typename T>
__global__ void __launch_bounds__(kMaxThreads) combine_splits_kernel(const MlaDecodeParams p, const CombineGrid grid) {
  const int chunk = blockIdx.x % grid.value_chunks;
  const int row = blockIdx.x / grid.value_chunks % p.rows;
  const int b = blockIdx.x / grid.value_chunks / p.rows;
  const int kv_head = blockIdx.y;
  const SequenceParts parts(p, b);
  if (parts.tiles > 0 && !parts.split()) return;  // the decode kernel wrote it

  __shared__ float scratch[kMaxThreads / 32];
  extern __shared__ float smem[];
  float* weight_s = smem;                  // [num_parts]: a sequence has at most one piece per part
  float* group_sums = smem + p.num_parts;  // [threads * kVector]
  const QueryRow query(p, kv_head, row);
  T* out = static_cast<T*>(p.out) + query.out_offset(p, b);
  const bool writes_lse = chunk == 0 && threadIdx.x == 0;
  const int v_begin = chunk * grid.channels_per_chunk(), v_end = min(v_begin + grid.channels_per_chunk(), p.d_v);
  // A row that sees no key: out 0, lse -inf.
  const auto write_empty = [&] {
    for (int v = v_begin + threadIdx.x; v < v_end; v += blockDim.x) out[v] = from_float<T>(0.f);
    if (writes_lse) p.lse[query.lse_offset(p, b)] = -INFINITY;
  };
  if (parts.tiles == 0) return write_empty();  // an empty sequence: no key, no block looked up

  // Piece i sits in slot first_part + i + b; slots are [partial_slots, h_kv, rows].
  const int pieces = parts.last_part - parts.first_part + 1;
  const int64_t slot_stride = int64_t(p.h_kv) * p.rows;
  const int64_t first = int64_t(parts.first_part + b) * slot_stride + int64_t(kv_head) * p.rows + row;
  const float* piece_lse = p.partial_lse + first;
  float max_lse = -INFINITY;
  for (int i = threadIdx.x; i < pieces; i += blockDim.x) max_lse = nan_max(max_lse, piece_lse[i * slot_stride]);
  max_lse = block_reduce(max_lse, scratch, true);
  if (max_lse == -INFINITY) return write_empty();  // no key in any piece (causal rows before the sequence)
  float sum = 0.f;
  for (int i = threadIdx.x; i < pieces; i += blockDim.x) sum += expf(piece_lse[i * slot_stride] - max_lse);
  const float total_lse = max_lse + logf(block_reduce(sum, scratch, false));
  for (int i = threadIdx.x; i < pieces; i += blockDim.x) weight_s[i] = expf(piece_lse[i * slot_stride] - total_lse);
  __syncthreads();

  const int group = threadIdx.x / grid.lanes, lane = threadIdx.x % grid.lanes;
  const int v = v_begin + lane * kVector;
  float acc[kVector] = {0.f, 0.f, 0.f, 0.f};
  sum_pieces(p, p.partial_out + first * p.d_v, slot_stride * p.d_v, weight_s, group, pieces, grid.piece_groups, v,
             v_end, acc);
  if (grid.piece_groups > 1) {
#pragma unroll
    for (int j = 0; j < kVector; ++j) group_sums[threadIdx.x * kVector + j] = acc[j];
    __syncthreads();
    if (group == 0)
      for (int g = 1; g < grid.piece_groups; ++g)
#pragma unroll
        for (int j = 0; j < kVector; ++j) acc[j] += group_sums[(g * grid.lanes + lane) * kVector + j];
  }
  if (group == 0)
#pragma unroll
    for (int j = 0; j < kVector; ++j)
      if (v + j < v_end) out[v + j] = from_float<T>(acc[j]);
  if (writes_lse) p.lse[query.lse_offset(p, b)] = total_lse;
}

__host__ int next_power_of_two(int x) {
  int y = 1;
  while (y < x) y *= 2;
  return y;
}

// The part count over the batch bounds a typical sequence's pieces. A thread walks at most
// ~4 of them, all loads in flight at once (sum_pieces unrolls 4), so each CTA waits on
// memory about once: a few pieces (large batches) take one group of 128 lanes, whose
// small CTAs fit the whole grid in one wave; many pieces (batch 1: a piece per SM) take
// up to 32 groups of 8 lanes, which also cuts the value channels into more chunks and CTAs.
CombineGrid combine_grid(const MlaDecodeParams& p) {
  const int typical_pieces = ceil_div(p.num_parts, p.batch) + 1;
  CombineGrid grid;
  grid.piece_groups = min(next_power_of_two(ceil_div(typical_pieces, 4)), 32);
  const int wanted_lanes = grid.piece_groups == 1 ? 128 : kMaxThreads / grid.piece_groups;
  grid.lanes = min(wanted_lanes, next_power_of_two(ceil_div(p.d_v, kVector)));
  grid.piece_groups = max(grid.piece_groups, 32 / grid.lanes);  // whole warps: block_reduce shuffles all 32 lanes
  grid.value_chunks = ceil_div(p.d_v, grid.channels_per_chunk());
  return grid;
}

// An ordinary launch after the decode kernel. (Programmatic dependent launch, the combine
// scheduled early and waiting on griddepcontrol.wait, measured 2.4-3.4 us slower per call
// at batch 1 on the H200 and no faster at b128 s4K: RESULTS.md.)
template <typename T>
cudaError_t launch(const MlaDecodeParams& p, cudaStream_t stream) {
  const CombineGrid grid = combine_grid(p);
  // The batch goes in x, the only grid extent past 65535.
  const dim3 grid_dim(unsigned(int64_t(p.batch) * p.rows * grid.value_chunks), unsigned(p.h_kv));
  const size_t smem_bytes = (size_t(p.num_parts) + grid.threads() * kVector) * sizeof(float);
  combine_splits_kernel<T><<<grid_dim, grid.threads(), smem_bytes, stream>>>(p, grid);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_combine_splits(const MlaDecodeParams& p, cudaStream_t stream) {
  return p.dtype == ElementType::kBFloat16 ? launch<__nv_bfloat16>(p, stream) : launch<__half>(p, stream);
}

}  // namespace jax_etap
