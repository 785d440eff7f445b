// The combine kernel: the merge of split sequences (combine_splits.cuh) as a launch of its
// own, after the portable kernel or a Hopper kernel that could not merge them itself.
#include "combine_splits.cuh"
#include "device_cache.h"
#include "mla_decode.h"

namespace jax_etap {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

template <typename T>
__global__ void __launch_bounds__(kThreads) combine_splits_kernel(const MlaDecodeParams p) {
  combine_by_grid_warps<T>(p);
}

// An ordinary launch after the decode kernel. (Programmatic dependent launch, the combine
// scheduled early and waiting on griddepcontrol.wait, measured 2.4-3.4 us slower per call
// at batch 1 on the H200 and no faster at b128 s4K: RESULTS.md.)
template <typename T>
cudaError_t launch(MlaDecodeParams p, cudaStream_t stream) {
  DeviceInfo device;
  if (cudaError_t err = current_device_info(device); err != cudaSuccess) return err;
  constexpr int kWarpsPerSm = 64;  // a full SM's worth of warps everywhere
  p.combine = plan_combine(p, int64_t(device.sms) * kWarpsPerSm);
  const int64_t ctas = (combine_units(p) + kWarps - 1) / kWarps;
  combine_splits_kernel<T><<<unsigned(ctas), kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_combine_splits(const MlaDecodeParams& p, cudaStream_t stream) {
  return p.dtype == ElementType::kBFloat16 ? launch<__nv_bfloat16>(p, stream) : launch<__half>(p, stream);
}

}  // namespace jax_etap
