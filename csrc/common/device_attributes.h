// What the launchers ask the CUDA runtime, asked once per device. The FFI handler runs at
// every call, and again whenever XLA re-captures it into a CUDA graph (command buffers),
// so its host time is part of every decode step.
#pragma once

#include <map>
#include <mutex>
#include <utility>

#include <cuda_runtime_api.h>

namespace jax_etap {

constexpr int kMaxCachedDevices = 64;

struct DeviceInfo {
  int sms = 0;
  int major = 0, minor = 0;
};

// The current device's SM count and compute capability.
inline cudaError_t current_device_info(DeviceInfo& info) {
  static std::once_flag once[kMaxCachedDevices];
  static DeviceInfo infos[kMaxCachedDevices];
  static cudaError_t status[kMaxCachedDevices];
  const auto ask = [](int device, DeviceInfo& found) {
    cudaError_t err = cudaDeviceGetAttribute(&found.sms, cudaDevAttrMultiProcessorCount, device);
    if (err == cudaSuccess) err = cudaDeviceGetAttribute(&found.major, cudaDevAttrComputeCapabilityMajor, device);
    if (err == cudaSuccess) err = cudaDeviceGetAttribute(&found.minor, cudaDevAttrComputeCapabilityMinor, device);
    return err;
  };
  int device = 0;
  if (cudaError_t err = cudaGetDevice(&device); err != cudaSuccess) return err;
  if (device < 0 || device >= kMaxCachedDevices) return ask(device, info);
  std::call_once(once[device], [&] { status[device] = ask(device, infos[device]); });
  info = infos[device];
  return status[device];
}

// Lets `kernel` take `bytes` of dynamic shared memory on the current device, calling the
// runtime only when that is more than it was last allowed there.
inline cudaError_t allow_dynamic_smem(const void* kernel, int bytes) {
  static std::mutex mutex;
  static std::map<std::pair<int, const void*>, int> allowed;  // (device, kernel) -> bytes
  int device = 0;
  if (cudaError_t err = cudaGetDevice(&device); err != cudaSuccess) return err;
  std::lock_guard<std::mutex> lock(mutex);
  int& granted = allowed[{device, kernel}];
  if (granted >= bytes) return cudaSuccess;
  const cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
  if (err == cudaSuccess) granted = bytes;
  return err;
}

}  // namespace jax_etap
