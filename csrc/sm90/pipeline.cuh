// What the two Hopper kernels (decode_etap.cu, the ETAP kernel; decode_wide.cu, the wide
// kernel) share on the device: the CTA's warpgroup roles, the producer warpgroup that
// streams the KV cache and the queries into shared memory, and the shared-memory regions
// and mbarriers it fills. Their host side (tensor map, launch) is pipeline_launch.cuh.
//
// One CTA (384 threads) per (part of the split-KV schedule, tile of kRows query rows, KV
// head):
//   warpgroup 0, producer: warp 0 issues TMA copies of 64-key x 64-channel boxes (128-byte
//     swizzle) into a kStages-deep ring, one mbarrier per box so the QK GEMM starts on box 0
//     while the rest land; warps 1-3 load each piece's kRows queries into swizzled tiles.
//   warpgroups 1 and 2, consumers: the kernel's own.
// A stage is free again once both consumer warpgroups have arrived on its kv_empty barrier.
#pragma once

#include <cuda.h>

#include <utility>

#include "common/copy.cuh"
#include "common/numeric.cuh"
#include "common/output.cuh"
#include "common/params.h"
#include "common/schedule.cuh"
#include "common/sequence.cuh"
#include "sm90/primitives.cuh"
#include "sm90/wgmma.cuh"

namespace jax_etap {
namespace sm90 {

constexpr int kWarpgroup = 128;
constexpr int kThreads = 3 * kWarpgroup;
constexpr int kConsumerThreads = 2 * kWarpgroup;
constexpr int kBoxChannels = 64;                  // 64 16-bit channels: one 128-byte swizzle row
constexpr int kRowBytes = kBoxChannels * 2;
constexpr int kBoxBytes = kTileKeys * kRowBytes;  // 8 KiB
constexpr int kStages = 2;
constexpr int kMaxKBoxes = kMaxHeadDim / kBoxChannels;
constexpr int kValueDim = kHopperValueDim;
constexpr int kValueBoxes = kValueDim / kBoxChannels;
constexpr int kQueryLoaders = 3 * 32;  // warps 1-3 of the producer warpgroup
// setmaxnreg budgets: 128 * (producer + both consumers) = 64512 of the SM's 65536 registers.
constexpr int kProducerRegisters = 56;
constexpr int kConsumerRegisters = 224;
static_assert(kProducerRegisters + 2 * kConsumerRegisters == 504, "register budgets");

// The first consumer warpgroup's own named barrier (0 is __syncthreads). Everything that
// crosses warpgroups goes through mbarriers, whose arrive/wait order the memory accesses
// around them (and which compute-sanitizer's racecheck follows).
constexpr int kFirstConsumerBarrier = 1;

__host__ __device__ constexpr int align_up(int x, int a) { return (x + a - 1) / a * a; }

// f(std::integral_constant<int, i>) for i = 0 .. kCount - 1, fully unrolled: register
// arrays indexed with it stay in registers (a loop the compiler declines to unroll would
// move them to local memory).
template <typename F, int... I>
__device__ __forceinline__ void static_for_each(F& f, std::integer_sequence<int, I...>) {
  (f(std::integral_constant<int, I>{}), ...);
}
template <int kCount, typename F>
__device__ __forceinline__ void static_for(F&& f) {
  static_for_each(f, std::make_integer_sequence<int, kCount>{});
}

// The i-th use of a stage waits for barrier phase i % 2.
__device__ __forceinline__ int stage_of(int tile_count) { return tile_count % kStages; }
__device__ __forceinline__ uint32_t phase_of(int tile_count) { return (tile_count / kStages) & 1; }

// Where the pipeline's regions lie in shared memory: the KV ring at 0, then the query tile
// (kMaxKBoxes boxes of kRows rows), then the kernel's own buffers (`kOwnBytes`), then the
// per-stage flags, the rows' queries and the mbarriers: the pipeline's kPipelineBarriers
// first, then the kernel's `kOwnBarriers`. Swizzled tiles start on 1024-byte boundaries.
template <int kRows, int kOwnBytes, int kOwnBarriers>
struct PipelineLayout {
  static constexpr int kQTileBytes = kRows * kRowBytes;  // one 64-channel box of the rows
  static constexpr int kKv = 0;
  static constexpr int kQ = kKv + kStages * kMaxKBoxes * kBoxBytes;
  static constexpr int kOwn = kQ + kMaxKBoxes * kQTileBytes;
  static constexpr int kStageBad = kOwn + kOwnBytes;  // int [kStages]
  static constexpr int kQueryRows = kStageBad + kStages * 4;  // QueryRow [kRows]
  static constexpr int kBarriers = align_up(kQueryRows + kRows * int(sizeof(QueryRow)), 8);
  // kv_full[kStages][kMaxKBoxes], kv_empty[kStages], q_full, q_empty
  static constexpr int kPipelineBarriers = kStages * kMaxKBoxes + kStages + 2;
  static constexpr int kBytes = kBarriers + (kPipelineBarriers + kOwnBarriers) * 8;
  static_assert(kBytes <= 227 * 1024, "a Hopper CTA may have at most 227 KiB of shared memory");
  static_assert(kQTileBytes % 1024 == 0 && kOwn % 1024 == 0, "swizzled tiles must start on 1024-byte boundaries");
};

// The pipeline's regions of the CTA's shared memory; a kernel's Smem derives from it.
template <typename Layout>
struct PipelineSmem {
  unsigned char* base;

