// The host half of the split-KV schedule (common/schedule.cuh): how many parts a launch
// cuts the keys into.
#pragma once

#include <cuda_runtime_api.h>

#include "common/device_attributes.h"
#include "common/params.h"

namespace jax_etap {

// Parts of a launch in which every part takes `ctas_per_part` CTAs: one CTA per SM in one
// wave, and no more parts than the workspace has slots for.
inline cudaError_t plan_parts(MlaDecodeParams& p, int ctas_per_part) {
  DeviceInfo device;
  if (cudaError_t err = current_device_info(device); err != cudaSuccess) return err;
  const int parts = device.sms / ctas_per_part;
  const int most = p.partial_slots - p.batch;
  p.num_parts = parts < 1 ? 1 : (parts > most ? most : parts);
  return cudaSuccess;
}

}  // namespace jax_etap
