"""jax_etap: Multi-head Latent Attention (MLA) decoding for JAX.

`mla_decode` runs a CUDA kernel registered through XLA FFI on NVIDIA GPUs and the
pure-jnp reference (`jax_etap.reference.mla_decode_reference`) elsewhere. `jax_etap.cache`
is a paged KV cache for decoding loops; `jax_etap.flax` (optional, needs flax) a DeepSeek
attention layer built on both.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from jax_etap import _ffi, cache, fp8, reference, sharding
from jax_etap.api import kernel_available, mla_decode
from jax_etap.sparse import mla_decode_sparse

try:
    __version__ = version("jax_etap")
except PackageNotFoundError:  # pragma: no cover - running from an uninstalled tree
    __version__ = "0.0.0+unknown"


def build_info() -> dict:
    """What this installation contains: version, whether CUDA was compiled and by which
    compiler, FFI targets."""
    return {
        "version": __version__,
        "cuda": _ffi.WITH_CUDA,
        "cuda_compiler": _ffi.CUDA_COMPILER,
        "ffi_targets": [_ffi.MLA_DECODE_TARGET] if _ffi.WITH_CUDA else [],
        "kernel_available": kernel_available(),
    }


__all__ = [
    "__version__", "build_info", "cache", "fp8", "kernel_available", "mla_decode", "mla_decode_sparse", "reference",
    "sharding",
]
