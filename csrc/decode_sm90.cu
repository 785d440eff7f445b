// The ETAP kernel: MLA decode on Hopper (sm_90a) with transposed warpgroup MMAs.
//
// Absorbed MLA gives every query row of a KV head the same keys, and there are few rows
// (16 per GPU for DeepSeek-V3 under 8-way tensor parallelism). wgmma's M is 64, so the
// usual "rows x keys" GEMMs pad 16 rows to 64. ETAP transposes both GEMMs:
//   S^T (64 keys x N rows)   = K (64 x d_qk)   * Q^T (d_qk x N)
//   O^T (512 values x N rows) += V^T (512 x 64) * P^T (64 x N)
// so a tile of 64 keys is the M dimension and the N = 16, 32 or 64 query rows (padded up
// from the rows a CTA holds) are wgmma's N: nothing is padded to 64 below 64 rows. The
// online softmax then runs along M: column maxima over the 64 keys of a tile.
//
// One CTA (384 threads) per (part of the split-KV schedule, group of N rows, KV head):
//   warpgroup 0, producer: warp 0 issues TMA copies of 64-key x 64-channel boxes (128-byte
//     swizzle) into a 2-stage ring, one mbarrier per box so the QK GEMM starts on box 0
//     while the rest land; warps 1-3 load each piece's queries into swizzled tiles.
//   warpgroup 1, softmax: S^T, the masked online softmax, P^T into shared memory (stmatrix
//     .trans), then O^T for value channels 0-255.
//   warpgroup 2, values: O^T for value channels 256-511, from the same P^T.
// The value warpgroup's rescale factors, P^T and the final row sums reach it through shared
// memory, handed over on mbarriers (full/empty pairs, as the KV ring); register budgets are
// moved from the producer to the consumers (setmaxnreg).
//
// Keys past a sequence's end still arrive with their tile (TMA copies whole boxes): their
// scores are masked and, because V is K, their value rows are zeroed in shared memory
// before P^T V^T reads them (0 * NaN would otherwise poison the output). A block-table
// entry outside the cache is never dereferenced (block 0 is copied in its place) and
// turns the sequence's outputs into NaN.
#include <cuda.h>
#include <cudaTypedefs.h>

#include <cmath>
#include <mutex>
#include <utility>

#include "device_utils.cuh"
#include "mla_decode.h"
#include "mma_sm80.cuh"
#include "schedule.cuh"
#include "sm90_primitives.cuh"
#include "wgmma_sm90.cuh"

