// One decode call as the kernels see it: plain C++, so neither XLA FFI nor nanobind leaks
// into the .cu files, and dispatch.cc reads it in the CPU-only build too.
#pragma once

#include <cstdint>

#include "common/limits.h"

// The helpers of MlaDecodeParams run on both sides when nvcc compiles this header.
#ifdef __CUDACC__
#define ETAP_HOST_DEVICE __host__ __device__
#else
#define ETAP_HOST_DEVICE
#endif

namespace jax_etap {

enum class ElementType { kBFloat16, kFloat16 };

// One decode call. All pointers are device pointers; shapes are the paged layout
// (a dense cache is passed as one block per sequence).
struct MlaDecodeParams {
  ElementType dtype;

  const void* q;              // [batch, s_q, h_q, d_qk]
  const void* kv_cache;       // [num_blocks, block_size, h_kv, d_qk]
  const int32_t* seqlens;     // [batch]
  const int32_t* block_table; // [batch, max_blocks_per_seq]

  void* out;                  // [batch, s_q, h_q, d_v], dtype of q
  float* lse;                 // [batch, h_q, s_q]
  float* partial_out;         // [partial_slots, h_kv, rows, d_v]: normalised outputs of split sequences
  float* partial_lse;         // [partial_slots, h_kv, rows]
  int32_t* sequence_parts;    // [batch, 2]: first and last schedule part holding each sequence

  int batch, s_q, h_q, h_kv, d_qk, d_v;
  // Query rows that share one KV head (FlashMLA's packing, row = s * groups + g): set once
  // on the host, so that kernels read them instead of dividing h_q by h_kv at every use.
  int groups;  // h_q / h_kv
  int rows;    // s_q * groups
  int num_blocks, block_size, max_blocks_per_seq;
  int partial_slots;          // batch + the most parts the workspace allows (common/limits.h)
  int num_parts;              // parts of the split-KV schedule, set by the launcher
  float softmax_scale;
  bool causal;

  ETAP_HOST_DEVICE int64_t capacity() const { return int64_t(max_blocks_per_seq) * block_size; }
};

}  // namespace jax_etap
