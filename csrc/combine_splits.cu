// Finishes what the decode kernels leave open (schedule.cuh):
//  * a sequence cut into several pieces: out = sum_i exp(lse_i - lse) * out_i over its
//    pieces, with lse = logsumexp_i(lse_i); a NaN piece (a bad block, NaN inputs) makes
//    the whole row NaN, as the reference does;
//  * an empty sequence (length 0): out 0, lse -inf.
// Sequences held whole by one CTA were finished by the decode kernel; their CTAs here
// return at once.
#include <cmath>

#include "device_utils.cuh"
#include "mla_decode.h"
#include "schedule.cuh"

namespace jax_etap {
namespace {

constexpr int kThreads = 128;

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
  for (int w = 1; w < kThreads / 32; ++w) x = take_max ? nan_max(x, scratch[w]) : x + scratch[w];
  return x;
}

// The CTAs of one (sequence, KV head) share its packed query rows and value channels:
// grid.x = row_chunks x value_chunks, chosen by the launcher so that a small batch still
// spreads over the GPU and a large one launches few CTAs.
struct CombineGrid {
  int row_chunks, value_chunks;
};

// The schedule parts that hold one sequence's tiles.
struct SequenceParts {
  int tiles;
  int first_part, last_part;  // meaningful when tiles > 0

  __device__ SequenceParts(const MlaDecodeParams& p, int b)
      : tiles(sequence_tiles(p, b)), first_part(p.sequence_parts[2 * b]), last_part(p.sequence_parts[2 * b + 1]) {}
  __device__ bool split() const { return tiles > 0 && last_part > first_part; }
};

template <typename T>
__device__ void combine_row(const MlaDecodeParams& p, const SequenceParts& parts, int b, int kv_head, int row,
                            int v_begin, int v_end, bool writes_lse, float* scratch, float* weight_s) {
  const QueryRow query(p, kv_head, row);
  T* out = static_cast<T*>(p.out) + query.out_offset(p, b);
  float* lse = p.lse + query.lse_offset(p, b);
  // A row that sees no key: out 0, lse -inf.
  const auto write_empty = [&] {
    for (int v = v_begin + threadIdx.x; v < v_end; v += kThreads) out[v] = from_float<T>(0.f);
    if (writes_lse && threadIdx.x == 0) *lse = -INFINITY;
  };
  if (parts.tiles == 0) return write_empty();  // an empty sequence: no key, no block looked up
  // Piece i sits in slot first_part + i + b; slots are [partial_slots, h_kv, rows].
  const int pieces = parts.last_part - parts.first_part + 1;
  const int64_t slot_stride = int64_t(p.h_kv) * p.rows();
  const int64_t first = int64_t(parts.first_part + b) * slot_stride + int64_t(kv_head) * p.rows() + row;
  const float* piece_lse = p.partial_lse + first;
  const float* piece_out = p.partial_out + first * p.d_v;

  float max_lse = -INFINITY;
  for (int i = threadIdx.x; i < pieces; i += kThreads) max_lse = nan_max(max_lse, piece_lse[i * slot_stride]);
  max_lse = block_reduce(max_lse, scratch, true);
  if (max_lse == -INFINITY) return write_empty();  // no key in any piece (causal rows before the sequence)
  float sum = 0.f;
  for (int i = threadIdx.x; i < pieces; i += kThreads) sum += expf(piece_lse[i * slot_stride] - max_lse);
  const float total_lse = max_lse + logf(block_reduce(sum, scratch, false));
  for (int i = threadIdx.x; i < pieces; i += kThreads) weight_s[i] = expf(piece_lse[i * slot_stride] - total_lse);
  __syncthreads();
  for (int v = v_begin + threadIdx.x; v < v_end; v += kThreads) {
    float value = 0.f;
#pragma unroll 4
    for (int i = 0; i < pieces; ++i) value = fmaf(weight_s[i], piece_out[i * slot_stride * p.d_v + v], value);
    out[v] = from_float<T>(value);
  }
  if (writes_lse && threadIdx.x == 0) *lse = total_lse;
  __syncthreads();  // weight_s is rewritten for the next row
}

template <typename T>
__global__ void __launch_bounds__(kThreads) combine_splits_kernel(const MlaDecodeParams p, const CombineGrid grid) {
  const int chunks = grid.row_chunks * grid.value_chunks;
  const int b = blockIdx.x / chunks, chunk = blockIdx.x % chunks;
  const int row_chunk = chunk / grid.value_chunks, value_chunk = chunk % grid.value_chunks;
  const int kv_head = blockIdx.y;
  __shared__ float scratch[kThreads / 32];
  extern __shared__ float weight_s[];  // one per piece: a sequence has at most num_parts
  const SequenceParts parts(p, b);
  if (parts.tiles > 0 && !parts.split()) return;  // the decode kernel wrote it

  const int rows_per_chunk = ceil_div(p.rows(), grid.row_chunks);
  const int values_per_chunk = ceil_div(p.d_v, grid.value_chunks);
  const int v_begin = value_chunk * values_per_chunk, v_end = min(v_begin + values_per_chunk, p.d_v);
  const int row_end = min((row_chunk + 1) * rows_per_chunk, p.rows());
  for (int row = row_chunk * rows_per_chunk; row < row_end; ++row)
    combine_row<T>(p, parts, b, kv_head, row, v_begin, v_end, value_chunk == 0, scratch, weight_s);
}

// About this many CTAs, so that a batch of one sequence still reads its pieces in parallel.
constexpr int kTargetCtas = 512;

template <typename T>
cudaError_t launch(const MlaDecodeParams& p, cudaStream_t stream) {
  const int sequences = p.batch * p.h_kv;
  const int wanted = ceil_div(kTargetCtas, sequences);
  CombineGrid grid;
  grid.row_chunks = min(p.rows(), wanted);
  grid.value_chunks = min(ceil_div(p.d_v, kThreads), ceil_div(wanted, grid.row_chunks));
  // The batch goes in x, the only grid extent past 65535.
  const dim3 blocks(unsigned(int64_t(grid.row_chunks) * grid.value_chunks * p.batch), unsigned(p.h_kv));
  const size_t weight_bytes = size_t(p.num_parts) * sizeof(float);
  combine_splits_kernel<T><<<blocks, kThreads, weight_bytes, stream>>>(p, grid);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_combine_splits(const MlaDecodeParams& p, cudaStream_t stream) {
  return p.dtype == ElementType::kBFloat16 ? launch<__nv_bfloat16>(p, stream) : launch<__half>(p, stream);
}

}  // namespace jax_etap
