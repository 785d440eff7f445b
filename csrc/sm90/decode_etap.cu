// The ETAP kernel: MLA decode on Hopper (sm_90a) with transposed warpgroup MMAs, for up to
// 32 query rows per KV head (decode_wide.cu takes more; dispatch.cc chooses).
//
// Absorbed MLA gives every query row of a KV head the same keys, and there are few rows
// (16 per GPU for DeepSeek-V3 under 8-way tensor parallelism). wgmma's M is 64, so the
// usual "rows x keys" GEMMs pad 16 rows to 64. ETAP transposes both GEMMs:
//   S^T (64 keys x N rows)   = K (64 x d_qk)   * Q^T (d_qk x N)
//   O^T (512 values x N rows) += V^T (512 x 64) * P^T (64 x N)
// so a tile of 64 keys is the M dimension and the N = 16 or 32 query rows (padded up from
// the rows a CTA holds) are wgmma's N: nothing is padded to 64. The online softmax then
// runs along M: column maxima over the 64 keys of a tile.
//
// The producer warpgroup is pipeline.cuh's. The consumers:
//   warpgroup 1, softmax: S^T, the masked online softmax, P^T into shared memory (stmatrix
//     .trans), then O^T for value channels 0-255.
//   warpgroup 2, values: O^T for value channels 256-511, from the same P^T.
// The value warpgroup's rescale factors, P^T and the final row sums reach it through shared
// memory, handed over on mbarriers (full/empty pairs, as the KV ring).
//
// Keys past a sequence's end still arrive with their tile (TMA copies whole boxes): their
// scores are masked and, because V is K, their value rows are zeroed in shared memory
// before P^T V^T reads them (0 * NaN would otherwise poison the output). A block-table
// entry outside the cache is never dereferenced (block 0 is copied in its place) and
// turns the sequence's outputs into NaN.
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

// The value boxes (64 channels each) of O^T whose P.V the softmax warpgroup computes; the
// value warpgroup takes the other 6. The softmax warpgroup is the critical path (QK,
// the softmax, P^T: Nsight Compute's stall sampling at b128 s8K h16 had the value
// warpgroup waiting for P^T 71% of its time with 4 boxes each), so it keeps the fewer.
constexpr int kSoftmaxBoxes = 2;
constexpr int kSoftmaxGroupBarrier = kFirstConsumerBarrier;  // the softmax warpgroup alone

// P^T as two 16-bit terms, P = hi + lo, with O^T += V^T (hi + lo)^T: rounding P to bf16
// alone (8 bits) puts the output's error at 1.18x bf16's own rounding of the exact result
// at 1K keys (numerics study, RESULTS.md); with the low term the product is carried to
// ~2^-17. It costs a second P.V product, which with two KV stages delays a stage's release:
// measured 0-4% of the time at N = 16 and ~10% at N = 32 (RESULTS.md). So N = 16 (16 heads
// per KV head: DeepSeek's 8-way tensor parallel layout) keeps both terms, and N = 32 rounds
// P once, as FlashMLA does and as the wide kernel does at 64+ rows.
template <int kN>
constexpr int kPTerms = kN <= 16 ? 2 : 1;
// P^T and its rescale factors are double-buffered, so the softmax warpgroup can write a
// tile's while the value warpgroup still reads the last one's.
constexpr int kPBuffers = 2;

// The kernel's own shared memory, after the pipeline's KV ring and query tile.
template <int kN>
struct OwnLayout {
  static constexpr int kTileBytes = kN * kRowBytes;                // N rows of 64 keys: one P^T term
  static constexpr int kP = 0;                                     // P^T [terms][kPBuffers]
  static constexpr int kReduce = kP + kPTerms<kN> * kPBuffers * kTileBytes;  // float [4 warps][kN]
  static constexpr int kAlpha = kReduce + 4 * kN * 4;              // float [kPBuffers][kN]
  static constexpr int kRowSum = kAlpha + kPBuffers * kN * 4;      // float [kN]
  static constexpr int kBytes = kRowSum + kN * 4;
  // p_full[kPBuffers], p_empty[kPBuffers], sums_full, sums_empty
  static constexpr int kBarriers = 2 * kPBuffers + 2;
};