namespace jax_etap {
namespace {

using namespace sm90;

constexpr int kWarpgroup = 128;
constexpr int kThreads = 3 * kWarpgroup;
constexpr int kBoxChannels = 64;                // 64 16-bit channels: one 128-byte swizzle row
constexpr int kRowBytes = kBoxChannels * 2;
constexpr int kBoxBytes = kTileKeys * kRowBytes;  // 8 KiB
constexpr int kStages = 2;
constexpr int kMaxKBoxes = kMaxHeadDim / kBoxChannels;
constexpr int kValueDim = 512;
constexpr int kValueBoxes = kValueDim / kBoxChannels;
constexpr int kQueryLoaders = 3 * 32;             // warps 1-3 of the producer warpgroup

// How the two consumer warpgroups share the 8 value boxes (64 channels each) of O^T, and
// their register budgets. At N = 64 a box of O^T is 32 registers a thread: the softmax
// warpgroup, which also holds S^T and the softmax state, takes 2 boxes and the value
// warpgroup 6. The budgets add up to 128 * (56 + softmax + value) = 64512 of the SM's
// 65536 registers.
constexpr int kProducerRegisters = 56;
template <int kN>
struct ConsumerSplit {
  static constexpr int kSoftmaxBoxes = kN == 64 ? 2 : 4;
  static constexpr int kValueGroupBoxes = kValueBoxes - kSoftmaxBoxes;
  static constexpr int kSoftmaxRegisters = kN == 64 ? 216 : 224;
  static constexpr int kValueRegisters = kN == 64 ? 232 : 224;
  static_assert(kProducerRegisters + kSoftmaxRegisters + kValueRegisters == 504, "register budgets");
};

// The one named barrier (0 is __syncthreads): the softmax warpgroup alone. Everything that
// crosses warpgroups goes through mbarriers, whose arrive/wait order the memory accesses
// around them (and which compute-sanitizer's racecheck follows).
constexpr int kSoftmaxGroupBarrier = 1;
constexpr int kConsumerThreads = 2 * kWarpgroup;

__host__ __device__ constexpr int align_up(int x, int a) { return (x + a - 1) / a * a; }

// f(std::integral_constant<int, i>) for i = 0 .. kCount - 1, fully unrolled.
template <typename F, int... I>
__device__ __forceinline__ void static_for_each(F& f, std::integer_sequence<int, I...>) {
  (f(std::integral_constant<int, I>{}), ...);
}
template <int kCount, typename F>
__device__ __forceinline__ void static_for(F&& f) {
  static_for_each(f, std::make_integer_sequence<int, kCount>{});
}

// P^T as two 16-bit terms, P = hi + lo, with O^T += V^T (hi + lo)^T: rounding P to bf16
// alone (8 bits) puts the output's error at 1.18x bf16's own rounding of the exact result
// at 1K keys (numerics study, RESULTS.md); with the low term the product is carried to
// ~2^-17. It costs a second P.V product, which with two KV stages delays a stage's release:
// measured 0-4% of the time at N = 16 and ~10% at N = 32 (RESULTS.md). At N = 64 the rows
// are compute-bound and the low term's buffer does not fit in shared memory beside the
// 64-row query tile.
template <int kN>
constexpr bool kTwoTermP = kN <= 32;

// Shared memory, 1024-byte aligned where a swizzled tile starts.
template <int kN>
struct SmemLayout {
  // N = 64 leaves room for one P buffer only; the softmax warpgroup then waits for the
  // value warpgroup before overwriting it.
  static constexpr int kPBuffers = kN <= 32 ? 2 : 1;
  static constexpr int kTileBytes = kN * kRowBytes;  // N rows of 64 channels (Q box, P^T)
  static constexpr int kKv = 0;
  static constexpr int kQ = kKv + kStages * kMaxKBoxes * kBoxBytes;
  static constexpr int kP = kQ + kMaxKBoxes * kTileBytes;
  static constexpr int kPTerms = kTwoTermP<kN> ? 2 : 1;         // P buffers [terms][kPBuffers]
  static constexpr int kReduce = kP + kPTerms * kPBuffers * kTileBytes;  // float [4 warps][kN]
  static constexpr int kAlpha = kReduce + 4 * kN * 4;           // float [kPBuffers][kN]
  static constexpr int kRowSum = kAlpha + kPBuffers * kN * 4;   // float [kN]
  static constexpr int kStageBad = kRowSum + kN * 4;            // int [kStages]
  static constexpr int kQueryRows = kStageBad + kStages * 4;     // QueryRow [kN]
  static constexpr int kBarriers = align_up(kQueryRows + kN * int(sizeof(QueryRow)), 8);
  // kv_full[kStages][kMaxKBoxes], kv_empty[kStages], q_full, q_empty, p_full[kPBuffers],
  // p_empty[kPBuffers], sums_full, sums_empty
  static constexpr int kBarrierCount = kStages * kMaxKBoxes + kStages + 2 + 2 * kPBuffers + 2;
  static constexpr int kBytes = kBarriers + kBarrierCount * 8;
  static_assert(kBytes <= 227 * 1024, "the ETAP kernel's shared memory exceeds what a Hopper CTA may have");
  static_assert(kTileBytes % 1024 == 0, "swizzled tiles must start on 1024-byte boundaries");
};

template <int kN>
struct Smem {
  using L = SmemLayout<kN>;
  unsigned char* base;

