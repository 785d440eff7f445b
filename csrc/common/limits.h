// The facts that the kernels, their dispatch, the FFI handler and the Python package must
// agree on, in one place. Plain C++ (compiled in the CPU-only build too): module.cc hands
// the ones Python needs to jax_etap._ffi, which is where Python reads them.
#pragma once

namespace jax_etap {

// The FFI target of the decode kernel. A target name is an ABI: `jax.export` artifacts
// store it, so a change of the handler's signature gets a new name.
constexpr char kMlaDecodeTarget[] = "jax_etap_mla_decode_v2";

// d_qk, the channels of q and of a cache row: a multiple of kHeadDimMultiple up to
// kMaxHeadDim (DeepSeek's 512 latent + 64 rope channels). The portable kernel copies a
// key row in passes of 8 threads x 8 channels, so every thread of a key copies the same
// number of chunks only for multiples of 64.
constexpr int kMaxHeadDim = 576;
constexpr int kHeadDimMultiple = 64;
constexpr bool head_dim_supported(int d_qk) {
  return d_qk >= kHeadDimMultiple && d_qk <= kMaxHeadDim && d_qk % kHeadDimMultiple == 0;
}

// The split-KV schedule (common/schedule.cuh) cuts the keys of a call into at most this
// many parts (one persistent CTA per SM and group of query rows). A sequence cut into
// several pieces writes each to its own slot of the workspace, and there are at most
// batch + parts such pieces, so the workspace has batch + kMaxScheduleParts slots. 132 is
// the H100's and H200's SM count; a GPU with more SMs runs with this many parts. The
// workspace size comes from shapes alone: a launch that depended on runtime values
// (cache_seqlens) could not be captured by XLA into a CUDA graph.
constexpr int kMaxScheduleParts = 132;

// Keys per tile of the schedule and of every kernel's inner loop.
constexpr int kTileKeys = 64;

// The Hopper kernels' shapes (dispatch.cc): head_dim_v kHopperValueDim, d_qk
// kHopperValueDim or kMaxHeadDim, and the ETAP kernel up to kEtapMaxRows query rows per
// KV head (keys as wgmma's M, rows as N), the wide kernel above (64-row tiles as M).
constexpr int kHopperValueDim = 512;
constexpr int kEtapMaxRows = 32;

}  // namespace jax_etap
