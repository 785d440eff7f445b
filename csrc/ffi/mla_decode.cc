// XLA FFI handler of the MLA decode custom call: checks the buffers XLA hands over and
// fills MlaDecodeParams; dispatch.cc chooses the kernel and launches it on XLA's stream. Errors are returned as
// ffi::Error, never thrown or printed. The handler allocates nothing, never synchronises
// and derives its launch shape from shapes alone, so XLA may capture it into CUDA graphs.
#include "ffi/mla_decode.h"

#include <string>

#include <cuda_runtime_api.h>

#include "common/limits.h"
#include "common/params.h"
#include "dispatch.h"

namespace ffi = xla::ffi;

namespace jax_etap {
namespace {

std::string shape_string(ffi::Span<const int64_t> dims) {
  std::string s = "[";
  for (size_t i = 0; i < dims.size(); ++i) s += (i ? ", " : "") + std::to_string(dims[i]);
  return s + "]";
}

ffi::Error invalid(const std::string& what) {
  return ffi::Error::InvalidArgument(std::string(kMlaDecodeTarget) + ": " + what);
}

ffi::Error expect_shape(const char* name, ffi::Span<const int64_t> dims, std::initializer_list<int64_t> expected) {
  bool same = dims.size() == expected.size();
  size_t i = 0;
  for (int64_t e : expected) same = same && dims[i++] == e;
  if (same) return ffi::Error::Success();
  std::string want = "[";
  i = 0;
  for (int64_t e : expected) want += (i++ ? ", " : "") + std::to_string(e);
  return invalid(std::string(name) + " has shape " + shape_string(dims) + ", expected " + want + "]");
}

ffi::Error cuda_error(const std::string& what, cudaError_t err) {
  return ffi::Error::Internal(std::string(kMlaDecodeTarget) + ": " + what + " failed: " + cudaGetErrorName(err) +
                              " (" + cudaGetErrorString(err) + ")");
}

ffi::Error MlaDecode(cudaStream_t stream, ffi::AnyBuffer q, ffi::AnyBuffer kv_cache, ffi::Buffer<ffi::S32> seqlens,
                     ffi::Buffer<ffi::S32> block_table, ffi::Result<ffi::AnyBuffer> out,
                     ffi::Result<ffi::Buffer<ffi::F32>> lse, ffi::Result<ffi::Buffer<ffi::F32>> partial_out,
                     ffi::Result<ffi::Buffer<ffi::F32>> partial_lse, ffi::Result<ffi::Buffer<ffi::S32>> sequence_parts,
                     float softmax_scale, bool causal, bool portable) {
  const auto q_dims = q.dimensions(), kv_dims = kv_cache.dimensions();
  if (q_dims.size() != 4) return invalid("q must have rank 4, got shape " + shape_string(q_dims));
  if (kv_dims.size() != 4) return invalid("kv_cache must have rank 4, got shape " + shape_string(kv_dims));
  if (q.element_type() != kv_cache.element_type()) return invalid("q and kv_cache must share a dtype");
  if (q.element_type() != ffi::BF16 && q.element_type() != ffi::F16) return invalid("q must be bfloat16 or float16");

  MlaDecodeParams p{};
  p.dtype = q.element_type() == ffi::BF16 ? ElementType::kBFloat16 : ElementType::kFloat16;
  p.batch = int(q_dims[0]);
  p.s_q = int(q_dims[1]);
  p.h_q = int(q_dims[2]);
  p.d_qk = int(q_dims[3]);
  p.num_blocks = int(kv_dims[0]);
  p.block_size = int(kv_dims[1]);
  p.h_kv = int(kv_dims[2]);
  p.max_blocks_per_seq = block_table.dimensions().size() == 2 ? int(block_table.dimensions()[1]) : 0;
  const auto out_dims = out->dimensions();
  p.d_v = out_dims.size() == 4 ? int(out_dims[3]) : 0;
  p.partial_slots = partial_lse->dimensions().size() == 3 ? int(partial_lse->dimensions()[0]) : 0;

  if (kv_dims[3] != p.d_qk) return invalid("kv_cache shape " + shape_string(kv_dims) + " does not match q's d_qk");
  if (!head_dim_supported(p.d_qk))
    return invalid("d_qk must be a multiple of " + std::to_string(kHeadDimMultiple) + " in [" +
                   std::to_string(kHeadDimMultiple) + ", " + std::to_string(kMaxHeadDim) + "], got " +
                   std::to_string(p.d_qk));
  if (p.h_kv < 1 || p.h_q % p.h_kv != 0) return invalid("h_q must be a multiple of h_kv");
  p.groups = p.h_q / p.h_kv;
  p.rows = p.s_q * p.groups;
  if (p.d_v < 1 || p.d_v > p.d_qk) return invalid("out's head_dim_v must be in [1, d_qk]");
  if (p.partial_slots <= p.batch) return invalid("partial_lse must have more slots than the batch has sequences");
  if (!(softmax_scale > 0.f)) return invalid("softmax_scale must be positive");
  if (auto e = expect_shape("cache_seqlens", seqlens.dimensions(), {p.batch}); e.failure()) return e;
  if (auto e = expect_shape("block_table", block_table.dimensions(), {p.batch, p.max_blocks_per_seq}); e.failure())
    return e;
  if (auto e = expect_shape("out", out_dims, {p.batch, p.s_q, p.h_q, p.d_v}); e.failure()) return e;
  if (auto e = expect_shape("lse", lse->dimensions(), {p.batch, p.h_q, p.s_q}); e.failure()) return e;
  if (auto e = expect_shape("partial_lse", partial_lse->dimensions(), {p.partial_slots, p.h_kv, p.rows});
      e.failure())
    return e;
  if (auto e = expect_shape("partial_out", partial_out->dimensions(), {p.partial_slots, p.h_kv, p.rows, p.d_v});
      e.failure())
    return e;
  if (auto e = expect_shape("sequence_parts", sequence_parts->dimensions(), {p.batch, 2}); e.failure()) return e;

  p.q = q.untyped_data();
  p.kv_cache = kv_cache.untyped_data();
  p.seqlens = seqlens.typed_data();
  p.block_table = block_table.typed_data();
  p.out = out->untyped_data();
  p.lse = lse->typed_data();
  p.partial_out = partial_out->typed_data();
  p.partial_lse = partial_lse->typed_data();
  p.sequence_parts = sequence_parts->typed_data();
  p.softmax_scale = softmax_scale;
  p.causal = causal;

  if (p.batch == 0 || p.s_q == 0 || p.h_q == 0) return ffi::Error::Success();  // nothing to compute
  const DecodeStatus status = run_decode(p, portable ? KernelRequest::kPortable : KernelRequest::kBest, stream);
  if (!status.refusal.empty()) return invalid(status.refusal);
  if (status.error != cudaSuccess) return cuda_error(status.step, status.error);
  return ffi::Error::Success();
}

}  // namespace
}  // namespace jax_etap

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxEtapMlaDecodeV2, jax_etap::MlaDecode,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<ffi::AnyBuffer>()            // q
                                  .Arg<ffi::AnyBuffer>()            // kv_cache
                                  .Arg<ffi::Buffer<ffi::S32>>()     // cache_seqlens
                                  .Arg<ffi::Buffer<ffi::S32>>()     // block_table
                                  .Ret<ffi::AnyBuffer>()            // out
                                  .Ret<ffi::Buffer<ffi::F32>>()     // lse
                                  .Ret<ffi::Buffer<ffi::F32>>()     // partial_out (workspace)
                                  .Ret<ffi::Buffer<ffi::F32>>()     // partial_lse (workspace)
                                  .Ret<ffi::Buffer<ffi::S32>>()     // sequence_parts (workspace)
                                  .Attr<float>("softmax_scale")
                                  .Attr<bool>("causal")
                                  .Attr<bool>("portable"),  // the portable kernel even where a Hopper kernel applies
                              {ffi::Traits::kCmdBufferCompatible});
