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
  float* partial_out;         // [partial_slots, h_kv, rows, d_v]: normalised outputs of split sequences
  float* partial_lse;         // [partial_slots, h_kv, rows]
  int32_t* sequence_parts;    // [batch, 2]: first and last schedule part holding each sequence

  int batch, s_q, h_q, h_kv, d_qk, d_v;
  // Query rows that share one KV head (FlashMLA's packing, row = s * groups + g): set once
  // on the host, so that kernels read them instead of dividing h_q by h_kv at every use.
  int groups;  // h_q / h_kv
  int rows;    // s_q * groups
  int num_blocks, block_size, max_blocks_per_seq;
  int partial_slots;          // batch + the most parts the workspace allows (schedule.cuh)
  int num_parts;              // parts of the split-KV schedule, set by the launcher
  float softmax_scale;
  bool causal;

  ETAP_HOST_DEVICE int64_t capacity() const { return int64_t(max_blocks_per_seq) * block_size; }
};

// Largest d_qk the split-KV kernel accepts (DeepSeek's 512 latent + 64 rope).
constexpr int kMaxHeadDim = 576;

// The decode kernels. Each CTA of a launch works through one part of the split-KV
// schedule (schedule.cuh) for a group of query rows of one KV head: sequences it holds
// whole get their final out/lse, pieces of split sequences get partial results. Both set
// params.num_parts. A sequence with a used block-table entry outside [0, num_blocks)
// never reads it and gets NaN in every output.

// The portable kernel: sm_80 and newer, any shape the API accepts (mma.sync, 16 rows/CTA).
cudaError_t launch_decode_sm80(MlaDecodeParams& params, cudaStream_t stream);

// The Hopper kernels (sm_90a: wgmma, TMA), for the shapes decode_sm90_supports accepts: up
// to kEtapMaxRows query rows per KV head the ETAP kernel (keys as wgmma's M, rows as N;
// decode_sm90.cu), more the wide kernel (64-row tiles as M; decode_sm90_wide.cu).
constexpr int kEtapMaxRows = 32;
bool decode_sm90_supports(const MlaDecodeParams& params);
cudaError_t launch_decode_sm90(MlaDecodeParams& params, cudaStream_t stream);
cudaError_t launch_decode_sm90_wide(MlaDecodeParams& params, cudaStream_t stream);

// Merges the pieces of split sequences into out/lse, and writes the empty sequences
// (no key: out 0, lse -inf). Runs after either decode kernel, on the same stream.
cudaError_t launch_combine_splits(const MlaDecodeParams& params, cudaStream_t stream);

}  // namespace jax_etap
