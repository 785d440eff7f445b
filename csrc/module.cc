// The Python extension jax_etap._etap: hands the FFI handlers to Python as capsules, for
// jax.ffi.register_ffi_target, and says what the build contains.
#include <nanobind/nanobind.h>

#ifdef JAX_ETAP_WITH_CUDA
#include "ffi_handlers.h"
#endif

namespace nb = nanobind;

NB_MODULE(_etap, m) {
  m.doc() = "jax_etap's compiled part: XLA FFI handlers of the MLA decode kernels";
#ifdef JAX_ETAP_WITH_CUDA
  m.attr("with_cuda") = true;
  m.attr("cuda_compiler") = JAX_ETAP_CUDA_COMPILER;  // "nvcc <version> (<where it came from>)"
#else
  m.attr("with_cuda") = false;
  m.attr("cuda_compiler") = nb::none();
#endif
  m.def("cuda_registrations", []() {
    nb::dict targets;
#ifdef JAX_ETAP_WITH_CUDA
    targets["jax_etap_mla_decode_v2"] = nb::capsule(reinterpret_cast<void*>(JaxEtapMlaDecodeV2));
#endif
    return targets;
  }, "FFI target name -> handler capsule, for platform CUDA (empty without CUDA).");
}
