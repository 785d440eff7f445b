// Which kernel runs a decode call: the only place that decides it. Python decides only
// between the jnp reference and this extension (jax_etap/_lowering.py).
#include "dispatch.h"

#include <cstdint>
#include <string>

#include "common/limits.h"

#ifdef JAX_ETAP_WITH_CUDA
#include "common/device_attributes.h"
#include "kernels.h"
#endif

namespace jax_etap {
namespace {

// The shapes the Hopper kernels take: their value boxes cover exactly kHopperValueDim
// channels, their KV ring holds the 512 latent channels or those plus the 64 rope
// channels, a TMA copy reads whole blocks of at least 8 keys that tile the 64-key tile
// (or tiles of whole blocks), and the tensor map addresses tokens with int32.
bool hopper_shape(const MlaDecodeParams& p) {
  const bool blocks_tile = p.block_size % kTileKeys == 0 || (kTileKeys % p.block_size == 0 && p.block_size >= 8);
  return p.d_v == kHopperValueDim && (p.d_qk == kHopperValueDim || p.d_qk == kMaxHeadDim) && blocks_tile &&
         int64_t(p.num_blocks) * p.block_size <= INT32_MAX;
}

std::string capability(int major, int minor) { return std::to_string(major) + "." + std::to_string(minor); }

}  // namespace

KernelChoice choose_kernel(const MlaDecodeParams& p, int cc_major, int cc_minor, KernelRequest request) {
  KernelChoice choice;
  // Every kernel is built for sm_80 (the portable kernel and the combine) or sm_90a.
  if (cc_major < 8) {
    choice.refusal = "the CUDA kernels need compute capability 8.0 or newer, this GPU has " +
                     capability(cc_major, cc_minor);
    return choice;
  }
  // sm_90a code runs on compute capability 9.0 exactly (H100, H200, H20).
  const bool hopper = cc_major == 9 && cc_minor == 0;
  if (request == KernelRequest::kBest && hopper && hopper_shape(p))
    choice.kernel = p.rows <= kEtapMaxRows ? Kernel::kEtap : Kernel::kWide;
  else
    choice.kernel = Kernel::kPortable;
  return choice;
}

const char* kernel_name(Kernel kernel) {
  switch (kernel) {
    case Kernel::kEtap: return "etap";
    case Kernel::kWide: return "wide";
    case Kernel::kPortable: return "portable";
  }
  return "unknown";
}

#ifdef JAX_ETAP_WITH_CUDA
DecodeStatus run_decode(MlaDecodeParams& p, KernelRequest request, cudaStream_t stream) {
  DecodeStatus status;
  DeviceInfo device;
  if ((status.error = current_device_info(device)) != cudaSuccess) {
    status.step = "device query";
    return status;
  }
  const KernelChoice choice = choose_kernel(p, device.major, device.minor, request);
  if (!choice.refusal.empty()) {
    status.refusal = choice.refusal;
    return status;
  }
  switch (choice.kernel) {
    case Kernel::kEtap: status.error = launch_decode_etap(p, stream); break;
    case Kernel::kWide: status.error = launch_decode_wide(p, stream); break;
    case Kernel::kPortable: status.error = launch_decode_portable(p, stream); break;
  }
  if (status.error != cudaSuccess) {
    status.step = std::string(kernel_name(choice.kernel)) + " kernel launch";
    return status;
  }
  if ((status.error = launch_combine_splits(p, stream)) != cudaSuccess) status.step = "combine kernel launch";
  return status;
}
#endif

}  // namespace jax_etap
