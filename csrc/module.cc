// The Python extension jax_etap._etap: hands the FFI handler to Python as a capsule, for
// jax.ffi.register_ffi_target, says what the build contains, and exports the facts that
// Python must agree on with the kernels (common/limits.h) and the kernel choice
// (dispatch.cc), so that Python holds no copy of either.
#include <nanobind/nanobind.h>
#include <nanobind/stl/pair.h>
#include <nanobind/stl/string.h>

#include <stdexcept>
#include <string>
#include <utility>

#include "common/limits.h"
#include "common/params.h"
#include "dispatch.h"

#ifdef JAX_ETAP_WITH_CUDA
#include "ffi/mla_decode.h"
#endif

namespace nb = nanobind;

namespace {

// choose_kernel on a shape given by its sizes, for tests of the choice without a GPU.
std::string choose_kernel_for(std::pair<int, int> capability, int d_qk, int d_v, int rows, int block_size,
                              int num_blocks, bool portable) {
  jax_etap::MlaDecodeParams p{};
  p.d_qk = d_qk;
  p.d_v = d_v;
  p.rows = rows;
  p.block_size = block_size;
  p.num_blocks = num_blocks;
  const jax_etap::KernelChoice choice = jax_etap::choose_kernel(
      p, capability.first, capability.second,
      portable ? jax_etap::KernelRequest::kPortable : jax_etap::KernelRequest::kBest);
  if (!choice.refusal.empty()) throw std::invalid_argument(choice.refusal);
  return jax_etap::kernel_name(choice.kernel);
}

}  // namespace

NB_MODULE(_etap, m) {
  m.doc() = "jax_etap's compiled part: XLA FFI handlers of the MLA decode kernels";
#ifdef JAX_ETAP_WITH_CUDA
  m.attr("with_cuda") = true;
  m.attr("cuda_compiler") = JAX_ETAP_CUDA_COMPILER;  // "nvcc <version> (<where it came from>)"
#else
  m.attr("with_cuda") = false;
  m.attr("cuda_compiler") = nb::none();
#endif
  m.attr("mla_decode_target") = jax_etap::kMlaDecodeTarget;
  m.attr("max_head_dim") = jax_etap::kMaxHeadDim;
  m.attr("head_dim_multiple") = jax_etap::kHeadDimMultiple;
  m.attr("max_schedule_parts") = jax_etap::kMaxScheduleParts;
  m.def("head_dim_supported", &jax_etap::head_dim_supported, nb::arg("d_qk"),
        "Whether the kernels take q and cache rows of d_qk channels.");
  m.def("choose_kernel", &choose_kernel_for, nb::arg("capability"), nb::arg("d_qk"), nb::arg("d_v"),
        nb::arg("rows"), nb::arg("block_size"), nb::arg("num_blocks"), nb::arg("portable"),
        "The kernel ('etap', 'wide' or 'portable') that runs a call of this shape on a GPU of compute capability "
        "(major, minor); rows = s_q * h_q / h_kv. Raises ValueError where none can run it.");
  m.def("cuda_registrations", []() {
    nb::dict targets;
#ifdef JAX_ETAP_WITH_CUDA
    targets[jax_etap::kMlaDecodeTarget] = nb::capsule(reinterpret_cast<void*>(JaxEtapMlaDecodeV2));
#endif
    return targets;
  }, "FFI target name -> handler capsule, for platform CUDA (empty without CUDA).");
}
