// The wide kernel: MLA decode on Hopper (sm_90a) for more than kEtapMaxRows (32) query rows
// per KV head (64 or 128 heads per GPU, or several query positions of 32+ heads).
//
// With 64 rows the usual GEMMs waste nothing, so this kernel keeps them: a tile of 64
// packed query rows is wgmma's M, and the keys (scores) or the value channels (outputs) N:
//   S (64 rows x 64 keys)    = Q (64 x d_qk) * K^T (d_qk x 64)    m64n64k16, A and B in shared memory
//   O (64 rows x 512 values) += P (64 x 64) * V (64 x 512)        m64n256k16, P from registers or shared memory
// The ETAP kernel's transpose would put these rows on N = 64 instead and read both P^T and
// V^T from shared memory for every 64 value channels: twice this kernel's shared-memory
// traffic in the P.V product.
//
// The producer warpgroup is pipeline.cuh's, with 64-row query tiles. The two consumer
// warpgroups each own half of O (value channels 0-255 or 256-511) and take the KV tiles
// in pairs, FlashMLA's "seesaw": warpgroup 0 computes S and the softmax of the pair's
// first tile, warpgroup 1 those of the second, so every score is computed once and one
// warpgroup's softmax runs while the other's products keep the tensor cores busy. With
// m the rows' running maximum before the pair, m0 after the first tile and m1 after the
// second (alpha0 = 2^(m - m0), alpha1 = 2^(m0 - m1)), each warpgroup updates its half as
//   O = (O * alpha0 + P0 V0) * alpha1 + P1 V1,
// P0 relative to m0 and P1 to m1, each rounded once: the warpgroup that computed a P
// multiplies it from registers, the other reads it from shared memory, where it takes
// the place of its tile's last box once the tile's scores are done. Warpgroup 0 publishes
// m0 and P0 to warpgroup 1, which multiplies P0 first (so the first stage goes back to the
// producer early), then computes its own tile's scores and softmax with m0; warpgroup 1
// publishes m1 and P1 back. Each keeps the row sum of its own P, added up at the end of a
// piece.
//
// Before this schedule the two warpgroups computed all of S each and ran in step (the
// same tiles, one softmax at a time): the tensor cores did 1.5x the useful work and waited
// for every softmax (332-353 TFLOP/s on the H200). And in the first version, where one
// warpgroup computed S and handed P to the other, that one was the critical path and the
// other waited for it 73% of its time (Nsight Compute, b128 s8K h64, RESULTS.md).
#include <cmath>

#include "common/numeric.cuh"
#include "common/output.cuh"
#include "common/params.h"
#include "common/schedule.cuh"
#include "common/sequence.cuh"
#include "kernels.h"
#include "sm90/pipeline.cuh"
#include "sm90/pipeline_launch.cuh"
#include "sm90/primitives.cuh"
#include "sm90/wgmma.cuh"

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

// The kernel's own shared memory: per consumer warpgroup, the row maxima it publishes
// for a pair of tiles and its share of a piece's row sums.
struct OwnLayout {
  static constexpr int kMaxima = 0;                      // float [2 warpgroups][kRows]
  static constexpr int kSums = kMaxima + 2 * kRows * 4;  // float [2][kRows]
  static constexpr int kBytes = kSums + 2 * kRows * 4;
  static constexpr int kBarriers = 2;                    // published[2]
};
using SmemLayout = PipelineLayout<kRows, OwnLayout::kBytes, OwnLayout::kBarriers>;

struct Smem : PipelineSmem<SmemLayout> {
  __device__ float* maxima(int warpgroup) const {
    return reinterpret_cast<float*>(own(OwnLayout::kMaxima + warpgroup * kRows * 4));
  }
  __device__ float* sums(int warpgroup) const {
    return reinterpret_cast<float*>(own(OwnLayout::kSums + warpgroup * kRows * 4));
  }
  // Consumer warpgroup w has published its tile of the pair: the rows' maxima after it,
  // its P, and its values past the sequence's end zeroed (arrived on by its 128 threads).
  __device__ uint64_t* published(int warpgroup) const { return own_barrier(warpgroup); }
  // P of the tile in `stage` (64 rows x 64 keys, K-major, swizzled like the query tile):
  // the stage's last box, free once the tile's scores are done (the rope channels at
  // d_qk 576, a box no copy fills at 512).
  __device__ unsigned char* p_tile(int stage) const { return kv_box(stage, kMaxKBoxes - 1); }
};

