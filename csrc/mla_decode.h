// Launcher interface of the MLA decode kernels: plain C++ and CUDA runtime types only,
// so neither XLA FFI nor nanobind leaks into the .cu files.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

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
  float* partial_out;         // [batch, num_splits, h_kv, rows, d_v]: per-split normalised outputs
  float* partial_lse;         // [batch, num_splits, h_kv, rows]

  int batch, s_q, h_q, h_kv, d_qk, d_v;
  int num_blocks, block_size, max_blocks_per_seq;
  int num_splits;
  float softmax_scale;
  bool causal;

  // Query rows that share one KV head: FlashMLA's packing, row = s * groups + g.
  ETAP_HOST_DEVICE int groups() const { return h_q / h_kv; }
  ETAP_HOST_DEVICE int rows() const { return s_q * groups(); }
  ETAP_HOST_DEVICE int64_t capacity() const { return int64_t(max_blocks_per_seq) * block_size; }
};

// Largest d_qk the split-KV kernel accepts (DeepSeek's 512 latent + 64 rope).
constexpr int kMaxHeadDim = 576;

// Each split of each sequence attends over its slice of the keys and writes an
// un-merged partial result.
cudaError_t launch_split_kv_decode(const MlaDecodeParams& params, cudaStream_t stream);

// Merges the splits with their log-sum-exp weights into out/lse, and turns every row of a
// sequence whose block table points outside the cache into NaN.
cudaError_t launch_combine_splits(const MlaDecodeParams& params, cudaStream_t stream);

}  // namespace jax_etap
