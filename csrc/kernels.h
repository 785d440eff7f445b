// The kernels' launchers, the boundary between dispatch.cc and the .cu files: plain C++
// and CUDA runtime types only.
//
// Each decode kernel's CTAs work through the parts of the split-KV schedule
// (common/schedule.cuh), each for a group of query rows of one KV head: sequences a part
// holds whole get their final out/lse, pieces of split sequences get partial results.
// Each launcher sets params.num_parts. A sequence with a used block-table entry outside
// [0, num_blocks) never reads it and gets NaN in every output.
#pragma once

#include <cuda_runtime_api.h>

#include "common/params.h"

namespace jax_etap {

// The portable kernel: sm_80 and newer, any shape the API accepts (mma.sync, 16 rows per
// CTA; sm80/decode_portable.cu).
cudaError_t launch_decode_portable(MlaDecodeParams& params, cudaStream_t stream);

// The Hopper kernels (sm_90a: wgmma, TMA), for the shapes dispatch.cc gives them: the
// ETAP kernel up to kEtapMaxRows query rows per KV head (sm90/decode_etap.cu), the wide
// kernel above (sm90/decode_wide.cu).
cudaError_t launch_decode_etap(MlaDecodeParams& params, cudaStream_t stream);
cudaError_t launch_decode_wide(MlaDecodeParams& params, cudaStream_t stream);

// Merges the pieces of split sequences into out/lse, and writes the empty sequences
// (no key: out 0, lse -inf). Runs after any decode kernel, on the same stream.
cudaError_t launch_combine_splits(const MlaDecodeParams& params, cudaStream_t stream);

}  // namespace jax_etap
