// The one choice of the kernel that runs a decode call, and (in the CUDA build) its run.
#pragma once

#include <string>

#include "common/params.h"

#ifdef JAX_ETAP_WITH_CUDA
#include <cuda_runtime_api.h>
#endif

namespace jax_etap {

enum class Kernel { kEtap, kWide, kPortable };

// What the caller asks for: the best kernel for the device and shape (implementation
// "cuda"), or the portable kernel even where a Hopper kernel applies ("portable").
enum class KernelRequest { kBest, kPortable };

struct KernelChoice {
  Kernel kernel = Kernel::kPortable;
  std::string refusal;  // non-empty: no kernel can run the call as requested, and why
};

// The kernel for a call of shape `p` (its pointers are not read) on a device of compute
// capability cc_major.cc_minor. Plain C++: the CPU-only build exports it for tests.
KernelChoice choose_kernel(const MlaDecodeParams& p, int cc_major, int cc_minor, KernelRequest request);

const char* kernel_name(Kernel kernel);

#ifdef JAX_ETAP_WITH_CUDA
struct DecodeStatus {
  std::string refusal;          // non-empty: choose_kernel refused the call
  cudaError_t error = cudaSuccess;
  std::string step;             // what failed, when error is set
};

// Asks the current device's compute capability, launches the kernel choose_kernel picks
// and then the combine, on `stream`.
DecodeStatus run_decode(MlaDecodeParams& p, KernelRequest request, cudaStream_t stream);
#endif

}  // namespace jax_etap