  __device__ unsigned char* kv_box(int stage, int box) const {
    return base + Layout::kKv + (stage * kMaxKBoxes + box) * kBoxBytes;
  }
  __device__ unsigned char* q_box(int box) const { return base + Layout::kQ + box * Layout::kQTileBytes; }
  __device__ unsigned char* own(int offset) const { return base + Layout::kOwn + offset; }
  __device__ int* stage_bad() const { return reinterpret_cast<int*>(base + Layout::kStageBad); }
  // The query behind each of the CTA's rows, found once: per use, its integer divisions
  // were unrolled into every masked tile and every store.
  __device__ QueryRow* query_rows() const { return reinterpret_cast<QueryRow*>(base + Layout::kQueryRows); }
  __device__ uint64_t* barriers() const { return reinterpret_cast<uint64_t*>(base + Layout::kBarriers); }
  __device__ uint64_t* kv_full(int stage, int box) const { return barriers() + stage * kMaxKBoxes + box; }
  __device__ uint64_t* kv_empty(int stage) const { return barriers() + kStages * kMaxKBoxes + stage; }
  __device__ uint64_t* q_full() const { return barriers() + kStages * kMaxKBoxes + kStages; }
  __device__ uint64_t* q_empty() const { return q_full() + 1; }
  __device__ uint64_t* own_barrier(int i) const { return barriers() + Layout::kPipelineBarriers + i; }
};

// The KV head and the first packed query row of this CTA: blockIdx.y enumerates (KV head,
// tile of `rows_per_cta` rows), the launch of launch_pipeline_kernel (pipeline_launch.cuh).
struct CtaRows {
  int kv_head, row0;

