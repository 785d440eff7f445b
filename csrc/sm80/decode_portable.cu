// The portable MLA decode kernel (sm_80+, tensor cores through mma.sync): every shape the
// API accepts, on any GPU since Ampere. Hopper runs the sm90/ kernels where they apply
// (dispatch.cc).
//
// One CTA handles kRows = 16 packed query rows (s_q x heads of one KV head) over the
// pieces of one part of the split-KV schedule (common/schedule.cuh), so a single long
// sequence still spreads over the whole GPU; combine/combine_splits.cu merges split
// sequences. 16 rows are exactly mma.sync's M, so DeepSeek's 16 heads per GPU waste no
// tensor-core work.
//
// Per tile of kTileKeys keys, brought in by a double-buffered cp.async pipeline:
//   S = Q K^T   each of the 4 warps takes 16 keys, K = d_qk in steps of 16;
//   softmax     online, float32, in log2 units; the row max is shared across warps
//               through shared memory so every warp rescales by the same factor;
//   O += P V    P goes through shared memory (bf16/fp16), each warp owns a quarter of
//               the value channels, V being the first d_v channels of the same key rows.
#include <cmath>

#include "common/copy.cuh"
#include "common/launch_plan.h"
#include "common/numeric.cuh"
#include "common/output.cuh"
#include "common/schedule.cuh"
#include "common/sequence.cuh"
#include "kernels.h"
#include "sm80/mma.cuh"

