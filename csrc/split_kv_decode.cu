// The portable split-KV MLA decode kernel (sm_80+): the correctness baseline and the
// fallback for GPUs without Hopper's wgmma.
//
// One CTA handles kRows query rows of one KV head of one sequence over one contiguous
// slice ("split") of that sequence's keys, so a single long sequence still spreads over
// the whole GPU. It streams the keys in tiles of kTileTokens through a double-buffered
// cp.async pipeline, runs an online softmax in float32 and writes its partial output,
// normalised, with the partial log-sum-exp; combine_splits.cu merges the splits.
#include <cmath>

#include "device_utils.cuh"
#include "mla_decode.h"

namespace jax_etap {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kRows = 16;          // query rows per CTA: two per warp in the softmax
constexpr int kRowsPerWarp = kRows / kWarps;
constexpr int kTileTokens = 32;    // one key per lane in the score phase
constexpr int kChunk = 8;          // elements per 16-byte copy
// Each thread owns the output channels c = tid + kThreads * slot.
constexpr int kMaxValueSlots = (kMaxHeadDim + kThreads - 1) / kThreads;
static_assert(kRows % kWarps == 0, "rows must split evenly over warps");

// Rows of Q and K in shared memory are padded by one 16-byte chunk: with the unpadded
// 1152-byte stride every lane of the score phase (one key per lane) would hit one bank.
__host__ __device__ constexpr int padded_dim(int d_qk) { return d_qk + kChunk; }

struct SharedLayout {
  int q_offset, k_offset, p_offset, alpha_offset, bytes;
};

template <typename T>
__host__ __device__ SharedLayout shared_layout(int d_qk) {
  SharedLayout s;
  const int row_bytes = padded_dim(d_qk) * int(sizeof(T));
  s.q_offset = 0;
  s.k_offset = s.q_offset + kRows * row_bytes;
  s.p_offset = s.k_offset + 2 * kTileTokens * row_bytes;
  s.alpha_offset = s.p_offset + kRows * kTileTokens * int(sizeof(float));
  s.bytes = s.alpha_offset + kRows * int(sizeof(float));
  return s;
}

// The packed row r of KV head `kv_head` is query position r / groups of head kv_head * groups + r % groups.
__device__ __forceinline__ int64_t q_row_offset(const MlaDecodeParams& p, int b, int kv_head, int row) {
  const int s = row / p.groups();
  const int h = kv_head * p.groups() + row % p.groups();
  return ((int64_t(b) * p.s_q + s) * p.h_q + h) * p.d_qk;
}

// acc + q.k over one packed pair of each.
template <typename T>
__device__ __forceinline__ float dot2(uint32_t q_pair, uint32_t k_pair, float acc) {
  const float2 q = to_float2<T>(q_pair), k = to_float2<T>(k_pair);
  return fmaf(q.x, k.x, fmaf(q.y, k.y, acc));
}

template <typename T>
__device__ void load_q_tile(const MlaDecodeParams& p, T* q_s, int b, int kv_head, int row0) {
  const T* q = static_cast<const T*>(p.q);
  const int chunks = p.d_qk / kChunk;
  for (int i = threadIdx.x; i < kRows * chunks; i += kThreads) {
    const int r = i / chunks, c = i % chunks;
    const bool valid = row0 + r < p.rows();
    const T* src = valid ? q + q_row_offset(p, b, kv_head, row0 + r) + c * kChunk : q;
    cp_async_16_or_zero(q_s + r * padded_dim(p.d_qk) + c * kChunk, src, valid);
  }
}

// Keys [tile_start, tile_start + kTileTokens) of sequence b; keys at or past `end`, and
// keys whose block-table entry is out of range, are zero-filled and never read.
template <typename T>
__device__ void load_kv_tile(const MlaDecodeParams& p, T* k_s, int b, int kv_head, int tile_start, int end) {
  const T* kv = static_cast<const T*>(p.kv_cache);
  const int32_t* table = p.block_table + int64_t(b) * p.max_blocks_per_seq;
  const int chunks = p.d_qk / kChunk;
  for (int i = threadIdx.x; i < kTileTokens * chunks; i += kThreads) {
    const int j = i / chunks, c = i % chunks;
    const int t = tile_start + j;
    const T* src = kv;
    bool valid = t < end;
    if (valid) {
      const int block = __ldg(table + t / p.block_size);
      valid = block_index_valid(p, block);
      if (valid) {
        const int64_t token = int64_t(block) * p.block_size + t % p.block_size;
        src = kv + (token * p.h_kv + kv_head) * p.d_qk + c * kChunk;
      }
    }
    cp_async_16_or_zero(k_s + j * padded_dim(p.d_qk) + c * kChunk, src, valid);
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads, 1) split_kv_decode_kernel(const MlaDecodeParams p) {
  extern __shared__ __align__(16) unsigned char smem[];
  const SharedLayout layout = shared_layout<T>(p.d_qk);
  T* q_s = reinterpret_cast<T*>(smem + layout.q_offset);
  T* k_s = reinterpret_cast<T*>(smem + layout.k_offset);
  float* p_s = reinterpret_cast<float*>(smem + layout.p_offset);      // [kRows][kTileTokens]
  float* alpha_s = reinterpret_cast<float*>(smem + layout.alpha_offset);

  const int split = blockIdx.x, b = blockIdx.y;
  const int row_tiles = ceil_div(p.rows(), kRows);
  const int kv_head = blockIdx.z / row_tiles;
  const int row0 = (blockIdx.z % row_tiles) * kRows;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int stride = padded_dim(p.d_qk);

  const int seqlen = clamped_seqlen(p, b);
  // The last valid row of the tile sees the most keys.
  const int last_row = min(row0 + kRows, p.rows()) - 1;
  const int tile_key_end = row_key_end(p, seqlen, last_row);
  const int split_len = ceil_div(ceil_div(seqlen, p.num_splits), kTileTokens) * kTileTokens;
  const int start = split * split_len;
  const int end = min(start + split_len, tile_key_end);
  const int num_tiles = end > start ? ceil_div(end - start, kTileTokens) : 0;

  // Softmax state of this warp's rows, in log2 units, replicated over its lanes.
  float row_max[kRowsPerWarp], row_sum[kRowsPerWarp];
  int row_end[kRowsPerWarp];
  #pragma unroll
  for (int i = 0; i < kRowsPerWarp; ++i) {
    const int row = row0 + warp * kRowsPerWarp + i;
    row_max[i] = -INFINITY;
    row_sum[i] = 0.f;
    row_end[i] = row < p.rows() ? min(row_key_end(p, seqlen, row), end) : 0;
  }
  float acc[kRows][kMaxValueSlots];
#pragma unroll
  for (int r = 0; r < kRows; ++r)
#pragma unroll
    for (int s = 0; s < kMaxValueSlots; ++s) acc[r][s] = 0.f;

  const float scale_log2 = p.softmax_scale * float(M_LOG2E);

  load_q_tile(p, q_s, b, kv_head, row0);
  cp_async_commit();
  if (num_tiles > 0) load_kv_tile(p, k_s, b, kv_head, start, end);
  cp_async_commit();

  for (int tile = 0; tile < num_tiles; ++tile) {
    const int tile_start = start + tile * kTileTokens;
    const T* k_tile = k_s + (tile % 2) * kTileTokens * stride;
    if (tile + 1 < num_tiles) {
      load_kv_tile(p, k_s + ((tile + 1) % 2) * kTileTokens * stride, b, kv_head, tile_start + kTileTokens, end);
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();

    // Scores of this warp's rows: lane j takes key tile_start + j.
    {
      float dot[kRowsPerWarp] = {};
      const T* k_row = k_tile + lane * stride;
      // 16-byte reads: with the padded stride, 8 consecutive lanes cover all 32 banks.
      for (int c = 0; c < p.d_qk; c += kChunk) {
        const uint4 k8 = *reinterpret_cast<const uint4*>(k_row + c);
#pragma unroll
        for (int i = 0; i < kRowsPerWarp; ++i) {
          const uint4 q8 = *reinterpret_cast<const uint4*>(q_s + (warp * kRowsPerWarp + i) * stride + c);
          dot[i] = dot2<T>(q8.x, k8.x, dot2<T>(q8.y, k8.y, dot2<T>(q8.z, k8.z, dot2<T>(q8.w, k8.w, dot[i]))));
        }
      }
      const int t = tile_start + lane;
      #pragma unroll
      for (int i = 0; i < kRowsPerWarp; ++i) {
        const float score = t < row_end[i] ? dot[i] * scale_log2 : -INFINITY;
        const float new_max = nan_max(row_max[i], warp_max(score));
        // A row with no visible key yet keeps max -inf: its p and rescale stay 0 and 1.
        const bool seen = new_max != -INFINITY;
        const float prob = seen ? exp2f(score - new_max) : 0.f;
        const float alpha = seen ? exp2f(row_max[i] - new_max) : 1.f;
        row_sum[i] = row_sum[i] * alpha + warp_sum(prob);
        row_max[i] = new_max;
        const int r = warp * kRowsPerWarp + i;
        p_s[r * kTileTokens + lane] = prob;
        if (lane == 0) alpha_s[r] = alpha;
      }
    }
    __syncthreads();

    // O += P.V, V being the first d_v channels of the same key rows.
#pragma unroll
    for (int s = 0; s < kMaxValueSlots; ++s) {
      const int c = threadIdx.x + s * kThreads;
      if (c >= p.d_v) break;
#pragma unroll
      for (int r = 0; r < kRows; ++r) acc[r][s] *= alpha_s[r];
      // Not unrolled: unrolling hoists every tile's P loads and spills.
#pragma unroll 1
      for (int j = 0; j < kTileTokens; j += 4) {
        float v[4];
#pragma unroll
        for (int u = 0; u < 4; ++u) v[u] = to_float(k_tile[(j + u) * stride + c]);
#pragma unroll
        for (int r = 0; r < kRows; ++r) {
          const float4 prob = *reinterpret_cast<const float4*>(p_s + r * kTileTokens + j);
          acc[r][s] = fmaf(prob.x, v[0], fmaf(prob.y, v[1], fmaf(prob.z, v[2], fmaf(prob.w, v[3], acc[r][s]))));
        }
      }
    }
    __syncthreads();
  }
  cp_async_wait<0>();

  // Hand each row's final max and sum from its warp to every thread, through p_s.
  float* final_max = p_s;
  float* final_sum = p_s + kRows;
  if (lane == 0) {
    #pragma unroll
    for (int i = 0; i < kRowsPerWarp; ++i) {
      final_max[warp * kRowsPerWarp + i] = row_max[i];
      final_sum[warp * kRowsPerWarp + i] = row_sum[i];
    }
  }
  __syncthreads();

  const int64_t partial_row0 = ((int64_t(b) * p.num_splits + split) * p.h_kv + kv_head) * p.rows() + row0;
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    if (row0 + r >= p.rows()) break;
    const float sum = final_sum[r];
    const float inv_sum = sum > 0.f ? 1.f / sum : 0.f;
    float* dst = p.partial_out + (partial_row0 + r) * p.d_v;
#pragma unroll
    for (int s = 0; s < kMaxValueSlots; ++s) {
      const int c = threadIdx.x + s * kThreads;
      if (c < p.d_v) dst[c] = acc[r][s] * inv_sum;
    }
    if (threadIdx.x == 0)
      p.partial_lse[partial_row0 + r] = sum > 0.f ? (final_max[r] + log2f(sum)) * float(M_LN2) : -INFINITY;
  }
}

template <typename T>
cudaError_t launch(const MlaDecodeParams& p, cudaStream_t stream) {
  const int bytes = shared_layout<T>(p.d_qk).bytes;
  cudaError_t err = cudaFuncSetAttribute(split_kv_decode_kernel<T>, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
  if (err != cudaSuccess) return err;
  const dim3 grid(p.num_splits, p.batch, p.h_kv * ((p.rows() + kRows - 1) / kRows));
  split_kv_decode_kernel<T><<<grid, kThreads, bytes, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_split_kv_decode(const MlaDecodeParams& p, cudaStream_t stream) {
  return p.dtype == ElementType::kBFloat16 ? launch<__nv_bfloat16>(p, stream) : launch<__half>(p, stream);
}

}  // namespace jax_etap
