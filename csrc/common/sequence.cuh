// Which keys a sequence's queries see: its clamped length, the causal ends of its query
// rows, and whether the blocks holding its keys lie inside the cache.
#pragma once

#include <cstdint>

#include "common/params.h"

namespace jax_etap {

// The valid length of sequence b: cache_seqlens clamped to [0, capacity], so a bad
// runtime value can never move a read past the cache.
__device__ __forceinline__ int clamped_seqlen(const MlaDecodeParams& p, int b) {
  const int64_t len = p.seqlens[b];
  return int(len < 0 ? 0 : (len > p.capacity() ? p.capacity() : len));
}

// Query position s of a causal decode step sees keys [0, end): the s_q queries are the
// last s_q tokens of the sequence.
__device__ __forceinline__ int position_key_end(const MlaDecodeParams& p, int seqlen, int s) {
  if (!p.causal) return seqlen;
  const int end = seqlen - p.s_q + s + 1;
  return end < 0 ? 0 : end;
}

// The same for packed row r = s * groups + g.
__device__ __forceinline__ int row_key_end(const MlaDecodeParams& p, int seqlen, int row) {
  return position_key_end(p, seqlen, row / p.groups);
}

__device__ __forceinline__ bool block_index_valid(const MlaDecodeParams& p, int block) {
  return block >= 0 && block < p.num_blocks;
}

// Whether keys [key_begin, key_end) of sequence b all lie in blocks inside the cache. The
// calling threads (`thread`, of `threads`) each check a share; combine with a barrier-or.
__device__ __forceinline__ bool blocks_in_range(const MlaDecodeParams& p, int b, int key_begin, int key_end,
                                                int thread, int threads) {
  if (key_end <= key_begin) return true;
  const int32_t* table = p.block_table + int64_t(b) * p.max_blocks_per_seq;
  bool ok = true;
  for (int i = key_begin / p.block_size + thread; i <= (key_end - 1) / p.block_size; i += threads)
    ok = ok && block_index_valid(p, __ldg(table + i));
  return ok;
}

}  // namespace jax_etap
