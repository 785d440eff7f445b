// The wide kernel: MLA decode on Hopper (sm_90a) for more than kEtapMaxRows (32) query rows
// per KV head (64 or 128 heads per GPU, or several query positions of 32+ heads).
//
// With 64 rows the usual GEMMs waste nothing, so this kernel keeps them: a tile of 64
// packed query rows is wgmma's M, and the keys (scores) or the value channels (outputs) N:
//   S (64 rows x 64 keys)    = Q (64 x d_qk) * K^T (d_qk x 64)    m64n64k16, A and B in shared memory
//   O (64 rows x 512 values) += P (64 x 64) * V (64 x 512)        m64n256k16, P from registers
// The ETAP kernel's transpose would put these rows on N = 64 instead and read both P^T and
// V^T from shared memory for every 64 value channels: twice this kernel's shared-memory
// traffic in the P.V product.
//
// The producer warpgroup is sm90_pipeline.cuh's, with 64-row query tiles. The two consumer
// warpgroups run the same program on the same tiles: each computes all of S and the
// online softmax along its rows (a thread holds 2 rows; their maxima and sums reduce over
// the 4 lanes that share them), keeps P rounded to bf16/fp16 in registers as the A operand
// of its P.V, and owns half of O (value channels 0-255 or 256-511). Computing S twice
// costs tensor-core time, but the consumers then share nothing but the KV stage: in the
// first version, where one warpgroup computed S and handed P, the rescale factors and the
// row sums to the other through shared memory, the handing warpgroup was the critical path
// and the other waited for it 73% of its time (Nsight Compute stall sampling, b128 s8K
// h64, RESULTS.md).
#include <cmath>

#include "device_utils.cuh"
#include "mla_decode.h"
#include "mma_sm80.cuh"
#include "schedule.cuh"
#include "sm90_pipeline.cuh"
#include "sm90_primitives.cuh"
#include "wgmma_sm90.cuh"

namespace jax_etap {
namespace {

using namespace sm90;

constexpr int kRows = 64;                   // query rows per CTA: wgmma's M
constexpr int kHalfValues = kValueDim / 2;  // value channels per consumer warpgroup
constexpr int kHalfBoxes = kValueBoxes / 2;
constexpr int kScores = kTileKeys / 2;      // S accumulators a thread holds (m64n64)
constexpr int kOutputs = kHalfValues / 2;   // O accumulators a thread holds (m64n256)
constexpr int kKSteps = kTileKeys / 16;     // k16 steps of the P.V product
// Named barriers: each consumer warpgroup's own (1, 2), and both together (3).
constexpr int kBothConsumersBarrier = kFirstConsumerBarrier + 2;

// No shared memory or barriers of its own: the pipeline's regions are all it uses.
using SmemLayout = PipelineLayout<kRows, 0, 0>;
using Smem = PipelineSmem<SmemLayout>;

// The two rows of a 64-row tile that a consumer thread's accumulators hold (wgmma's D
// layout, wgmma_sm90.cuh): register 4j + e of S or O is row h = e / 2 of them.
struct ThreadRows {
  int r[2];