  __device__ unsigned char* kv_box(int stage, int box) const {
    return base + L::kKv + (stage * kMaxKBoxes + box) * kBoxBytes;
  }
  __device__ unsigned char* q_box(int box) const { return base + L::kQ + box * L::kTileBytes; }
  __device__ unsigned char* p_buffer(int i, int term = 0) const {
    return base + L::kP + (term * L::kPBuffers + i) * L::kTileBytes;
  }
  __device__ float* reduce() const { return reinterpret_cast<float*>(base + L::kReduce); }
  __device__ float* alpha(int i) const { return reinterpret_cast<float*>(base + L::kAlpha) + i * kN; }
  __device__ float* row_sum() const { return reinterpret_cast<float*>(base + L::kRowSum); }
  __device__ int* stage_bad() const { return reinterpret_cast<int*>(base + L::kStageBad); }
  // The query behind each of the CTA's rows, found once: per column, its integer divisions
  // were unrolled into every masked tile and every store (a quarter of the kernel's code).
  __device__ QueryRow* query_rows() const { return reinterpret_cast<QueryRow*>(base + L::kQueryRows); }
  __device__ uint64_t* barriers() const { return reinterpret_cast<uint64_t*>(base + L::kBarriers); }
  __device__ uint64_t* kv_full(int stage, int box) const { return barriers() + stage * kMaxKBoxes + box; }
  __device__ uint64_t* kv_empty(int stage) const { return barriers() + kStages * kMaxKBoxes + stage; }
  __device__ uint64_t* q_full() const { return barriers() + kStages * kMaxKBoxes + kStages; }
  __device__ uint64_t* q_empty() const { return q_full() + 1; }
  // P^T and its rescale factors in P buffer i are written / the value warpgroup is done with them.
  __device__ uint64_t* p_full(int i) const { return q_empty() + 1 + i; }
  __device__ uint64_t* p_empty(int i) const { return p_full(L::kPBuffers) + i; }
  // A piece's row sums are written / the value warpgroup has stored its outputs with them.
  __device__ uint64_t* sums_full() const { return p_empty(L::kPBuffers); }
  __device__ uint64_t* sums_empty() const { return sums_full() + 1; }
};

// The i-th use of a stage waits for barrier phase i % 2.
__device__ __forceinline__ int stage_of(int tile_count) { return tile_count % kStages; }
__device__ __forceinline__ uint32_t phase_of(int tile_count) { return (tile_count / kStages) & 1; }

// Columns of S^T / O^T held by a thread of a consumer warpgroup: c = 2j + e holds query
// row 8j + 2q + e (q = lane % 4), in registers 4j + e (key g) and 4j + 2 + e (key g + 8).
__device__ __forceinline__ int column_row(int c, int lane) { return 8 * (c / 2) + 2 * (lane % 4) + c % 2; }

// ---- producer ---------------------------------------------------------------------------

// Row of the tensor map's token axis (num_blocks * block_size) holding `key` of the
// sequence whose block table is `table`; block 0 stands in for an out-of-range entry.
__device__ __forceinline__ int token_row(const MlaDecodeParams& p, const int32_t* table, int key, bool& bad) {
  int block = __ldg(table + key / p.block_size);
  if (!block_index_valid(p, block)) {
    bad = true;
    block = 0;
  }
  return block * p.block_size + key % p.block_size;
}

template <int kN>
__device__ void issue_kv_loads(const MlaDecodeParams& p, const CUtensorMap* map, const Smem<kN>& s,
                               PartPieces& pieces, int kv_head) {
  constexpr int kMaxCopies = kTileKeys / 8;  // block sizes down to 8 keys
  const int k_boxes = p.d_qk / kBoxChannels;
  const int copy_keys = min(p.block_size, kTileKeys);  // keys per TMA copy: a whole block when smaller than a tile
  const int copies = kTileKeys / copy_keys;
  int tile_count = 0;
  Piece piece;
  while (pieces.next(piece)) {
    const int seqlen = clamped_seqlen(p, piece.b);
    const int32_t* table = p.block_table + int64_t(piece.b) * p.max_blocks_per_seq;
    for (int tile = piece.tile_begin; tile < piece.tile_end; ++tile, ++tile_count) {
      // The block-table lookups go out before the wait for a free stage, so their latency
      // hides behind it instead of delaying the copies. Blocks past the sequence's end
      // are never looked up: their keys are masked and zeroed, and any valid block (0)
      // can fill the box.
      int rows[kMaxCopies];
      bool bad = false;
#pragma unroll
      for (int copy = 0; copy < kMaxCopies; ++copy) {
        const int key = tile * kTileKeys + copy * copy_keys;
        rows[copy] = copy < copies && key < seqlen ? token_row(p, table, key, bad) : 0;
      }
      const int stage = stage_of(tile_count);
      if (tile_count >= kStages) mbarrier_wait(s.kv_empty(stage), phase_of(tile_count) ^ 1);
      s.stage_bad()[stage] = bad;  // published by the arrivals below
      for (int box = 0; box < k_boxes; ++box) {
        uint64_t* full = s.kv_full(stage, box);
        mbarrier_arrive_expect_tx(full, kBoxBytes);
#pragma unroll
        for (int copy = 0; copy < kMaxCopies; ++copy)
          if (copy < copies)
            tma_load_3d(s.kv_box(stage, box) + copy * copy_keys * kRowBytes, map, full, box * kBoxChannels, kv_head,
                        rows[copy]);
      }
    }
  }
}

// Each piece's N query rows, swizzled like a TMA box; rows past the CTA's rows are zero.
// cp.async puts every 16-byte chunk in flight at once, straight into shared memory: one
// memory round trip per piece. (Staged through registers, at most 4 loads per thread were
// in flight, three round trips in a row that the softmax warpgroup waited for at the start
// of each piece while the KV stream was loaded.)
template <typename T, int kN>
__device__ void load_queries(const MlaDecodeParams& p, const Smem<kN>& s, PartPieces& pieces, int row0) {
  const int loader = threadIdx.x - 32;
  const int chunks = p.d_qk / 8;  // 16-byte chunks per row
  const T* q = static_cast<const T*>(p.q);
  int piece_count = 0;
  Piece piece;
  while (pieces.next(piece)) {
    if (piece_count > 0) mbarrier_wait(s.q_empty(), (piece_count - 1) & 1);
    for (int i = loader; i < kN * chunks; i += kQueryLoaders) {
      const int n = i / chunks, c = i % chunks;
      const bool valid = row0 + n < p.rows;
      const T* row = valid ? q + s.query_rows()[n].q_offset(p, piece.b) : q;
      cp_async_16_or_zero(s.q_box(c / 8) + swizzled_offset(n, c % 8), row + c * 8, valid);
    }
    cp_async_commit();
    cp_async_wait<0>();
    fence_proxy_async();  // the QK wgmma reads them through the async proxy
    mbarrier_arrive(s.q_full());
    ++piece_count;
  }
}

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
        for (int term = 0; term < SmemLayout<kN>::kPTerms; ++term) {
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
  constexpr int kPBuffers = SmemLayout<kN>::kPBuffers;
  const int t = threadIdx.x % kWarpgroup, warp = t / 32, lane = t % 32, g = lane / 4;
  const int k_boxes = p.d_qk / kBoxChannels;
  const float scale_log2 = p.softmax_scale * float(M_LOG2E);
  float* reduce = s.reduce();
  Accumulators<T, kN, ConsumerSplit<kN>::kSoftmaxBoxes> acc;
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
      pin_registers(score);
      wgmma_fence();
      for (int box = 0; box < k_boxes; ++box) {
        mbarrier_wait(s.kv_full(stage, box), phase);
#pragma unroll
        for (int k = 0; k < kBoxChannels / 16; ++k) {
          const uint64_t a = matrix_descriptor(s.kv_box(stage, box) + k * 32, 0, 1024);
          const uint64_t b = matrix_descriptor(s.q_box(box) + k * 32, 0, 1024);
          Wgmma<T, kN>::template mma<0>(score, a, b, box > 0 || k > 0);
        }
      }
      wgmma_commit();
      wgmma_wait<0>();
      pin_registers(score);
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
        const float alpha = m == -INFINITY ? 1.f : exp2f(row_max[c] - m);
        row_max[c] = m;
        float& s0 = score[4 * (c / 2) + c % 2];
        float& s1 = score[4 * (c / 2) + 2 + c % 2];
        s0 = m == -INFINITY ? 0.f : exp2f(s0 - m);
        s1 = m == -INFINITY ? 0.f : exp2f(s1 - m);
        row_sum[c] = row_sum[c] * alpha + s0 + s1;
        acc.rescale_column(c, alpha);
        if (warp == 0 && g == 0) alpha_s[n] = alpha;  // for the value warpgroup
      });