// The two rows of a 64-row tile that a consumer thread's accumulators hold (wgmma's D
// layout, wgmma.cuh): register 4j + e of S or O is row h = e / 2 of them.
struct ThreadRows {
  int r[2];

  __device__ ThreadRows() {
    const int t = threadIdx.x % kWarpgroup;
    r[0] = 16 * (t / 32) + t % 32 / 4;
    r[1] = r[0] + 8;
  }
};
__device__ __forceinline__ constexpr int row_of_register(int i) { return i % 4 / 2; }

// The factor that moves values relative to the running maximum `from` to `to` (>= from):
// a row with no visible key yet keeps max -inf, and has nothing to rescale.
__device__ __forceinline__ float rescale(float from, float to) { return to == -INFINITY ? 1.f : fast_exp2(from - to); }

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

// One consumer warpgroup's view of the piece being decoded: its rows' softmax state
// (log2 units: the running max, the same in the 4 lanes that share a row, and this
// lane's share of the row sum of this warpgroup's P), its half of O, and the masks.
template <typename T>
struct HalfDecode {
  const MlaDecodeParams& p;
  const Smem& s;
  const ThreadRows rows;
  const int q = threadIdx.x % 4;
  const float scale_log2;
  const int first_box;  // of this warpgroup's value channels
  int seqlen, unmasked_end;
  int key_end[2];
  float row_max[2], row_sum[2];
  float o[kOutputs];

  __device__ HalfDecode(const MlaDecodeParams& params, const Smem& smem, int half)
      : p(params), s(smem), scale_log2(params.softmax_scale * float(M_LOG2E)), first_box(half * kHalfBoxes) {}

