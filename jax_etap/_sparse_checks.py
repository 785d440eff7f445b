"""Trace-time validation of `mla_decode_sparse`'s arguments.

Like `jax_etap._checks` (whose helpers it uses) it reads only shapes, dtypes and static
values, so a mistake is reported when the function is traced, naming the argument, what
it got and what was expected.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jax.numpy as jnp

from jax_etap._describe import describe
from jax_etap._checks import (
    MAX_HEAD_DIM,
    _require_int32,
    _require_rank,
    check_dtypes,
    check_head_dim_v_and_scale,
)

# None: the CUDA kernels where jax's default backend is a GPU, else the jnp reference;
# "xla": the reference; "cuda" (and "etap", its older name) and "portable" insist on the
# kernels, as in mla_decode, which the CUDA path calls (jax_etap._sparse_gathered).
SPARSE_IMPLEMENTATIONS = (None, "xla", "cuda", "etap", "portable")


@dataclass(frozen=True)
class SparseShape:
    """The sizes of one sparse decode call, read off validated arguments."""

    batch: int
    s_q: int
    h_q: int
    d_qk: int
    topk: int
    num_tokens: int  # num_blocks * block_size: the flat positions indices may name
    head_dim_v: int
    softmax_scale: float


def check_sparse_implementation(implementation: Any) -> None:
    if not isinstance(implementation, (str, type(None))) or implementation not in SPARSE_IMPLEMENTATIONS:
        names = ", ".join(repr(name) for name in SPARSE_IMPLEMENTATIONS)
        raise ValueError(f"implementation must be one of {names}; got {implementation!r}")


def check_sparse_args(
    q: Any,
    kv_cache: Any,
    indices: Any,
    topk_length: Any,
    attn_sink: Any,
    head_dim_v: Any,
    softmax_scale: Any,
) -> SparseShape:
    """Validates the arguments of `mla_decode_sparse` and returns their sizes (for an FP8
    cache, those of the cache it dequantizes to: d_qk 576)."""
    _require_rank("q", q, 4, "[batch, s_q, h_q, d_qk]")
    _require_rank("kv_cache", kv_cache, 4, "[num_blocks, block_size, 1, d_qk]")
    _require_rank("indices", indices, 3, "[batch, s_q, topk]")
    if topk_length is not None:
        _require_rank("topk_length", topk_length, 1, "[batch]")
    if attn_sink is not None:
        _require_rank("attn_sink", attn_sink, 1, "[h_q]")

    kv_cache = check_dtypes(q, kv_cache, head_dim_v)  # an FP8 cache as the rows it dequantizes to
    _require_int32("indices", indices)
    if topk_length is not None:
        _require_int32("topk_length", topk_length)
    if attn_sink is not None and jnp.dtype(attn_sink.dtype) != jnp.float32:
        raise TypeError(f"attn_sink must be float32, got {describe(attn_sink)}")

    batch, s_q, h_q, d_qk = q.shape
    num_blocks, block_size, h_kv, _ = kv_cache.shape
    if d_qk % 64 != 0 or not 64 <= d_qk <= MAX_HEAD_DIM:
        raise ValueError(f"q's last dimension d_qk must be a multiple of 64 in [64, {MAX_HEAD_DIM}], got {describe(q)}")
    if kv_cache.shape[3] != d_qk:
        raise ValueError(f"kv_cache's last dimension must equal q's d_qk = {d_qk}, got {describe(kv_cache)}")
    if h_kv != 1:
        raise ValueError(f"kv_cache must have one KV head (dimension 2 of size 1), got {describe(kv_cache)}")
    if tuple(indices.shape[:2]) != (batch, s_q):
        raise ValueError(f"indices must have shape ({batch}, {s_q}, topk) to match q's batch and s_q, got {describe(indices)}")
    if topk_length is not None and topk_length.shape[0] != batch:
        raise ValueError(f"topk_length must have shape ({batch},) to match q's batch, got {describe(topk_length)}")
    if attn_sink is not None and attn_sink.shape[0] != h_q:
        raise ValueError(f"attn_sink must have shape ({h_q},) to match q's h_q, got {describe(attn_sink)}")

    head_dim_v, softmax_scale = check_head_dim_v_and_scale(head_dim_v, softmax_scale, d_qk)
    return SparseShape(batch, s_q, h_q, d_qk, indices.shape[2], num_blocks * block_size, head_dim_v, softmax_scale)