namespace jax_etap {
namespace {

constexpr int kWarps = 4;
constexpr int kThreads = 32 * kWarps;
constexpr int kRows = 16;                          // mma M
constexpr int kKeysPerWarp = kTileKeys / kWarps;   // two n8 tiles of S per warp
constexpr int kChunk = 8;                          // 16-bit elements per 16-byte copy
constexpr int kPStride = kTileKeys + kChunk;
static_assert(kKeysPerWarp == 16, "the score phase gives each warp two 8-key mma tiles");

// Shared-memory row stride of Q and K tiles: wide enough for every column the value
// phase reads, plus one 16-byte chunk, which makes the stride an odd number of chunks so
// the 8 row addresses of an ldmatrix fall in distinct banks.
__host__ __device__ constexpr int row_stride(int d_qk, int value_tiles) {
  const int value_cols = kWarps * value_tiles * 8;
  return (d_qk > value_cols ? d_qk : value_cols) + kChunk;
}

struct SharedLayout {
  int q_offset, k_offset, p_offset, reduce_offset, bytes;
};

template <typename T>
__host__ __device__ SharedLayout shared_layout(int d_qk, int value_tiles) {
  SharedLayout s;
  const int row_bytes = row_stride(d_qk, value_tiles) * int(sizeof(T));
  s.q_offset = 0;
  s.k_offset = s.q_offset + kRows * row_bytes;
  s.p_offset = s.k_offset + 2 * kTileKeys * row_bytes;
  s.reduce_offset = s.p_offset + kRows * kPStride * int(sizeof(T));
  s.bytes = s.reduce_offset + kWarps * kRows * int(sizeof(float));
  return s;
}

template <typename T>
__device__ void load_q_tile(const MlaDecodeParams& p, T* q_s, int stride, int b, int kv_head, int row0) {
  const T* q = static_cast<const T*>(p.q);
  const int chunks = p.d_qk / kChunk;
  for (int i = threadIdx.x; i < kRows * chunks; i += kThreads) {
    const int r = i / chunks, c = i % chunks;
    const bool valid = row0 + r < p.rows;
    const T* src = valid ? q + QueryRow(p, kv_head, row0 + r).q_offset(p, b) + c * kChunk : q;
    cp_async_16_or_zero(q_s + r * stride + c * kChunk, src, valid);
  }
}

// Keys [tile_start, tile_start + kTileKeys) of sequence b; keys at or past `end`, and
// keys whose block-table entry is out of range, are zero-filled and never read.
// 8 consecutive threads copy 128 contiguous bytes of one key row per instruction, and each
// thread looks its key's block up once per pass rather than once per 16-byte chunk.
constexpr int kThreadsPerKey = 8;
constexpr int kKeysPerPass = kThreads / kThreadsPerKey;

template <typename T>
__device__ void load_kv_tile(const MlaDecodeParams& p, T* k_s, int stride, int b, int kv_head, int tile_start,
                             int end) {
  const T* kv = static_cast<const T*>(p.kv_cache);
  const int32_t* table = p.block_table + int64_t(b) * p.max_blocks_per_seq;
  const int chunk0 = threadIdx.x % kThreadsPerKey;
#pragma unroll 1
  for (int j = threadIdx.x / kThreadsPerKey; j < kTileKeys; j += kKeysPerPass) {
    const int t = tile_start + j;
    const T* src = kv;
    bool valid = t < end;
    if (valid) {
      const int block = __ldg(table + t / p.block_size);
      valid = block_index_valid(p, block);
      if (valid) src = kv + ((int64_t(block) * p.block_size + t % p.block_size) * p.h_kv + kv_head) * p.d_qk;
    }
    // d_qk is a multiple of 64, so every thread of the key copies the same number of chunks.
    for (int c = chunk0; c < p.d_qk / kChunk; c += kThreadsPerKey)
      cp_async_16_or_zero(k_s + j * stride + c * kChunk, valid ? src + c * kChunk : kv, valid);
  }
}

// Max (NaN-propagating) or sum over the 4 lanes of a quad: the lanes holding one row's keys.
__device__ __forceinline__ float quad_max(float x) {
  x = nan_max(x, __shfl_xor_sync(0xffffffffu, x, 1));
  return nan_max(x, __shfl_xor_sync(0xffffffffu, x, 2));
}
__device__ __forceinline__ float quad_sum(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 1);
  return x + __shfl_xor_sync(0xffffffffu, x, 2);
}

// kValueTiles: 8-channel mma tiles of the output per warp (each warp owns kValueTiles * 8 channels).
template <typename T, int kValueTiles>
__device__ void decode_piece(const MlaDecodeParams& p, const Piece& piece, int kv_head, int row0, unsigned char* smem) {
  static_assert(kValueTiles % 2 == 0, "value tiles are loaded in pairs");
  const SharedLayout layout = shared_layout<T>(p.d_qk, kValueTiles);
  const int stride = row_stride(p.d_qk, kValueTiles);
  T* q_s = reinterpret_cast<T*>(smem + layout.q_offset);
  T* k_s = reinterpret_cast<T*>(smem + layout.k_offset);
  T* p_s = reinterpret_cast<T*>(smem + layout.p_offset);             // [kRows][kPStride]
  float* reduce_s = reinterpret_cast<float*>(smem + layout.reduce_offset);  // [kWarps][kRows]

  const int b = piece.b;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int g = lane / 4, t = lane % 4;  // mma fragment coordinates: rows g and g + 8

  const int seqlen = clamped_seqlen(p, b);
  const int last_row = min(row0 + kRows, p.rows) - 1;  // it sees the most keys
  const int start = piece.tile_begin * kTileKeys;
  const int piece_end = min(piece.tile_end * kTileKeys, seqlen);
  const int end = min(piece_end, row_key_end(p, seqlen, last_row));
  const int num_tiles = end > start ? ceil_div(end - start, kTileKeys) : 0;

  // Softmax state of rows g and g + 8, in log2 units. The max is the same in every
  // thread; the sum is this thread's share, reduced once at the end.
  float row_max[2] = {-INFINITY, -INFINITY}, row_sum[2] = {0.f, 0.f};
  int row_end[2];
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int row = row0 + g + 8 * i;
    row_end[i] = row < p.rows ? min(row_key_end(p, seqlen, row), end) : 0;
  }
  float acc[kValueTiles][4];
#pragma unroll
  for (int j = 0; j < kValueTiles; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) acc[j][e] = 0.f;
  const int value_col0 = warp * kValueTiles * 8;
  const float scale_log2 = p.softmax_scale * float(M_LOG2E);

