// The split-KV tile scheduler shared by the decode kernels and the combine kernel (its
// host half, the number of parts, is common/launch_plan.h).
//
// The keys of all sequences are cut into tiles of kTileKeys. Laid end to end on one "cost
// line", sequence b occupies kSequenceOverhead units (its fixed cost: loading q, writing
// the result) followed by one unit per tile. The line is cut into num_parts equal parts,
// one per persistent CTA, so a ragged batch or a single long sequence spreads evenly over
// the GPU. A part holds "pieces": the tiles of one sequence that fall inside it.
//
// Every warp of a decode CTA finds its part's pieces from cache_seqlens with one
// warp-wide scan: no metadata pass, no extra launch, and the same integer arithmetic on
// the same inputs gives the same schedule everywhere. The decode kernels also record,
// per sequence, which parts hold it (record_sequence_parts) for the combine kernel.
//
// A piece that covers a whole sequence writes the final output. A sequence cut into
// several pieces writes each to partial slot `part + b`: parts and sequences both advance
// monotonically along the line, so part + b is distinct for every piece and stays below
// num_parts + batch, the workspace's first dimension.
#pragma once

#include <cstdint>

#include "common/numeric.cuh"
#include "common/params.h"
#include "common/sequence.cuh"

namespace jax_etap {

constexpr int kSequenceOverhead = 2;

__device__ __forceinline__ int sequence_tiles(const MlaDecodeParams& p, int b) {
  return ceil_div(clamped_seqlen(p, b), kTileKeys);
}

__device__ __forceinline__ int sequence_cost(const MlaDecodeParams& p, int b) {
  return b < p.batch ? kSequenceOverhead + sequence_tiles(p, b) : 0;
}

// Sum over lanes of the warp (all 32 lanes must call).
__device__ __forceinline__ int64_t warp_sum(int64_t x) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) x += __shfl_xor_sync(0xffffffffu, x, offset);
  return x;
}

// Inclusive prefix sum over lanes.
__device__ __forceinline__ int64_t warp_inclusive_scan(int64_t x) {
  const int lane = threadIdx.x % 32;
#pragma unroll
  for (int offset = 1; offset < 32; offset *= 2) {
    const int64_t y = __shfl_up_sync(0xffffffffu, x, offset);
    if (lane >= offset) x += y;
  }
  return x;
}

// The cut of the cost line into parts. Called by a whole warp.
//
// No part may be empty in the middle of the line: the combine kernel finds a sequence's
// pieces in consecutive parts. So a line shorter than num_parts is cut into one part per
// unit, and the parts past its end stay idle.
struct CostLine {
  int64_t total;
  int used_parts;  // min(num_parts, total): each of these parts is non-empty

  __device__ static CostLine measure(const MlaDecodeParams& p) {
    int64_t sum = 0;
    for (int b0 = 0; b0 < p.batch; b0 += 32) sum += sequence_cost(p, b0 + threadIdx.x % 32);
    sum = warp_sum(sum);
    return {sum, int(sum < p.num_parts ? sum : p.num_parts)};
  }
  __device__ int64_t part_begin(int part) const {
    return int64_t(part < used_parts ? part : used_parts) * total / used_parts;
  }
  // The part holding position x (0 <= x < total): the largest part whose begin is <= x.
  __device__ int part_of(int64_t x) const { return int(((x + 1) * used_parts - 1) / total); }
};

struct Piece {
  int b;
  int tile_begin, tile_end;  // tiles [tile_begin, tile_end) of sequence b
  bool whole;                // the piece is the whole sequence: write the final output
  int slot;                  // else its partial-result slot
};

