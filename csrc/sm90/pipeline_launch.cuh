// The host side of the Hopper kernels' pipeline (pipeline.cuh): the KV cache's tensor map
// and the launch of a kernel built on the pipeline.
#pragma once

#include <cuda.h>
#include <cudaTypedefs.h>

#include <mutex>

#include "common/device_attributes.h"
#include "common/launch_plan.h"
#include "common/numeric.cuh"
#include "common/params.h"
#include "sm90/pipeline.cuh"

namespace jax_etap {
namespace sm90 {

// cuTensorMapEncodeTiled from the driver, without linking libcuda: the extension must load
// on machines whose driver jax found, whatever its path.
inline cudaError_t tensor_map_encoder(PFN_cuTensorMapEncodeTiled_v12000& encode) {
  static PFN_cuTensorMapEncodeTiled_v12000 cached = nullptr;
  static cudaError_t status = cudaSuccess;
  static std::once_flag once;
  std::call_once(once, [] {
    void* fn = nullptr;
    cudaDriverEntryPointQueryResult found;
    status = cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &fn, 12000, cudaEnableDefault, &found);
    if (status == cudaSuccess && found != cudaDriverEntryPointSuccess) status = cudaErrorSymbolNotFound;
    cached = reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(fn);
  });
  encode = cached;
  return status;
}

// The cache as a 3-D tensor [tokens = num_blocks * block_size][h_kv][d_qk], read in boxes
// of (copy keys) x 1 head x 64 channels with the 128-byte swizzle.
inline cudaError_t encode_kv_map(const MlaDecodeParams& p, CUtensorMap& map) {
  PFN_cuTensorMapEncodeTiled_v12000 encode = nullptr;
  if (cudaError_t err = tensor_map_encoder(encode); err != cudaSuccess) return err;
  const cuuint64_t dims[3] = {cuuint64_t(p.d_qk), cuuint64_t(p.h_kv), cuuint64_t(p.num_blocks) * p.block_size};
  const cuuint64_t strides[2] = {cuuint64_t(p.d_qk) * 2, cuuint64_t(p.h_kv) * p.d_qk * 2};  // bytes, dims 1 and 2
  const cuuint32_t box[3] = {kBoxChannels, 1, cuuint32_t(min(p.block_size, kTileKeys))};
  const cuuint32_t element_strides[3] = {1, 1, 1};
  const CUtensorMapDataType type =
      p.dtype == ElementType::kBFloat16 ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16 : CU_TENSOR_MAP_DATA_TYPE_FLOAT16;
  const CUresult result = encode(&map, type, 3, const_cast<void*>(p.kv_cache), dims, strides, box, element_strides,
                                 CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                                 CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  return result == CUDA_SUCCESS ? cudaSuccess : cudaErrorInvalidValue;
}

// Launches `kernel(p, map)` with one CTA per (part, tile of kRows rows, KV head) and
// `smem_bytes` of dynamic shared memory; sets p.num_parts.
template <int kRows>
cudaError_t launch_pipeline_kernel(void (*kernel)(MlaDecodeParams, CUtensorMap), int smem_bytes, MlaDecodeParams& p,
                                   cudaStream_t stream) {
  const int row_tiles = ceil_div(p.rows, kRows);
  if (cudaError_t err = plan_parts(p, p.h_kv * row_tiles); err != cudaSuccess) return err;
  CUtensorMap map;
  if (cudaError_t err = encode_kv_map(p, map); err != cudaSuccess) return err;
  if (cudaError_t err = allow_dynamic_smem(reinterpret_cast<const void*>(kernel), smem_bytes); err != cudaSuccess)
    return err;
  kernel<<<dim3(p.num_parts, p.h_kv * row_tiles), kThreads, smem_bytes, stream>>>(p, map);
  return cudaGetLastError();
}

}  // namespace sm90
}  // namespace jax_etap