      // P^T into the shared buffer(s), [row][key] with the 128-byte swizzle: the stmatrix
      // .trans of the accumulator fragment (keys g, g + 8 x rows 2q, 2q + 1 per 8 x 8).
      const uint32_t p_offset = smem_u32(s.p_buffer(buffer, 1)) - smem_u32(s.p_buffer(buffer));
#pragma unroll
      for (int j = 0; j < kN / 8; j += 2) {
        const int matrix = lane / 8;  // (key half, row block) = (matrix % 2, j + matrix / 2)
        const int n = 8 * (j + matrix / 2) + lane % 8;
        const uint32_t address = smem_u32(s.p_buffer(buffer)) + swizzled_offset(n, 2 * warp + matrix % 2);
        uint32_t hi[4];
#pragma unroll
        for (int i = 0; i < 4; ++i) hi[i] = pack_pair<T>(score[4 * j + 2 * i], score[4 * j + 2 * i + 1]);
        stmatrix_x4_trans(address, hi[0], hi[1], hi[2], hi[3]);
        if constexpr (kTwoTermP<kN>) {
          uint32_t lo[4];
#pragma unroll
          for (int i = 0; i < 4; ++i) lo[i] = rounding_residual<T>(hi[i], score[4 * j + 2 * i], score[4 * j + 2 * i + 1]);
          stmatrix_x4_trans(address + p_offset, lo[0], lo[1], lo[2], lo[3]);
        }
      }
      // Keys past the sequence's end: zero their value rows (K is V) before any P.V.
      const int valid = seqlen - tile * kTileKeys;
      if (valid < kTileKeys) {
        const int chunks = (kTileKeys - valid) * (kRowBytes / 16);
        for (int i = t; i < kValueBoxes * chunks; i += kWarpgroup) {
          const int box = i / chunks, rest = i % chunks;
          *reinterpret_cast<uint4*>(s.kv_box(stage, box) + valid * kRowBytes + rest * 16) = make_uint4(0, 0, 0, 0);
        }
      }
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
        s.row_sum()[n] = blocks_ok ? sum : NAN;
        if (row0 + n < p.rows) {
          const float lse = !blocks_ok ? NAN : sum == 0.f ? -INFINITY : (row_max[c] + log2f(sum)) * float(M_LN2);
          RowResult<T>(p, piece, kv_head, row0 + n, s.query_rows()[n]).store_lse(lse);
        }
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
  constexpr int kPBuffers = SmemLayout<kN>::kPBuffers;
  const int lane = threadIdx.x % 32;
  constexpr int kFirstBox = ConsumerSplit<kN>::kSoftmaxBoxes;
  Accumulators<T, kN, ConsumerSplit<kN>::kValueGroupBoxes> acc;
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
  const Smem<kN> s{smem};
  allow_dependent_launch();
  const int row_tiles = ceil_div(p.rows, kN);
  const int kv_head = blockIdx.y / row_tiles, row0 = (blockIdx.y % row_tiles) * kN;
  if (threadIdx.x >= 32 && threadIdx.x < 32 + kN) {
    const int n = threadIdx.x - 32;
    s.query_rows()[n] = QueryRow(p, kv_head, row0 + n);  // rows past p.rows are never used
  }
  if (threadIdx.x == 0) {
    for (int stage = 0; stage < kStages; ++stage) {
      for (int box = 0; box < kMaxKBoxes; ++box) mbarrier_init(s.kv_full(stage, box), 1);
      mbarrier_init(s.kv_empty(stage), kConsumerThreads);
    }
    mbarrier_init(s.q_full(), kQueryLoaders);
    mbarrier_init(s.q_empty(), kWarpgroup);
    for (int i = 0; i < SmemLayout<kN>::kPBuffers; ++i) {
      mbarrier_init(s.p_full(i), kWarpgroup);
      mbarrier_init(s.p_empty(i), kWarpgroup);
    }
    mbarrier_init(s.sums_full(), kWarpgroup);
    mbarrier_init(s.sums_empty(), kWarpgroup);
    fence_barrier_init();
    prefetch_tensor_map(&kv_map);
  }
  __syncthreads();

