"""Loads the compiled extension, registers its XLA FFI targets with jax, and reads the
facts that Python must agree on with the kernels. Their one home is csrc/common/limits.h:
the extension exports them, and the rest of the package reads them here."""

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

WITH_CUDA: bool = bool(_etap.with_cuda)
#: "nvcc <version> (<CUDA toolkit | nvidia-cuda-nvcc wheels>)" that built the kernels, or None.
CUDA_COMPILER: str | None = _etap.cuda_compiler

#: The FFI target of the decode kernel (an ABI: `jax.export` artifacts store it).
MLA_DECODE_TARGET: str = _etap.mla_decode_target

#: d_qk, the channels of q and of a cache row: a multiple of HEAD_DIM_MULTIPLE in
#: [HEAD_DIM_MULTIPLE, MAX_HEAD_DIM] (`head_dim_supported`).
MAX_HEAD_DIM: int = _etap.max_head_dim
HEAD_DIM_MULTIPLE: int = _etap.head_dim_multiple
head_dim_supported = _etap.head_dim_supported

#: The most parts the split-KV schedule cuts a call's keys into: the workspace holds
#: batch + MAX_SCHEDULE_PARTS pieces of split sequences.
MAX_SCHEDULE_PARTS: int = _etap.max_schedule_parts

#: The kernel that runs a shape on a GPU (csrc/dispatch.cc's choice), for tests and tools.
choose_kernel = _etap.choose_kernel

for _name, _capsule in _etap.cuda_registrations().items():
    jax.ffi.register_ffi_target(_name, _capsule, platform="CUDA")