  __syncthreads();  // the previous piece is done with every shared buffer
  load_q_tile(p, q_s, stride, b, kv_head, row0);
  cp_async_commit();
  if (num_tiles > 0) load_kv_tile(p, k_s, stride, b, kv_head, start, end);
  cp_async_commit();
  for (int tile = 0; tile < num_tiles; ++tile) {
    const int tile_start = start + tile * kTileKeys;
    const T* k_tile = k_s + (tile % 2) * kTileKeys * stride;
    if (tile + 1 < num_tiles) {
      load_kv_tile(p, k_s + ((tile + 1) % 2) * kTileKeys * stride, stride, b, kv_head, tile_start + kTileKeys, end);
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();

    // S for this warp's 16 keys: s[n][0..1] = rows g, s[n][2..3] = row g + 8, keys n*8 + 2t + {0, 1}.
    float s[2][4] = {};
    {
      // Even and odd k-steps accumulate apart: four independent mma chains instead of two.
      float s_odd[2][4] = {};
      const T* q_row = q_s + (lane % 16) * stride + (lane / 16) * 8;
      const T* k_row = k_tile + (warp * kKeysPerWarp + lane % 8 + (lane / 16) * 8) * stride + ((lane / 8) % 2) * 8;
#pragma unroll 2
      for (int kk = 0; kk < p.d_qk; kk += 32) {
        uint32_t a[4], bk[4];
        ldmatrix_x4(a, q_row + kk);
        ldmatrix_x4(bk, k_row + kk);
        mma_16x8x16<T>(s[0], a, bk[0], bk[1]);
        mma_16x8x16<T>(s[1], a, bk[2], bk[3]);
        ldmatrix_x4(a, q_row + kk + 16);
        ldmatrix_x4(bk, k_row + kk + 16);
        mma_16x8x16<T>(s_odd[0], a, bk[0], bk[1]);
        mma_16x8x16<T>(s_odd[1], a, bk[2], bk[3]);
      }
#pragma unroll
      for (int n = 0; n < 2; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e) s[n][e] += s_odd[n][e];
    }

    float tile_max[2] = {-INFINITY, -INFINITY};
#pragma unroll
    for (int n = 0; n < 2; ++n)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int key = tile_start + warp * kKeysPerWarp + n * 8 + 2 * t + (e & 1);
        s[n][e] = key < row_end[e / 2] ? s[n][e] * scale_log2 : -INFINITY;
        tile_max[e / 2] = nan_max(tile_max[e / 2], s[n][e]);
      }
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      tile_max[i] = quad_max(tile_max[i]);
      if (t == 0) reduce_s[warp * kRows + g + 8 * i] = tile_max[i];
    }
    __syncthreads();

    float alpha[2];
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      float m = row_max[i];
      for (int w = 0; w < kWarps; ++w) m = nan_max(m, reduce_s[w * kRows + g + 8 * i]);
      // A row with no visible key yet keeps max -inf: its p and rescale stay 0 and 1.
      const bool seen = m != -INFINITY;
      alpha[i] = seen ? exp2f(row_max[i] - m) : 1.f;
      row_max[i] = m;
      row_sum[i] *= alpha[i];
    }
#pragma unroll
    for (int n = 0; n < 2; ++n)
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        const bool seen = row_max[i] != -INFINITY;
        const float p0 = seen ? exp2f(s[n][2 * i] - row_max[i]) : 0.f;
        const float p1 = seen ? exp2f(s[n][2 * i + 1] - row_max[i]) : 0.f;
        row_sum[i] += p0 + p1;
        const int col = warp * kKeysPerWarp + n * 8 + 2 * t;
        *reinterpret_cast<uint32_t*>(p_s + (g + 8 * i) * kPStride + col) = pack_pair<T>(p0, p1);
      }
#pragma unroll
    for (int j = 0; j < kValueTiles; ++j) {
      acc[j][0] *= alpha[0];
      acc[j][1] *= alpha[0];
      acc[j][2] *= alpha[1];
      acc[j][3] *= alpha[1];
    }
    __syncthreads();

    // O[:, value_col0 ...] += P V over the tile's 64 keys.