  const int warpgroup = threadIdx.x / kWarpgroup;
  PartPieces pieces(p, blockIdx.x);  // every warp walks the same pieces
  if (warpgroup == 0) {
    lower_register_budget<kProducerRegisters>();
    if (threadIdx.x == 0) issue_kv_loads(p, &kv_map, s, pieces, kv_head);
    else if (threadIdx.x >= 32) load_queries<T, kN>(p, s, pieces, row0);
    // Off the critical path: the combine kernel reads it after this kernel ends.
    if (blockIdx.y == 0 && threadIdx.x / 32 == 1) record_sequence_parts(p, blockIdx.x);
  } else {
    if (warpgroup == 1) {
      raise_register_budget<ConsumerSplit<kN>::kSoftmaxRegisters>();
      softmax_warpgroup<T, kN>(p, s, pieces, kv_head, row0);
    } else {
      raise_register_budget<ConsumerSplit<kN>::kValueRegisters>();
      value_warpgroup<T, kN>(p, s, pieces, kv_head, row0);
    }
  }
}

// ---- host ------------------------------------------------------------------------------

// cuTensorMapEncodeTiled from the driver, without linking libcuda: the extension must load
// on machines whose driver jax found, whatever its path.
cudaError_t tensor_map_encoder(PFN_cuTensorMapEncodeTiled_v12000& encode) {
  static PFN_cuTensorMapEncodeTiled_v12000 cached = nullptr;
  static cudaError_t status = cudaSuccess;
  static std::once_flag once;
  std::call_once(once, [] {
    void* fn = nullptr;
    cudaDriverEntryPointQueryResult found;
    status = cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &fn, 12000, cudaEnableDefault, &found);
    if (status == cudaSuccess && found != cudaDriverEntryPointSuccess) status = cudaErrorSymbolNotFound;
    cached = reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(fn);
  });
  encode = cached;
  return status;
}