  __device__ void start(const Piece& piece, int row0) {
    seqlen = clamped_seqlen(p, piece.b);
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int r = rows.r[h];
      key_end[h] = row0 + r < p.rows ? position_key_end(p, seqlen, s.query_rows()[r].s) : seqlen;
      row_max[h] = -INFINITY;
      row_sum[h] = 0.f;
    }
    // Tiles that end before the first key a row of this CTA cannot see need no mask.
    unmasked_end = position_key_end(p, seqlen, s.query_rows()[0].s);
#pragma unroll
    for (int i = 0; i < kOutputs; ++i) o[i] = 0.f;
  }

  // The scores of `tile` (in `stage`), masked, and their maxima over each row's 64 keys
  // (this thread's 16, then the 4 lanes that share the row), not yet scaled.
  __device__ void scores(int tile, int stage, uint32_t phase, float (&score)[kScores], float (&tile_max)[2]) const {
    score_tile<T, kTileKeys, false>(s, stage, phase, p.d_qk / kBoxChannels, score);
    const bool masked = (tile + 1) * kTileKeys > unmasked_end;
    const int key0 = tile * kTileKeys + 2 * q;
    tile_max[0] = tile_max[1] = -INFINITY;
#pragma unroll
    for (int i = 0; i < kScores; ++i) {
      const int h = row_of_register(i);
      if (masked && key0 + 8 * (i / 4) + i % 2 >= key_end[h]) score[i] = -INFINITY;
      tile_max[h] = nan_max(tile_max[h], score[i]);
    }
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      tile_max[h] = nan_max(tile_max[h], __shfl_xor_sync(0xffffffffu, tile_max[h], 1));
      tile_max[h] = nan_max(tile_max[h], __shfl_xor_sync(0xffffffffu, tile_max[h], 2));
    }
  }

  // The new running max after a tile whose maxima are `tile_max` (scaled here), from `max`.
  __device__ void raise(const float (&max)[2], const float (&tile_max)[2], float (&raised)[2]) const {
#pragma unroll
    for (int h = 0; h < 2; ++h) raised[h] = nan_max(max[h], tile_max[h] * scale_log2);
  }

  // P = 2^(score * scale - max) rounded to T as wgmma A fragments (k16 step k in
  // p_regs[k]: the D layout of S read in pairs), summed into row_sum unrounded.
  __device__ void exponentiate(float (&score)[kScores], const float (&max)[2], uint32_t (&p_regs)[kKSteps][4]) {
    float max_scaled[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) max_scaled[h] = max[h] == -INFINITY ? 0.f : max[h];  // exp2(-inf - 0) = 0: masked keys
#pragma unroll
    for (int i = 0; i < kScores; ++i) {
      const int h = row_of_register(i);
      score[i] = fast_exp2(fmaf(score[i], scale_log2, -max_scaled[h]));
      row_sum[h] += score[i];
    }
#pragma unroll
    for (int k = 0; k < kKSteps; ++k)
#pragma unroll
      for (int i = 0; i < 4; ++i) p_regs[k][i] = pack_pair<T>(score[8 * k + 2 * i], score[8 * k + 2 * i + 1]);
  }

  // This warpgroup's tile of the pair, for the other warpgroup: the values past the
  // sequence's end zeroed (`valid` keys of the tile are the sequence's; K is V, and 0 *
  // NaN would poison the output where P = 0), P in the stage's P tile, the rows' new
  // maxima; then this thread's arrival on published(half).
  __device__ void publish(int half, int stage, int valid, const uint32_t (&p_regs)[kKSteps][4],
                          const float (&max)[2]) const {
    zero_values_past_end(s, stage, valid, threadIdx.x % kWarpgroup);
    // k16 step k as four 8x8 matrices: p_regs[k][i] holds rows r[i % 2] of this warp's 16,
    // keys 16k + 8 (i / 2) ..; lane 8i + j addresses row j of matrix i.
    const int lane = threadIdx.x % 32, row = 16 * (threadIdx.x % kWarpgroup / 32) + lane % 8 + 8 * (lane / 8 % 2);
    const uint32_t tile = smem_address(s.p_tile(stage));
#pragma unroll
    for (int k = 0; k < kKSteps; ++k)
      stmatrix_x4(tile + swizzled_offset(row, 2 * k + lane / 16), p_regs[k][0], p_regs[k][1], p_regs[k][2],
                  p_regs[k][3]);
    if (q == 0) {
#pragma unroll
      for (int h = 0; h < 2; ++h) s.maxima(half)[rows.r[h]] = max[h];
    }
    fence_proxy_async();  // P and the zeros, for the wgmma of both warpgroups
    mbarrier_arrive(s.published(half));
  }

  // The rows' maxima the other warpgroup published.
  __device__ void published_maxima(int half, float (&max)[2]) const {
#pragma unroll
    for (int h = 0; h < 2; ++h) max[h] = s.maxima(half)[rows.r[h]];
  }

  // Moves O and this warpgroup's row sums to a new running max.
  __device__ void scale_outputs(const float (&factor)[2]) {
#pragma unroll
    for (int i = 0; i < kOutputs; ++i) o[i] *= factor[row_of_register(i)];
#pragma unroll
    for (int h = 0; h < 2; ++h) row_sum[h] *= factor[h];
  }

  // O += P V over the tile in `stage` (this warpgroup's value channels), P from registers
  // or from the stage's P tile; waits for the product.
  __device__ void add_pv(int stage, const uint32_t (&p_regs)[kKSteps][4]) {
    pin_registers(o);
    wgmma_fence();
#pragma unroll
    for (int k = 0; k < kKSteps; ++k)
      WgmmaN256<T>::template mma_rs<1>(o, p_regs[k], value_descriptor(s, stage, first_box, k), true);
    wgmma_commit();
    wgmma_wait<0>();
    pin_registers(o);
  }
  __device__ void issue_pv_from_smem(int stage) {
    pin_registers(o);
    wgmma_fence();
#pragma unroll
    for (int k = 0; k < kKSteps; ++k)
      WgmmaN256<T>::template mma_ss<1>(o, matrix_descriptor(s.p_tile(stage) + k * 32, 0, 1024),
                                       value_descriptor(s, stage, first_box, k), true);
    wgmma_commit();
  }
  __device__ void wait_pv() {
    wgmma_wait<0>();
    pin_registers(o);
  }
};

