"""Loads the compiled extension and registers its XLA FFI targets with jax."""

from __future__ import annotations

import jax

try:
    from jax_etap import _etap
except ImportError as err:  # pragma: no cover - only a broken install gets here
    raise ImportError(
        "jax_etap's compiled extension (jax_etap._etap) is missing. Install the package "
        "(`pip install .` from the repository root) and run from outside the source tree, "
        "where the uninstalled `jax_etap/` folder would shadow the installed one."
    ) from err

#: The FFI target of the decode kernel. A target name is an ABI: `jax.export` artifacts
#: store it, so a change of the handler's signature gets a new name.
MLA_DECODE_TARGET = "jax_etap_mla_decode_v2"

WITH_CUDA: bool = bool(_etap.with_cuda)
#: "nvcc <version> (<CUDA toolkit | nvidia-cuda-nvcc wheels>)" that built the kernels, or None.
CUDA_COMPILER: str | None = _etap.cuda_compiler

for _name, _capsule in _etap.cuda_registrations().items():
    jax.ffi.register_ffi_target(_name, _capsule, platform="CUDA")