#pragma unroll
    for (int ks = 0; ks < kTileKeys; ks += 16) {
      uint32_t a[4];
      ldmatrix_x4(a, p_s + (lane % 16) * kPStride + ks + (lane / 16) * 8);
      const T* v_row = k_tile + (ks + lane % 8 + ((lane / 8) % 2) * 8) * stride + value_col0 + (lane / 16) * 8;
#pragma unroll
      for (int j = 0; j < kValueTiles; j += 2) {
        uint32_t bv[4];
        ldmatrix_x4_trans(bv, v_row + j * 8);
        mma_16x8x16<T>(acc[j], a, bv[0], bv[1]);
        mma_16x8x16<T>(acc[j + 1], a, bv[2], bv[3]);
      }
    }
    __syncthreads();
  }
  cp_async_wait<0>();

  // Each row's sum: over the quad, then over the warps (each saw a quarter of the keys).
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    row_sum[i] = quad_sum(row_sum[i]);
    if (t == 0) reduce_s[warp * kRows + g + 8 * i] = row_sum[i];
  }
  // Every block holding the piece's keys must be inside the cache (causal rows that stop
  // early do not excuse a bad block the sequence uses).
  const bool blocks_ok = __syncthreads_and(blocks_in_range(p, b, start, piece_end, threadIdx.x, kThreads));

#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int r = g + 8 * i;
    if (row0 + r >= p.rows) continue;
    const RowResult<T> result(p, piece, kv_head, row0 + r);
    float sum = 0.f;
    for (int w = 0; w < kWarps; ++w) sum += reduce_s[w * kRows + r];
    // No visible key: sum 0, out 0, lse -inf. A NaN sum (NaN scores, or a block outside
    // the cache) stays NaN in both.
    const float checked = blocks_ok ? sum : NAN;
    const float inv_sum = output_scale(checked);
#pragma unroll
    for (int j = 0; j < kValueTiles; ++j) {
      const int col = value_col0 + j * 8 + 2 * t;
      if (col < p.d_v) result.store(col, acc[j][2 * i] * inv_sum);
      if (col + 1 < p.d_v) result.store(col + 1, acc[j][2 * i + 1] * inv_sum);
    }
    if (warp == 0 && t == 0)
      result.store_lse(row_lse(row_max[i], checked));
  }
}

template <typename T, int kValueTiles>
__global__ void __launch_bounds__(kThreads, 1) decode_sm80_kernel(const MlaDecodeParams p) {
  extern __shared__ __align__(16) unsigned char smem[];
  const int row_tiles = ceil_div(p.rows, kRows);
  const int kv_head = blockIdx.y / row_tiles;
  const int row0 = (blockIdx.y % row_tiles) * kRows;
  PartPieces pieces(p, blockIdx.x);
  Piece piece;
  while (pieces.next(piece)) decode_piece<T, kValueTiles>(p, piece, kv_head, row0, smem);
  if (blockIdx.y == 0 && threadIdx.x < 32) record_sequence_parts(p, blockIdx.x);
}

template <typename T, int kValueTiles>
cudaError_t launch(MlaDecodeParams& p, cudaStream_t stream) {
  auto* kernel = decode_sm80_kernel<T, kValueTiles>;
  const int bytes = shared_layout<T>(p.d_qk, kValueTiles).bytes;
  if (cudaError_t err = allow_dynamic_smem(reinterpret_cast<const void*>(kernel), bytes); err != cudaSuccess)
    return err;
  const dim3 grid(p.num_parts, p.h_kv * ceil_div(p.rows, kRows));
  kernel<<<grid, kThreads, bytes, stream>>>(p);
  return cudaGetLastError();
}

// The fewest value tiles per warp that cover d_v.
template <typename T>
cudaError_t launch_for_value_dim(MlaDecodeParams& p, cudaStream_t stream) {
  if (p.d_v <= 128) return launch<T, 4>(p, stream);
  if (p.d_v <= 256) return launch<T, 8>(p, stream);
  if (p.d_v <= 512) return launch<T, 16>(p, stream);
  static_assert(kWarps * 18 * 8 == kMaxHeadDim, "18 value tiles per warp cover the widest d_v");
  return launch<T, 18>(p, stream);
}

}  // namespace

cudaError_t launch_decode_portable(MlaDecodeParams& p, cudaStream_t stream) {
  if (cudaError_t err = plan_parts(p, p.h_kv * ceil_div(p.rows, kRows)); err != cudaSuccess) return err;
  return p.dtype == ElementType::kBFloat16 ? launch_for_value_dim<__nv_bfloat16>(p, stream)
                                           : launch_for_value_dim<__half>(p, stream);
}

}  // namespace jax_etap