template <int kN>
using SmemLayout = PipelineLayout<kN, OwnLayout<kN>::kBytes, OwnLayout<kN>::kBarriers>;

template <int kN>
struct Smem : PipelineSmem<SmemLayout<kN>> {
  using Own = OwnLayout<kN>;
  using PipelineSmem<SmemLayout<kN>>::own;
  using PipelineSmem<SmemLayout<kN>>::own_barrier;

  __device__ unsigned char* p_buffer(int i, int term = 0) const {
    return own(Own::kP + (term * kPBuffers + i) * Own::kTileBytes);
  }
  __device__ float* reduce() const { return reinterpret_cast<float*>(own(Own::kReduce)); }
  __device__ float* alpha(int i) const { return reinterpret_cast<float*>(own(Own::kAlpha)) + i * kN; }
  __device__ float* row_sum() const { return reinterpret_cast<float*>(own(Own::kRowSum)); }
  // P^T and its rescale factors in P buffer i are written / the value warpgroup is done with them.
  __device__ uint64_t* p_full(int i) const { return own_barrier(i); }
  __device__ uint64_t* p_empty(int i) const { return own_barrier(kPBuffers + i); }
  // A piece's row sums are written / the value warpgroup has stored its outputs with them.
  __device__ uint64_t* sums_full() const { return own_barrier(2 * kPBuffers); }
  __device__ uint64_t* sums_empty() const { return own_barrier(2 * kPBuffers + 1); }
};

// Columns of S^T / O^T held by a thread of a consumer warpgroup: c = 2j + e holds query
// row 8j + 2q + e (q = lane % 4), in registers 4j + e (key g) and 4j + 2 + e (key g + 8).
__device__ __forceinline__ int column_row(int c, int lane) { return 8 * (c / 2) + 2 * (lane % 4) + c % 2; }

// ---- consumers ------------------------------------------------------------------------

template <typename T, int kN, int kBoxes>
struct Accumulators {
  float o[kBoxes][kN / 2];  // O^T for this warpgroup's kBoxes * 64 value channels

  __device__ void clear() {
#pragma unroll
    for (int m = 0; m < kBoxes; ++m)
#pragma unroll
      for (int i = 0; i < kN / 2; ++i) o[m][i] = 0.f;
  }
  // Rescales column c (a compile-time constant) by alpha: the old running max over the new one.
  template <typename Column>
  __device__ void rescale_column(Column c, float alpha) {
#pragma unroll
    for (int m = 0; m < kBoxes; ++m) {
      o[m][4 * (c / 2) + c % 2] *= alpha;
      o[m][4 * (c / 2) + 2 + c % 2] *= alpha;
    }
  }
  // O^T += V^T P^T over the 64 keys of a stage, for value boxes first_box .. first_box + kBoxes - 1.
  __device__ void add_pv(const Smem<kN>& s, int stage, int first_box, int p_buffer) {
#pragma unroll
    for (int m = 0; m < kBoxes; ++m) pin_registers(o[m]);
    wgmma_fence();
#pragma unroll
    for (int m = 0; m < kBoxes; ++m)
#pragma unroll
      for (int k = 0; k < kTileKeys / 16; ++k) {
        const uint64_t a = matrix_descriptor(s.kv_box(stage, first_box + m) + k * 16 * kRowBytes, kBoxBytes, 1024);
#pragma unroll
        for (int term = 0; term < kPTerms<kN>; ++term) {
          const uint64_t b = matrix_descriptor(s.p_buffer(p_buffer, term) + k * 32, 0, 1024);
          Wgmma<T, kN>::template mma<1>(o[m], a, b, true);
        }
      }
    wgmma_commit();
    wgmma_wait<0>();
#pragma unroll
    for (int m = 0; m < kBoxes; ++m) pin_registers(o[m]);
  }
  // Writes out = O / row_sum for the rows this CTA holds (see output_scale).
  // static_for keeps every register index a compile-time constant: a loop the compiler
  // declines to unroll would move all of O^T to local memory.
  __device__ void store(const MlaDecodeParams& p, const Piece& piece, int kv_head, int row0, int first_value,
                        const float* row_sum, const QueryRow* query_rows) const {
    const int t = threadIdx.x % kWarpgroup, warp = t / 32, lane = t % 32;
    static_for<kN / 4>([&](auto c) {
      const int n = column_row(c, lane);
      if (row0 + n < p.rows) {
        const float scale = output_scale(row_sum[n]);
        const RowResult<T> result(p, piece, kv_head, row0 + n, query_rows[n]);
        static_for<kBoxes>([&](auto m) {
          static_for<2>([&](auto half) {
            const int v = first_value + m * kBoxChannels + warp * 16 + lane / 4 + 8 * half;
            result.store(v, o[m][4 * (c / 2) + 2 * half + c % 2] * scale);
          });
        });
      }
    });
  }
};

