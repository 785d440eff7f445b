"""Trace-time validation of `mla_decode`'s arguments.

Everything here reads only shapes, dtypes and static values, so a mistake is reported
when the function is traced, naming the argument, what it got and what was expected.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jax.numpy as jnp
import numpy as np

from jax_etap._describe import describe
from jax_etap._ffi import HEAD_DIM_MULTIPLE, MAX_HEAD_DIM, head_dim_supported
from jax_etap.fp8 import decoded_cache_type

__all__ = ["MAX_HEAD_DIM", "DecodeShape", "check_decode_args", "check_implementation"]

SUPPORTED_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
# The values of `implementation`, and the one each stands for: "etap", the name before
# "cuda" (jax.nn.dot_product_attention's convention of naming the backend), is its alias.
IMPLEMENTATIONS = {None: None, "cuda": "cuda", "etap": "cuda", "portable": "portable", "xla": "xla"}


@dataclass(frozen=True)
class DecodeShape:
    """The sizes of one decode call, read off validated arguments."""

    batch: int
    h_kv: int
    head_dim_v: int
    softmax_scale: float


def _require_rank(name: str, x: Any, rank: int, layout: str) -> None:
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        raise TypeError(f"{name} must be an array, got {type(x).__name__}")
    if len(x.shape) != rank:
        raise ValueError(f"{name} must have rank {rank} ({layout}), got {describe(x)}")


def _require_int32(name: str, x: Any) -> None:
    if jnp.dtype(x.dtype) != jnp.int32:
        raise TypeError(f"{name} must be int32, got {describe(x)}")


def check_decode_args(
    q: Any,
    kv_cache: Any,
    cache_seqlens: Any,
    block_table: Any,
    head_dim_v: int,
    softmax_scale: float | None,
    causal: bool,
) -> DecodeShape:
    """Validates the arguments of `mla_decode` and returns their sizes."""
    _require_rank("q", q, 4, "[batch, s_q, h_q, d_qk]")
    paged = block_table is not None
    kv_layout = "[num_blocks, block_size, h_kv, d_qk]" if paged else "[batch, s_k, h_kv, d_qk]"
    _require_rank("kv_cache", kv_cache, 4, kv_layout)
    _require_rank("cache_seqlens", cache_seqlens, 1, "[batch]")
    if paged:
        _require_rank("block_table", block_table, 2, "[batch, max_blocks_per_seq]")

    kv_cache = check_dtypes(q, kv_cache, head_dim_v)
    _require_int32("cache_seqlens", cache_seqlens)
    if paged:
        _require_int32("block_table", block_table)

    batch, s_q, h_q, d_qk = q.shape
    h_kv = kv_cache.shape[2]
    if not head_dim_supported(d_qk):
        raise ValueError(
            f"q's last dimension d_qk must be a multiple of {HEAD_DIM_MULTIPLE} in [{HEAD_DIM_MULTIPLE}, {MAX_HEAD_DIM}], "
            f"got {describe(q)}"
        )
    if kv_cache.shape[3] != d_qk:
        raise ValueError(f"kv_cache's last dimension must equal q's d_qk = {d_qk}, got {describe(kv_cache)}")
    if h_kv < 1 or h_q % h_kv != 0:
        raise ValueError(f"q's head count h_q = {h_q} must be a multiple of kv_cache's h_kv = {h_kv}")
    if cache_seqlens.shape[0] != batch:
        raise ValueError(f"cache_seqlens must have shape ({batch},) to match q's batch, got {describe(cache_seqlens)}")
    if paged and block_table.shape[0] != batch:
        raise ValueError(f"block_table's first dimension must be q's batch = {batch}, got {describe(block_table)}")
    if not paged and kv_cache.shape[0] != batch:
        raise ValueError(
            f"a dense kv_cache (block_table=None) must have q's batch = {batch} as its first dimension, "
            f"got {describe(kv_cache)}"
        )

    head_dim_v, softmax_scale = check_head_dim_v_and_scale(head_dim_v, softmax_scale, d_qk)
    if not isinstance(causal, (bool, np.bool_)):
        raise TypeError(f"causal must be a static bool, got {causal!r}")

    return DecodeShape(batch, h_kv, head_dim_v, softmax_scale)


def check_dtypes(q: Any, kv_cache: Any, head_dim_v: Any) -> Any:
    """Checks q's dtype and the cache's against it; returns the cache's type as the kernels
    see it (an FP8 cache, uint8 [..., 656], as the rows it dequantizes to)."""
    if jnp.dtype(q.dtype) not in SUPPORTED_DTYPES:
        raise TypeError(f"q must be bfloat16 or float16, got {describe(q)}")
    kv_cache = decoded_cache_type(q, kv_cache, head_dim_v)
    if jnp.dtype(kv_cache.dtype) != jnp.dtype(q.dtype):
        raise TypeError(f"kv_cache must have q's dtype {jnp.dtype(q.dtype).name}, got {describe(kv_cache)}")
    return kv_cache


def check_head_dim_v_and_scale(head_dim_v: Any, softmax_scale: Any, d_qk: int) -> tuple[int, float]:
    """Validates the static ``head_dim_v`` and ``softmax_scale`` of a call whose q.k has
    ``d_qk`` channels; returns them as (int, float), None resolved to ``d_qk ** -0.5``."""
    if isinstance(head_dim_v, bool) or not isinstance(head_dim_v, (int, np.integer)):
        raise TypeError(f"head_dim_v must be a static int, got {head_dim_v!r}")
    if not 1 <= head_dim_v <= d_qk:
        raise ValueError(f"head_dim_v must be in [1, d_qk = {d_qk}], got {head_dim_v}")
    if softmax_scale is None:
        softmax_scale = d_qk**-0.5
    elif isinstance(softmax_scale, bool) or not isinstance(softmax_scale, (int, float, np.floating, np.integer)):
        raise TypeError(f"softmax_scale must be a static Python float or None, got {softmax_scale!r}")
    if not (np.isfinite(softmax_scale) and softmax_scale > 0):
        raise ValueError(f"softmax_scale must be a positive finite number, got {softmax_scale!r}")
    return int(head_dim_v), float(softmax_scale)


def check_implementation(implementation: Any) -> str | None:
    """Validates `implementation` and returns the name it stands for (an alias resolved)."""
    if not isinstance(implementation, (str, type(None))) or implementation not in IMPLEMENTATIONS:
        names = ", ".join(repr(name) for name in IMPLEMENTATIONS)
        raise ValueError(f"implementation must be one of {names}; got {implementation!r}")
    return IMPLEMENTATIONS[implementation]