// The cache as a 3-D tensor [tokens = num_blocks * block_size][h_kv][d_qk], read in boxes
// of (copy keys) x 1 head x 64 channels with the 128-byte swizzle.
cudaError_t encode_kv_map(const MlaDecodeParams& p, CUtensorMap& map) {
  PFN_cuTensorMapEncodeTiled_v12000 encode = nullptr;
  if (cudaError_t err = tensor_map_encoder(encode); err != cudaSuccess) return err;
  const cuuint64_t dims[3] = {cuuint64_t(p.d_qk), cuuint64_t(p.h_kv), cuuint64_t(p.num_blocks) * p.block_size};
  const cuuint64_t strides[2] = {cuuint64_t(p.d_qk) * 2, cuuint64_t(p.h_kv) * p.d_qk * 2};  // bytes, dims 1 and 2
  const cuuint32_t box[3] = {kBoxChannels, 1, cuuint32_t(min(p.block_size, kTileKeys))};
  const cuuint32_t element_strides[3] = {1, 1, 1};
  const CUtensorMapDataType type =
      p.dtype == ElementType::kBFloat16 ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16 : CU_TENSOR_MAP_DATA_TYPE_FLOAT16;
  const CUresult result = encode(&map, type, 3, const_cast<void*>(p.kv_cache), dims, strides, box, element_strides,
                                 CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                                 CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  return result == CUDA_SUCCESS ? cudaSuccess : cudaErrorInvalidValue;
}

template <typename T, int kN>
cudaError_t launch(MlaDecodeParams& p, cudaStream_t stream) {
  const int row_tiles = ceil_div(p.rows, kN);
  if (cudaError_t err = plan_parts(p, p.h_kv * row_tiles); err != cudaSuccess) return err;
  CUtensorMap map;
  if (cudaError_t err = encode_kv_map(p, map); err != cudaSuccess) return err;
  auto* kernel = decode_sm90_kernel<T, kN>;
  constexpr int bytes = SmemLayout<kN>::kBytes;
  if (cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
      err != cudaSuccess)
    return err;
  kernel<<<dim3(p.num_parts, p.h_kv * row_tiles), kThreads, bytes, stream>>>(p, map);
  return cudaGetLastError();
}

// N: the query rows of a CTA, the fewest of 16, 32, 64 that hold them (more rows: several CTAs).
template <typename T>
cudaError_t launch_for_rows(MlaDecodeParams& p, cudaStream_t stream) {
  if (p.rows <= 16) return launch<T, 16>(p, stream);
  if (p.rows <= 32) return launch<T, 32>(p, stream);
  return launch<T, 64>(p, stream);
}

}  // namespace

bool decode_sm90_supports(const MlaDecodeParams& p) {
  const bool blocks_tile = p.block_size % kTileKeys == 0 || (kTileKeys % p.block_size == 0 && p.block_size >= 8);
  return p.d_v == kValueDim && (p.d_qk == kValueDim || p.d_qk == kMaxHeadDim) && blocks_tile &&
         int64_t(p.num_blocks) * p.block_size <= INT32_MAX;
}

cudaError_t launch_decode_sm90(MlaDecodeParams& p, cudaStream_t stream) {
  return p.dtype == ElementType::kBFloat16 ? launch_for_rows<__nv_bfloat16>(p, stream)
                                           : launch_for_rows<__half>(p, stream);
}

}  // namespace jax_etap