// Warpgroup 1: S^T, the online softmax along the keys, P^T, and half of O^T.
template <typename T, int kN>
__device__ void softmax_warpgroup(const MlaDecodeParams& p, const Smem<kN>& s, PartPieces& pieces, int kv_head,
                                  int row0) {
  constexpr int kCols = kN / 4;
  const int t = threadIdx.x % kWarpgroup, warp = t / 32, lane = t % 32, g = lane / 4;
  const int k_boxes = p.d_qk / kBoxChannels;
  const float scale_log2 = p.softmax_scale * float(M_LOG2E);
  float* reduce = s.reduce();
  Accumulators<T, kN, kSoftmaxBoxes> acc;
  int tile_count = 0, piece_count = 0;
  Piece piece;
  while (pieces.next(piece)) {
    const int seqlen = clamped_seqlen(p, piece.b);
    // Softmax state per column, in log2 units: the running max is the same in every
    // thread; the sum is this thread's share (2 keys per tile), reduced at the end.
    float row_max[kCols], row_sum[kCols];
#pragma unroll
    for (int c = 0; c < kCols; ++c) {
      row_max[c] = -INFINITY;
      row_sum[c] = 0.f;
    }
    // Tiles that end before the first key a row of this CTA cannot see need no mask.
    const int unmasked_end = position_key_end(p, seqlen, s.query_rows()[0].s);
    acc.clear();
    bool blocks_ok = true;
    mbarrier_wait(s.q_full(), piece_count & 1);

    for (int tile = piece.tile_begin; tile < piece.tile_end; ++tile, ++tile_count) {
      const int stage = stage_of(tile_count);
      const uint32_t phase = phase_of(tile_count);
      float score[kN / 2];
      score_tile<T, kN, true>(s, stage, phase, k_boxes, score);
      if (tile == piece.tile_end - 1) mbarrier_arrive(s.q_empty());  // this thread is done with q
      blocks_ok = blocks_ok && !s.stage_bad()[stage];

      // Scaled, masked scores and the column maxima over the tile's 64 keys: this
      // thread's two keys, the 8 lanes that share lane % 4, then the 4 warps.
      const int key0 = tile * kTileKeys + warp * 16 + g;
      const bool masked = (tile + 1) * kTileKeys > unmasked_end;
      float tile_max[kCols];
#pragma unroll
      for (int c = 0; c < kCols; ++c) {
        float& s0 = score[4 * (c / 2) + c % 2];
        float& s1 = score[4 * (c / 2) + 2 + c % 2];
        s0 *= scale_log2;
        s1 *= scale_log2;
        if (masked) {
          const int n = column_row(c, lane);
          const int key_end = row0 + n < p.rows ? position_key_end(p, seqlen, s.query_rows()[n].s) : seqlen;
          if (key0 >= key_end) s0 = -INFINITY;
          if (key0 + 8 >= key_end) s1 = -INFINITY;
        }
        float m = nan_max(s0, s1);
#pragma unroll
        for (int offset = 4; offset < 32; offset *= 2) m = nan_max(m, __shfl_xor_sync(0xffffffffu, m, offset));
        tile_max[c] = m;
      }
      if (g == 0) {
#pragma unroll
        for (int c = 0; c < kCols; ++c) reduce[warp * kN + column_row(c, lane)] = tile_max[c];
      }
      barrier_sync(kSoftmaxGroupBarrier, kWarpgroup);
      const int buffer = tile_count % kPBuffers;
      float* alpha_s = s.alpha(buffer);
      if (tile_count >= kPBuffers) mbarrier_wait(s.p_empty(buffer), (tile_count / kPBuffers - 1) & 1);
      static_for<kCols>([&](auto c) {
        const int n = column_row(c, lane);
        float m = row_max[c];
#pragma unroll
        for (int w = 0; w < 4; ++w) m = nan_max(m, reduce[w * kN + n]);
        // A column with no visible key yet keeps max -inf: p = 0, and nothing to rescale.
        const float alpha = m == -INFINITY ? 1.f : fast_exp2(row_max[c] - m);
        row_max[c] = m;
        float& s0 = score[4 * (c / 2) + c % 2];
        float& s1 = score[4 * (c / 2) + 2 + c % 2];
        s0 = m == -INFINITY ? 0.f : fast_exp2(s0 - m);
        s1 = m == -INFINITY ? 0.f : fast_exp2(s1 - m);
        row_sum[c] = row_sum[c] * alpha + s0 + s1;
        acc.rescale_column(c, alpha);
        if (warp == 0 && g == 0) alpha_s[n] = alpha;  // for the value warpgroup
      });

      // P^T into the shared buffer(s), [row][key] with the 128-byte swizzle: the stmatrix
      // .trans of the accumulator fragment (keys g, g + 8 x rows 2q, 2q + 1 per 8 x 8).
#pragma unroll
      for (int j = 0; j < kN / 8; j += 2) {
        const int matrix = lane / 8;  // (key half, row block) = (matrix % 2, j + matrix / 2)
        const int n = 8 * (j + matrix / 2) + lane % 8;
        const uint32_t address = smem_address(s.p_buffer(buffer)) + swizzled_offset(n, 2 * warp + matrix % 2);
        uint32_t hi[4];
#pragma unroll
        for (int i = 0; i < 4; ++i) hi[i] = pack_pair<T>(score[4 * j + 2 * i], score[4 * j + 2 * i + 1]);
        stmatrix_x4_trans(address, hi[0], hi[1], hi[2], hi[3]);
        if constexpr (kPTerms<kN> == 2) {
          const uint32_t lo_offset = smem_address(s.p_buffer(buffer, 1)) - smem_address(s.p_buffer(buffer));
          uint32_t lo[4];
#pragma unroll
          for (int i = 0; i < 4; ++i)
            lo[i] = rounding_residual<T>(hi[i], score[4 * j + 2 * i], score[4 * j + 2 * i + 1]);
          stmatrix_x4_trans(address + lo_offset, lo[0], lo[1], lo[2], lo[3]);
        }
      }
      zero_values_past_end(s, stage, seqlen - tile * kTileKeys, t);
      fence_proxy_async();
      mbarrier_arrive(s.p_full(buffer));
      barrier_sync(kSoftmaxGroupBarrier, kWarpgroup);  // all of P^T and the zeros, for this warpgroup's wgmma

      acc.add_pv(s, stage, 0, buffer);
      mbarrier_arrive(s.kv_empty(stage));
    }

    // Column sums: over the 8 lanes, then the 4 warps; then both warpgroups write O / sum.
#pragma unroll
    for (int c = 0; c < kCols; ++c)
#pragma unroll
      for (int offset = 4; offset < 32; offset *= 2) row_sum[c] += __shfl_xor_sync(0xffffffffu, row_sum[c], offset);
    if (g == 0) {
#pragma unroll
      for (int c = 0; c < kCols; ++c) reduce[warp * kN + column_row(c, lane)] = row_sum[c];
    }
    barrier_sync(kSoftmaxGroupBarrier, kWarpgroup);
    if (piece_count > 0) mbarrier_wait(s.sums_empty(), (piece_count - 1) & 1);  // the last piece's sums are read
    if (warp == 0 && g == 0) {
#pragma unroll
      for (int c = 0; c < kCols; ++c) {
        const int n = column_row(c, lane);
        const float sum = reduce[n] + reduce[kN + n] + reduce[2 * kN + n] + reduce[3 * kN + n];
        const float checked = blocks_ok ? sum : NAN;
        s.row_sum()[n] = checked;
        if (row0 + n < p.rows)
          RowResult<T>(p, piece, kv_head, row0 + n, s.query_rows()[n]).store_lse(row_lse(row_max[c], checked));
      }
    }
    barrier_sync(kSoftmaxGroupBarrier, kWarpgroup);  // the row sums, for this warpgroup's store
    mbarrier_arrive(s.sums_full());
    acc.store(p, piece, kv_head, row0, 0, s.row_sum(), s.query_rows());
    ++piece_count;
  }
}

