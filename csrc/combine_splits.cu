// Merges the per-split partial results of split_kv_decode.cu into the final output:
// out = sum_s exp(lse_s - lse) * out_s with lse = logsumexp_s(lse_s). Also the one place
// that applies the block-table rule: a sequence whose used blocks include an index
// outside [0, num_blocks) gets NaN in every row (those blocks were never read).
#include <cmath>

#include "device_utils.cuh"
#include "mla_decode.h"

namespace jax_etap {
namespace {

constexpr int kThreads = 128;

__device__ bool sequence_has_bad_block(const MlaDecodeParams& p, int b, int seqlen) {
  const int32_t* table = p.block_table + int64_t(b) * p.max_blocks_per_seq;
  bool bad = false;
  for (int i = threadIdx.x; i < ceil_div(seqlen, p.block_size); i += kThreads)
    bad |= !block_index_valid(p, __ldg(table + i));
  return __syncthreads_or(bad);
}

// One CTA per (sequence, KV head, packed query row).
template <typename T>
__global__ void __launch_bounds__(kThreads) combine_splits_kernel(const MlaDecodeParams p) {
  const int row = blockIdx.x % p.rows();
  const int kv_head = (blockIdx.x / p.rows()) % p.h_kv;
  const int b = blockIdx.x / (p.rows() * p.h_kv);
  const int s = row / p.groups();
  const int h = kv_head * p.groups() + row % p.groups();

  T* out = static_cast<T*>(p.out) + ((int64_t(b) * p.s_q + s) * p.h_q + h) * p.d_v;
  float* lse = p.lse + (int64_t(b) * p.h_q + h) * p.s_q + s;

  if (sequence_has_bad_block(p, b, clamped_seqlen(p, b))) {
    for (int c = threadIdx.x; c < p.d_v; c += kThreads) out[c] = from_float<T>(NAN);
    if (threadIdx.x == 0) *lse = NAN;
    return;
  }

  // Split s of this row sits at stride h_kv * rows in the partial buffers.
  const int64_t split_stride = int64_t(p.h_kv) * p.rows();
  const int64_t first = (int64_t(b) * p.num_splits * p.h_kv + kv_head) * p.rows() + row;
  const float* partial_lse = p.partial_lse + first;
  const float* partial_out = p.partial_out + first * p.d_v;

  float max_lse = -INFINITY;
  for (int i = 0; i < p.num_splits; ++i) max_lse = nan_max(max_lse, partial_lse[i * split_stride]);
  if (max_lse == -INFINITY) {  // the row sees no key
    for (int c = threadIdx.x; c < p.d_v; c += kThreads) out[c] = from_float<T>(0.f);
    if (threadIdx.x == 0) *lse = -INFINITY;
    return;
  }
  float sum = 0.f;
  for (int i = 0; i < p.num_splits; ++i) sum += expf(partial_lse[i * split_stride] - max_lse);
  const float total_lse = max_lse + logf(sum);

  // Each split's weight once, in shared memory; then the channels, with independent loads.
  extern __shared__ float weight_s[];
  for (int i = threadIdx.x; i < p.num_splits; i += kThreads) weight_s[i] = expf(partial_lse[i * split_stride] - total_lse);
  __syncthreads();
  for (int c = threadIdx.x; c < p.d_v; c += kThreads) {
    float value = 0.f;
#pragma unroll 4
    for (int i = 0; i < p.num_splits; ++i) value = fmaf(weight_s[i], partial_out[i * split_stride * p.d_v + c], value);
    out[c] = from_float<T>(value);
  }
  if (threadIdx.x == 0) *lse = total_lse;
}

template <typename T>
cudaError_t launch(const MlaDecodeParams& p, cudaStream_t stream) {
  const int64_t rows_total = int64_t(p.batch) * p.h_kv * p.rows();
  const size_t weight_bytes = size_t(p.num_splits) * sizeof(float);
  combine_splits_kernel<T><<<dim3(unsigned(rows_total)), kThreads, weight_bytes, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_combine_splits(const MlaDecodeParams& p, cudaStream_t stream) {
  return p.dtype == ElementType::kBFloat16 ? launch<__nv_bfloat16>(p, stream) : launch<__half>(p, stream);
}

}  // namespace jax_etap