  __device__ CtaRows(const MlaDecodeParams& p, int rows_per_cta) {
    const int row_tiles = ceil_div(p.rows, rows_per_cta);
    kv_head = blockIdx.y / row_tiles;
    row0 = (blockIdx.y % row_tiles) * rows_per_cta;
  }
};

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

// Warp 0 of the producer (one lane): every tile of the part's pieces into the ring.
template <typename Smem>
__device__ void issue_kv_loads(const MlaDecodeParams& p, const CUtensorMap* map, const Smem& s, PartPieces& pieces,
                               int kv_head) {
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
      if (copies == 1) {  // blocks of 64+ keys (FlashMLA's 64): one lookup, and a tile's first key is valid
        rows[0] = token_row(p, table, tile * kTileKeys, bad);
      } else {
#pragma unroll
        for (int copy = 0; copy < kMaxCopies; ++copy) {
          const int key = tile * kTileKeys + copy * copy_keys;
          rows[copy] = copy < copies && key < seqlen ? token_row(p, table, key, bad) : 0;
        }
      }
      const int stage = stage_of(tile_count);
      if (tile_count >= kStages) mbarrier_wait(s.kv_empty(stage), phase_of(tile_count) ^ 1);
      s.stage_bad()[stage] = bad;  // published by the arrivals below
      // Not unrolled, here and in load_queries: this code runs from a cold instruction cache
      // at every launch, and a CTA's first copies wait for its fetch (the in-kernel clock
      // showed ~3 us from the start of a part to its first copy at batch 1).
#pragma unroll 1
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

// Warps 1-3 of the producer: each piece's kRows query rows, swizzled like a TMA box; rows
// past the CTA's rows are zero. cp.async puts every 16-byte chunk in flight at once,
// straight into shared memory: one memory round trip per piece. (Staged through
// registers, at most 4 loads per thread were in flight, three round trips in a row that
// the first consumer waited for at the start of each piece while the KV stream was loaded.)
template <typename T, int kRows, typename Smem>
__device__ void load_queries(const MlaDecodeParams& p, const Smem& s, PartPieces& pieces, int row0) {
  const int loader = threadIdx.x - 32;
  const int chunks = p.d_qk / 8;  // 16-byte chunks per row
  const T* q = static_cast<const T*>(p.q);
  int piece_count = 0;
  Piece piece;
  while (pieces.next(piece)) {
    if (piece_count > 0) mbarrier_wait(s.q_empty(), (piece_count - 1) & 1);
#pragma unroll 1
    for (int i = loader; i < kRows * chunks; i += kQueryLoaders) {
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

// The scores of the tile in `stage`: the product of its keys and the query tile over the
// d_qk channels (k_boxes boxes of 64), each box as soon as its kv_full barrier completes.
// Both operands are K-major; kKeysAreA puts the keys on wgmma's A (M = keys: the ETAP
// kernel's S^T) or else the queries (M = rows: the wide kernel's S). kN is wgmma's N.
template <typename T, int kN, bool kKeysAreA, typename Smem>
__device__ __forceinline__ void score_tile(const Smem& s, int stage, uint32_t phase, int k_boxes,
                                           float (&score)[kN / 2]) {
  pin_registers(score);
  wgmma_fence();
  for (int box = 0; box < k_boxes; ++box) {
    mbarrier_wait(s.kv_full(stage, box), phase);
#pragma unroll
    for (int k = 0; k < kBoxChannels / 16; ++k) {
      const uint64_t keys = matrix_descriptor(s.kv_box(stage, box) + k * 32, 0, 1024);
      const uint64_t queries = matrix_descriptor(s.q_box(box) + k * 32, 0, 1024);
      Wgmma<T, kN>::template mma<0>(score, kKeysAreA ? keys : queries, kKeysAreA ? queries : keys, box > 0 || k > 0);
    }
  }
  wgmma_commit();
  wgmma_wait<0>();
  pin_registers(score);
}

// Keys past a sequence's end arrive with their tile (TMA copies whole boxes). K is V, so
// before any P.V reads the stage their value rows are zeroed (0 * NaN would otherwise
// poison the output where P = 0): `valid` keys of the tile are the sequence's, and the
// calling warpgroup's thread `t` zeroes its share. The caller fences and synchronises.
// The value boxes first_box .. first_box + boxes - 1 (default: all).
template <typename Smem>
__device__ __forceinline__ void zero_values_past_end(const Smem& s, int stage, int valid, int t, int first_box = 0,
                                                     int boxes = kValueBoxes) {
  if (valid >= kTileKeys) return;
  const int chunks = (kTileKeys - valid) * (kRowBytes / 16);
  for (int i = t; i < boxes * chunks; i += kWarpgroup) {
    const int box = first_box + i / chunks, rest = i % chunks;
    *reinterpret_cast<uint4*>(s.kv_box(stage, box) + valid * kRowBytes + rest * 16) = make_uint4(0, 0, 0, 0);
  }
}

// The CTA's start, before the warpgroups part: the rows' queries and the pipeline's
// barriers (q_empty completes when `query_readers` consumer threads have arrived; the
// kernel's own barriers are initialised by `init_own_barriers`, run by thread 0), then a
// CTA barrier.
template <int kRows, typename Smem, typename InitOwn>
__device__ __forceinline__ void start_pipeline(const MlaDecodeParams& p, const Smem& s, const CUtensorMap* map,
                                               const CtaRows& cta, int query_readers, InitOwn&& init_own_barriers) {
  if (threadIdx.x >= 32 && threadIdx.x < 32 + kRows) {
    const int n = threadIdx.x - 32;
    s.query_rows()[n] = QueryRow(p, cta.kv_head, cta.row0 + n);  // rows past p.rows are never used
  }
  if (threadIdx.x == 0) {
    for (int stage = 0; stage < kStages; ++stage) {
      for (int box = 0; box < kMaxKBoxes; ++box) mbarrier_init(s.kv_full(stage, box), 1);
      mbarrier_init(s.kv_empty(stage), kConsumerThreads);
    }
    mbarrier_init(s.q_full(), kQueryLoaders);
    mbarrier_init(s.q_empty(), query_readers);
    init_own_barriers();
    fence_barrier_init();
    prefetch_tensor_map(map);
  }
  __syncthreads();
}

// The producer warpgroup's whole job.
template <typename T, int kRows, typename Smem>
__device__ __forceinline__ void run_producer(const MlaDecodeParams& p, const CUtensorMap* map, const Smem& s,
                                             PartPieces& pieces, const CtaRows& cta) {
  lower_register_budget<kProducerRegisters>();
  if (threadIdx.x == 0) issue_kv_loads(p, map, s, pieces, cta.kv_head);
  else if (threadIdx.x >= 32) load_queries<T, kRows>(p, s, pieces, cta.row0);
  // Off the critical path: the combine kernel reads it after this kernel ends.
  if (blockIdx.y == 0 && threadIdx.x / 32 == 1) record_sequence_parts(p, blockIdx.x);
}

// The three warpgroups' roles, after start_pipeline: the producer on warpgroup 0, and
// `first()` and `second()` on consumer warpgroups 1 and 2 with their register budgets
// raised. setmaxnreg sits inside each role's branch: one call before the branch puts the
// wgmma of both consumers on a divergent path for ptxas, which then serialises them
// (warning C7520).
template <typename T, int kRows, typename Smem, typename First, typename Second>
__device__ __forceinline__ void run_roles(const MlaDecodeParams& p, const CUtensorMap* map, const Smem& s,
                                          PartPieces& pieces, const CtaRows& cta, First&& first, Second&& second) {
  // Broadcast, so the role branches are warp-uniform to ptxas (as PartPieces' values are):
  // with threadIdx.x / 128 as such, the consumers' wgmma descriptors were computed per
  // thread and moved into the uniform registers before every HGMMA (R2UR, 66-277 of them
  // inside the HGMMA chains); uniform, they cost no such moves and the wide kernel no
  // spills, 1.04-1.11x at 64+ rows (H200, 2026-12-02, f8dd2f2).
  const int warpgroup = __shfl_sync(0xffffffffu, threadIdx.x / kWarpgroup, 0);
  if (warpgroup == 0) {
    run_producer<T, kRows>(p, map, s, pieces, cta);
  } else if (warpgroup == 1) {
    raise_register_budget<kConsumerRegisters>();
    first();
  } else {
    raise_register_budget<kConsumerRegisters>();
    second();
  }
}

}  // namespace sm90
}  // namespace jax_etap