// Warpgroup 2: the other half of O^T, from the softmax warpgroup's P^T.
template <typename T, int kN>
__device__ void value_warpgroup(const MlaDecodeParams& p, const Smem<kN>& s, PartPieces& pieces, int kv_head,
                                int row0) {
  const int lane = threadIdx.x % 32;
  constexpr int kFirstBox = kSoftmaxBoxes;
  Accumulators<T, kN, kValueBoxes - kSoftmaxBoxes> acc;
  int tile_count = 0, piece_count = 0;
  Piece piece;
  while (pieces.next(piece)) {
    acc.clear();
    for (int tile = piece.tile_begin; tile < piece.tile_end; ++tile, ++tile_count) {
      const int stage = stage_of(tile_count);
      for (int box = kFirstBox; box < kValueBoxes; ++box)
        mbarrier_wait(s.kv_full(stage, box), phase_of(tile_count));
      const int buffer = tile_count % kPBuffers;
      mbarrier_wait(s.p_full(buffer), (tile_count / kPBuffers) & 1);
      const float* alpha = s.alpha(buffer);
      static_for<kN / 4>([&](auto c) { acc.rescale_column(c, alpha[column_row(c, lane)]); });
      acc.add_pv(s, stage, kFirstBox, buffer);
      mbarrier_arrive(s.p_empty(buffer));
      mbarrier_arrive(s.kv_empty(stage));
    }
    mbarrier_wait(s.sums_full(), piece_count & 1);
    acc.store(p, piece, kv_head, row0, kFirstBox * kBoxChannels, s.row_sum(), s.query_rows());
    mbarrier_arrive(s.sums_empty());
    ++piece_count;
  }
}