// Walks the pieces of one part in order. The constructor is warp-collective (every lane
// of the warp calls it); next() is not, so one lane may walk on alone.
class PartPieces {
 public:
  __device__ PartPieces(const MlaDecodeParams& p, int part) : p_(p), part_(part) {
    const CostLine line = CostLine::measure(p);
    begin_ = line.part_begin(part);
    end_ = line.part_begin(part + 1);
    // The first sequence whose cost interval ends past begin_: a warp-wide search along
    // the inclusive prefix sums of the costs.
    b_ = p.batch;
    start_ = 0;
    int64_t before = 0;
    for (int b0 = 0; b0 < p.batch; b0 += 32) {
      const int j = b0 + threadIdx.x % 32;
      const int64_t cost = sequence_cost(p, j);
      const int64_t inclusive = before + warp_inclusive_scan(cost);
      const unsigned hits = __ballot_sync(0xffffffffu, j < p.batch && inclusive > begin_);
      if (hits) {
        const int lane = __ffs(hits) - 1;
        b_ = b0 + lane;
        start_ = __shfl_sync(0xffffffffu, inclusive - cost, lane);
        break;
      }
      before = __shfl_sync(0xffffffffu, inclusive, 31);
    }
    // Every lane holds the same values; broadcast from lane 0, ptxas can prove it, and so
    // every tile, stage and wgmma descriptor the kernels derive from the pieces is
    // warp-uniform and lives in uniform registers (docs/design.md, "uniform descriptors").
    begin_ = __shfl_sync(0xffffffffu, begin_, 0);
    end_ = __shfl_sync(0xffffffffu, end_, 0);
    b_ = __shfl_sync(0xffffffffu, b_, 0);
    start_ = __shfl_sync(0xffffffffu, start_, 0);
  }

  // The next piece with at least one tile, or false when the part is exhausted.
  __device__ bool next(Piece& piece) {
    while (b_ < p_.batch && start_ < end_) {
      const int tiles = sequence_tiles(p_, b_);
      const int64_t first_tile = start_ + kSequenceOverhead;
      const int64_t lo = first_tile > begin_ ? first_tile : begin_;
      const int64_t hi = first_tile + tiles < end_ ? first_tile + tiles : end_;
      piece.b = b_;
      piece.tile_begin = int(lo - first_tile);
      piece.tile_end = int(hi - first_tile);
      piece.whole = piece.tile_begin == 0 && piece.tile_end == tiles;
      piece.slot = part_ + b_;
      start_ += kSequenceOverhead + tiles;
      ++b_;
      if (hi > lo) return true;
    }
    return false;
  }

 private:
  const MlaDecodeParams& p_;
  int part_;
  int64_t begin_, end_;  // this part's interval of the cost line
  int b_;                // the next sequence to look at
  int64_t start_;        // where sequence b_ starts on the line
};

// For the combine kernel: the first and last part holding tiles of each sequence, in
// sequence_parts[b] = {first, last}. The part whose interval holds a sequence's first
// cost unit records it; one warp of one CTA per part calls this.
__device__ __forceinline__ void record_sequence_parts(const MlaDecodeParams& p, int part) {
  const CostLine line = CostLine::measure(p);
  const int64_t begin = line.part_begin(part), end = line.part_begin(part + 1);
  int64_t before = 0;
  for (int b0 = 0; b0 < p.batch && before < end; b0 += 32) {
    const int b = b0 + threadIdx.x % 32;
    const int64_t cost = sequence_cost(p, b);
    const int64_t inclusive = before + warp_inclusive_scan(cost);
    const int64_t start = inclusive - cost;
    if (b < p.batch && start >= begin && start < end) {
      const int tiles = sequence_tiles(p, b);
      const int64_t first_tile = start + kSequenceOverhead;
      const int first = tiles > 0 ? line.part_of(first_tile) : part;
      p.sequence_parts[2 * b] = first;
      p.sequence_parts[2 * b + 1] = tiles > 0 ? line.part_of(first_tile + tiles - 1) : first;
    }
    before = __shfl_sync(0xffffffffu, inclusive, 31);
  }
}

}  // namespace jax_etap