// Consumer warpgroup kHalf (0 or 1): the pairs of tiles of each piece (module comment),
// and its half of the outputs; warpgroup 0 also writes the rows' lse.
template <typename T, int kHalf>
__device__ void consumer_warpgroup(const MlaDecodeParams& p, const Smem& s, PartPieces& pieces, int kv_head, int row0) {
  HalfDecode<T> d(p, s, kHalf);
  int tile_count = 0, pair_count = 0, piece_count = 0;
  Piece piece;
  while (pieces.next(piece)) {
    d.start(piece, row0);
    bool blocks_ok = true;
    mbarrier_wait(s.q_full(), piece_count & 1);
    if (piece.tile_begin + kHalf >= piece.tile_end) mbarrier_arrive(s.q_empty());  // no tile of it is ours

    for (int tile = piece.tile_begin; tile < piece.tile_end; tile += 2, ++pair_count) {
      const bool pair = tile + 1 < piece.tile_end;  // else the piece's last tile is alone
      const int stage0 = stage_of(tile_count), stage1 = stage_of(tile_count + 1);
      const uint32_t parity = pair_count & 1;
      float m0[2], m1[2], alpha0[2], alpha1[2];
      uint32_t p_regs[kKSteps][4];
      // Each branch holds its scores from the wgmma that computes them to their last use:
      // scores live across a condition (a join where they may be undefined) make ptxas
      // serialise every wgmma of the kernel (C7515).
      if constexpr (kHalf == 0) {
        float score[kScores], tile_max[2];
        d.scores(tile, stage0, phase_of(tile_count), score, tile_max);
        if (tile + 2 >= piece.tile_end) mbarrier_arrive(s.q_empty());  // this thread is done with q
        blocks_ok = blocks_ok && !s.stage_bad()[stage0];
        d.raise(d.row_max, tile_max, m0);
#pragma unroll
        for (int h = 0; h < 2; ++h) alpha0[h] = rescale(d.row_max[h], m0[h]);
        d.scale_outputs(alpha0);
        d.exponentiate(score, m0, p_regs);
        d.publish(0, stage0, d.seqlen - tile * kTileKeys, p_regs, m0);
        // The zeros, for this warpgroup's wgmma. On every tile: a barrier under a condition
        // puts the wgmma after it on a divergent path for ptxas, which serialises them (C7520).
        barrier_sync(kFirstConsumerBarrier, kWarpgroup);
        d.add_pv(stage0, p_regs);
        mbarrier_arrive(s.kv_empty(stage0));
        mbarrier_wait(s.published(1), parity);
        if (pair) d.published_maxima(1, m1);
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          if (!pair) m1[h] = m0[h];
          alpha1[h] = pair ? rescale(m0[h], m1[h]) : 1.f;
          d.row_max[h] = m1[h];
        }
        d.scale_outputs(alpha1);
        if (pair) {
          d.issue_pv_from_smem(stage1);
          d.wait_pv();
          mbarrier_arrive(s.kv_empty(stage1));
        }
      } else if (pair) {
        // Warpgroup 0's tile first: its product with P0 on this warpgroup's channels, then
        // this warpgroup's own scores. With the scores first, a pair began with this
        // warpgroup's stage, the one both warpgroups give back last (after their products
        // with P1): Nsight Compute showed this warpgroup waiting half its time for that
        // stage's refill, and warpgroup 0 a quarter of its time for P1 in turn (H200,
        // 2026-12-01, 267b642). Now the refill lands during warpgroup 0's QK product and softmax
        // and this product with P0, and the first stage goes back earlier.
        mbarrier_wait(s.published(0), parity);
        d.published_maxima(0, m0);
#pragma unroll
        for (int h = 0; h < 2; ++h) alpha0[h] = rescale(d.row_max[h], m0[h]);
        d.scale_outputs(alpha0);
        d.issue_pv_from_smem(stage0);
        d.wait_pv();
        mbarrier_arrive(s.kv_empty(stage0));
        float score[kScores], tile_max[2];
        d.scores(tile + 1, stage1, phase_of(tile_count + 1), score, tile_max);
        if (tile + 3 >= piece.tile_end) mbarrier_arrive(s.q_empty());  // this thread is done with q
        blocks_ok = blocks_ok && !s.stage_bad()[stage1];
        d.raise(m0, tile_max, m1);
#pragma unroll
        for (int h = 0; h < 2; ++h) alpha1[h] = rescale(m0[h], m1[h]);
        d.scale_outputs(alpha1);
        d.exponentiate(score, m1, p_regs);
        d.publish(1, stage1, d.seqlen - (tile + 1) * kTileKeys, p_regs, m1);
        barrier_sync(kFirstConsumerBarrier + 1, kWarpgroup);  // the zeros, for this warpgroup's wgmma
        d.add_pv(stage1, p_regs);
        mbarrier_arrive(s.kv_empty(stage1));
        d.row_max[0] = m1[0];
        d.row_max[1] = m1[1];
      } else {  // the pair's second tile is missing: only warpgroup 0's to multiply
        mbarrier_wait(s.published(0), parity);
        d.published_maxima(0, m0);
#pragma unroll
        for (int h = 0; h < 2; ++h) alpha0[h] = rescale(d.row_max[h], m0[h]);
        d.scale_outputs(alpha0);
        mbarrier_arrive(s.published(1));
        barrier_sync(kFirstConsumerBarrier + 1, kWarpgroup);
        d.issue_pv_from_smem(stage0);
        d.wait_pv();
        mbarrier_arrive(s.kv_empty(stage0));
        d.row_max[0] = m0[0];
        d.row_max[1] = m0[1];
      }
      tile_count += pair ? 2 : 1;
    }

    // The row sums: this warpgroup's over the 4 lanes of each row, then both warpgroups'.
    float scale[2], sum[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      float own = d.row_sum[h];
      own += __shfl_xor_sync(0xffffffffu, own, 1);
      own += __shfl_xor_sync(0xffffffffu, own, 2);
      if (d.q == 0) s.sums(kHalf)[d.rows.r[h]] = blocks_ok ? own : NAN;
    }
    barrier_sync(kBothConsumersBarrier, kConsumerThreads);
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int r = d.rows.r[h];
      sum[h] = s.sums(0)[r] + s.sums(1)[r];
      scale[h] = output_scale(sum[h]);
      if (kHalf == 0 && d.q == 0 && row0 + r < p.rows)
        RowResult<T>(p, piece, kv_head, row0 + r, s.query_rows()[r]).store_lse(row_lse(d.row_max[h], sum[h]));
    }
    store_outputs<T>(p, piece, kv_head, row0, kHalf * kHalfValues, d.o, scale, s.query_rows());
    ++piece_count;
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads, 1) decode_sm90_wide_kernel(const MlaDecodeParams p,
                                                                         const __grid_constant__ CUtensorMap kv_map) {
  // No static shared memory anywhere in this kernel: the dynamic block starts at the
  // (1024-byte aligned) base of the CTA's shared window.
  extern __shared__ __align__(1024) unsigned char smem[];
  const Smem s{{smem}};
  const CtaRows cta(p, kRows);
  start_pipeline<kRows>(p, s, &kv_map, cta, kConsumerThreads, [&] {
    mbarrier_init(s.published(0), kWarpgroup);
    mbarrier_init(s.published(1), kWarpgroup);
  });

  PartPieces pieces(p, blockIdx.x);  // every warp walks the same pieces
  run_roles<T, kRows>(p, &kv_map, s, pieces, cta, [&] { consumer_warpgroup<T, 0>(p, s, pieces, cta.kv_head, cta.row0); },
                    [&] { consumer_warpgroup<T, 1>(p, s, pieces, cta.kv_head, cta.row0); });
}

}  // namespace

cudaError_t launch_decode_wide(MlaDecodeParams& p, cudaStream_t stream) {
  return p.dtype == ElementType::kBFloat16
             ? launch_pipeline_kernel<kRows>(decode_sm90_wide_kernel<__nv_bfloat16>, SmemLayout::kBytes, p, stream)
             : launch_pipeline_kernel<kRows>(decode_sm90_wide_kernel<__half>, SmemLayout::kBytes, p, stream);
}

}  // namespace jax_etap