template <typename T, int kN>
__global__ void __launch_bounds__(kThreads, 1) decode_sm90_kernel(const MlaDecodeParams p,
                                                                    const __grid_constant__ CUtensorMap kv_map) {
  // No static shared memory anywhere in this kernel: the dynamic block starts at the
  // (1024-byte aligned) base of the CTA's shared window.
  extern __shared__ __align__(1024) unsigned char smem[];
  const Smem<kN> s{{smem}};
  const CtaRows cta(p, kN);
  start_pipeline<kN>(p, s, &kv_map, cta, kWarpgroup, [&] {  // q is read by the softmax warpgroup
    for (int i = 0; i < kPBuffers; ++i) {
      mbarrier_init(s.p_full(i), kWarpgroup);
      mbarrier_init(s.p_empty(i), kWarpgroup);
    }
    mbarrier_init(s.sums_full(), kWarpgroup);
    mbarrier_init(s.sums_empty(), kWarpgroup);
  });

  PartPieces pieces(p, blockIdx.x);  // every warp walks the same pieces
  run_roles<T, kN>(p, &kv_map, s, pieces, cta, [&] { softmax_warpgroup<T, kN>(p, s, pieces, cta.kv_head, cta.row0); },
                    [&] { value_warpgroup<T, kN>(p, s, pieces, cta.kv_head, cta.row0); });
}

template <typename T, int kN>
cudaError_t launch(MlaDecodeParams& p, cudaStream_t stream) {
  return launch_pipeline_kernel<kN>(decode_sm90_kernel<T, kN>, SmemLayout<kN>::kBytes, p, stream);
}

// N: the query rows of a CTA, the fewer of 16 and 32 that hold them.
template <typename T>
cudaError_t launch_for_rows(MlaDecodeParams& p, cudaStream_t stream) {
  return p.rows <= 16 ? launch<T, 16>(p, stream) : launch<T, 32>(p, stream);
}

}  // namespace

cudaError_t launch_decode_etap(MlaDecodeParams& p, cudaStream_t stream) {
  return p.dtype == ElementType::kBFloat16 ? launch_for_rows<__nv_bfloat16>(p, stream)
                                           : launch_for_rows<__half>(p, stream);
}

}  // namespace jax_etap