  __device__ ThreadRows() {
    const int t = threadIdx.x % kWarpgroup;
    r[0] = 16 * (t / 32) + t % 32 / 4;
    r[1] = r[0] + 8;
  }
};
__device__ __forceinline__ constexpr int row_of_register(int i) { return i % 4 / 2; }

// out (or the piece's partial slot) = O * scale for this thread's rows that the CTA holds,
// value channels first_value .. first_value + 255.
template <typename T>
__device__ void store_outputs(const MlaDecodeParams& p, const Piece& piece, int kv_head, int row0, int first_value,
                              const float (&o)[kOutputs], const float (&scale)[2], const QueryRow* query_rows) {
  const ThreadRows rows;
  const int q = threadIdx.x % 4;
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int r = rows.r[h];
    if (row0 + r >= p.rows) continue;
    const RowResult<T> result(p, piece, kv_head, row0 + r, query_rows[r]);
#pragma unroll
    for (int j = 0; j < kOutputs / 4; ++j)
      result.store_pair(first_value + 8 * j + 2 * q, o[4 * j + 2 * h] * scale[h], o[4 * j + 2 * h + 1] * scale[h]);
  }
}

// V's channels first_box * 64 .. + 255 of a stage, keys 16 k .. 16 k + 15, as wgmma's B:
// N-major (channels contiguous in each 64-channel box; the 4 boxes 8 KiB apart, 8-key
// groups 1024 bytes apart).
__device__ __forceinline__ uint64_t value_descriptor(const Smem& s, int stage, int first_box, int k) {
  return matrix_descriptor(s.kv_box(stage, first_box) + k * 16 * kRowBytes, kBoxBytes, 1024);
}

// Consumer warpgroup `half` (0 or 1): S, the online softmax along the keys, P, and O for
// value channels 256 * half .. + 255. Warpgroup 0 also writes the rows' lse.
template <typename T>
__device__ void consumer_warpgroup(const MlaDecodeParams& p, const Smem& s, PartPieces& pieces, int kv_head, int row0,
                                   int half) {
  const int t = threadIdx.x % kWarpgroup, lane = t % 32, q = lane % 4;
  const int k_boxes = p.d_qk / kBoxChannels;
  const float scale_log2 = p.softmax_scale * float(M_LOG2E);
  const int first_box = half * kHalfBoxes;
  const ThreadRows rows;
  float o[kOutputs];
  int tile_count = 0, piece_count = 0;
  Piece piece;
  while (pieces.next(piece)) {
    const int seqlen = clamped_seqlen(p, piece.b);
    // Softmax state of this thread's two rows, in log2 units: the running max is the same
    // in the 4 lanes that share a row; the sum is this lane's share, reduced at the end.
    float row_max[2] = {-INFINITY, -INFINITY}, row_sum[2] = {0.f, 0.f};
    int key_end[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int r = rows.r[h];
      key_end[h] = row0 + r < p.rows ? position_key_end(p, seqlen, s.query_rows()[r].s) : seqlen;
    }
    // Tiles that end before the first key a row of this CTA cannot see need no mask.
    const int unmasked_end = position_key_end(p, seqlen, s.query_rows()[0].s);
#pragma unroll
    for (int i = 0; i < kOutputs; ++i) o[i] = 0.f;
    bool blocks_ok = true;
    mbarrier_wait(s.q_full(), piece_count & 1);

    for (int tile = piece.tile_begin; tile < piece.tile_end; ++tile, ++tile_count) {
      const int stage = stage_of(tile_count);
      float score[kScores];
      score_tile<T, kTileKeys, false>(s, stage, phase_of(tile_count), k_boxes, score);
      if (tile == piece.tile_end - 1) mbarrier_arrive(s.q_empty());  // this thread is done with q
      blocks_ok = blocks_ok && !s.stage_bad()[stage];
      // Both warpgroups are past their reads of the stage's keys: the values past the
      // sequence's end may be zeroed (each warpgroup zeroes the half it reads).
      barrier_sync(kBothConsumersBarrier, kConsumerThreads);

      // Row maxima over the tile's 64 keys: this thread's 16 keys of each row, then the 4
      // lanes that share it. The scale is applied in the exponent (it is positive).
      const bool masked = (tile + 1) * kTileKeys > unmasked_end;
      const int key0 = tile * kTileKeys + 2 * q;
      float tile_max[2] = {-INFINITY, -INFINITY};
#pragma unroll
      for (int i = 0; i < kScores; ++i) {
        const int h = row_of_register(i);
        if (masked && key0 + 8 * (i / 4) + i % 2 >= key_end[h]) score[i] = -INFINITY;
        tile_max[h] = nan_max(tile_max[h], score[i]);
      }
      float alpha[2], max_scaled[2];
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        tile_max[h] = nan_max(tile_max[h], __shfl_xor_sync(0xffffffffu, tile_max[h], 1));
        tile_max[h] = nan_max(tile_max[h], __shfl_xor_sync(0xffffffffu, tile_max[h], 2));
        const float m = nan_max(row_max[h], tile_max[h] * scale_log2);
        // A row with no visible key yet keeps max -inf: p = 0, and nothing to rescale.
        alpha[h] = m == -INFINITY ? 1.f : fast_exp2(row_max[h] - m);
        row_max[h] = m;
        max_scaled[h] = m == -INFINITY ? 0.f : m;  // exp2(-inf * scale - 0) = 0 for the masked keys
        row_sum[h] *= alpha[h];
      }
#pragma unroll
      for (int i = 0; i < kScores; ++i) {
        const int h = row_of_register(i);
        score[i] = fast_exp2(fmaf(score[i], scale_log2, -max_scaled[h]));
        row_sum[h] += score[i];
      }
#pragma unroll
      for (int i = 0; i < kOutputs; ++i) o[i] *= alpha[row_of_register(i)];
      // P as wgmma A fragments, k16 step k in p_regs[k]: the D layout of S read in pairs.
      uint32_t p_regs[kKSteps][4];
#pragma unroll
      for (int k = 0; k < kKSteps; ++k)
#pragma unroll
        for (int i = 0; i < 4; ++i) p_regs[k][i] = pack_pair<T>(score[8 * k + 2 * i], score[8 * k + 2 * i + 1]);

      zero_values_past_end(s, stage, seqlen - tile * kTileKeys, t, first_box, kHalfBoxes);
      fence_proxy_async();
      // The zeros, for this warpgroup's wgmma. On every tile: a barrier under a condition
      // puts the wgmma after it on a divergent path for ptxas, which serialises them (C7520).
      barrier_sync(kFirstConsumerBarrier + half, kWarpgroup);

      pin_registers(o);
      wgmma_fence();
#pragma unroll
      for (int k = 0; k < kKSteps; ++k)
        WgmmaN256<T>::template mma_rs<1>(o, p_regs[k], value_descriptor(s, stage, first_box, k), true);
      wgmma_commit();
      wgmma_wait<0>();
      pin_registers(o);
      mbarrier_arrive(s.kv_empty(stage));
    }

    float scale[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      row_sum[h] += __shfl_xor_sync(0xffffffffu, row_sum[h], 1);
      row_sum[h] += __shfl_xor_sync(0xffffffffu, row_sum[h], 2);
      if (!blocks_ok) row_sum[h] = NAN;
      scale[h] = output_scale(row_sum[h]);
      const int r = rows.r[h];
      if (half == 0 && q == 0 && row0 + r < p.rows) {
        const float sum = row_sum[h];
        const float lse = sum != sum ? NAN : sum == 0.f ? -INFINITY : (row_max[h] + log2f(sum)) * float(M_LN2);
        RowResult<T>(p, piece, kv_head, row0 + r, s.query_rows()[r]).store_lse(lse);
      }
    }
    store_outputs<T>(p, piece, kv_head, row0, half * kHalfValues, o, scale, s.query_rows());
    ++piece_count;
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads, 1) decode_sm90_wide_kernel(const MlaDecodeParams p,
                                                                         const __grid_constant__ CUtensorMap kv_map) {
  // No static shared memory anywhere in this kernel: the dynamic block starts at the
  // (1024-byte aligned) base of the CTA's shared window.
  extern __shared__ __align__(1024) unsigned char smem[];
  const Smem s{smem};
  const CtaRows cta(p, kRows);
  start_pipeline<kRows>(p, s, &kv_map, cta, kConsumerThreads, [] {});

  PartPieces pieces(p, blockIdx.x);  // every warp walks the same pieces
  run_roles<T, kRows>(p, &kv_map, s, pieces, cta, [&] { consumer_warpgroup<T>(p, s, pieces, cta.kv_head, cta.row0, 0); },
                    [&] { consumer_warpgroup<T>(p, s, pieces, cta.kv_head, cta.row0, 1); });
}

}  // namespace

cudaError_t launch_decode_sm90_wide(MlaDecodeParams& p, cudaStream_t stream) {
  return p.dtype == ElementType::kBFloat16
             ? launch_pipeline_kernel<kRows>(decode_sm90_wide_kernel<__nv_bfloat16>, SmemLayout::kBytes, p, stream)
             : launch_pipeline_kernel<kRows>(decode_sm90_wide_kernel<__half>, SmemLayout::kBytes, p, stream);
}

}  // namespace jax_etap
