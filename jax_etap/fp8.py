"""The FP8 latent cache: DeepSeek-V3.2's 656-byte token layout, in jnp.

One token of an MLA cache (h_kv = 1, 576 channels: 512 latent + 64 rope) is stored as
656 bytes, the layout FlashMLA calls "V32":

====================  ==================================================================
bytes 0 - 511         the 512 latent channels as float8_e4m3fn
bytes 512 - 527       four float32 scales, little-endian, one per tile of 128 latent
                      channels (tile i: channels 128 i .. 128 i + 127)
bytes 528 - 655       the 64 rope channels as bfloat16, little-endian, not quantized
====================  ==================================================================

That is 656 bytes a token against 1152 in bfloat16 (1.76x fewer). `quantize` writes it,
`dequantize` reads it; `jax_etap.mla_decode` accepts such a cache (``uint8 [..., 656]``)
in place of a bfloat16 one and computes on ``dequantize(cache, q.dtype)``.

Quantizing one tile ``x`` of 128 channels (in float32):

* ``amax = max |x|``;
* ``scale = 2 ** ceil(log2(max(amax / 448, 1e-4)))`` with ``amax / 448`` rounded to
  float32 and the ceiling of its exact base-2 logarithm (no floating-point log2, which
  can round log2 of a value just above a power of two down to the integer);
* ``fp8 = float8_e4m3fn(x / scale)``: the division is exact (a power of two), the cast
  rounds to nearest, ties to even. ``|x / scale| <= 448 (1 + 2^-24)`` always (448 is
  e4m3's largest finite value), which rounds to at most 448, so a saturating and a
  non-saturating cast give the same bytes for finite inputs.

A tile holding an infinity or a NaN gets scale inf or NaN and dequantizes to NaN in all
of its 128 channels. For bfloat16 and float16 inputs ``amax / 448`` is never within
float32 rounding of a power of two unless it is one, so the bytes are the ones a
float32 ``log2`` gives too (FlashMLA's tests/quant.py computes it that way).

Dequantizing: ``float32(fp8) * scale`` in float32, then rounded to the output dtype.
For a cache written by `quantize` (scales powers of two in ``[2^-13, 2^120]``) every
product has at most 4 significant bits and lies in ``[2^-22, 1.75 * 2^128]``, so it is
exact in bfloat16 and float32, except ``256 * 2^120 = 2^128``, beyond both: it comes
only from inputs ``|x| > 1.9375 * 2^127`` (within 3% of the float32 maximum) and reads
back as +-inf. In float16 a product of magnitude ``2^16`` or more reads back as +-inf;
below that it is exact. Scales written by anything else are used as they are (the
product rounded to float32, then to the output dtype).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from jax_etap._describe import describe

LATENT = 512  # channels stored as float8_e4m3fn; also mla_decode's head_dim_v on an FP8 cache
ROPE = 64  # channels stored as bfloat16
HEAD_DIM = LATENT + ROPE  # 576: the d_qk of a cache row
TILE = 128  # latent channels per scale
TILES = LATENT // TILE
SCALES_OFFSET = LATENT  # byte offset of the four float32 scales
ROPE_OFFSET = SCALES_OFFSET + 4 * TILES  # 528: byte offset of the rope channels
BYTES_PER_TOKEN = ROPE_OFFSET + 2 * ROPE  # 656

E4M3_MAX = 448.0  # float8_e4m3fn's largest finite value
SMALLEST_SCALE_RATIO = 1e-4  # amax / 448 is raised to this before the power of two

INPUT_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16), jnp.dtype(jnp.float32))


def quantize(rows: jax.Array) -> jax.Array:
    """Cache rows ``[..., 576]`` (bfloat16, float16 or float32) as FP8 tokens ``uint8 [..., 656]``.

    See the module docstring for the layout and the rounding.
    """
    if not hasattr(rows, "shape") or jnp.dtype(rows.dtype) not in INPUT_DTYPES:
        raise TypeError(f"rows must be a bfloat16, float16 or float32 array, got {type(rows).__name__}"
                        + (f" (rows of {describe(rows)})" if hasattr(rows, "dtype") else ""))
    if len(rows.shape) < 1 or rows.shape[-1] != HEAD_DIM:
        raise ValueError(f"rows must end in the {HEAD_DIM} channels of a cache row, got rows of {describe(rows)}")
    lead = rows.shape[:-1]
    tiles = rows[..., :LATENT].astype(jnp.float32).reshape(*lead, TILES, TILE)
    scales = _tile_scales(jnp.max(jnp.abs(tiles), axis=-1))
    fp8 = (tiles / scales[..., None]).astype(jnp.float8_e4m3fn).reshape(*lead, LATENT)
    rope = rows[..., LATENT:].astype(jnp.bfloat16)
    return jnp.concatenate([_bytes(fp8), _bytes(scales), _bytes(rope)], axis=-1)


def _tile_scales(amax: jax.Array) -> jax.Array:
    """``2 ** ceil(log2(max(amax / 448, 1e-4)))`` in float32, the logarithm taken exactly."""
    ratio = jnp.maximum(amax / jnp.float32(E4M3_MAX), jnp.float32(SMALLEST_SCALE_RATIO))  # NaN stays NaN
    mantissa, exponent = jnp.frexp(ratio)  # ratio = mantissa * 2**exponent, mantissa in [0.5, 1)
    exponent = jnp.where(mantissa == 0.5, exponent - 1, exponent)  # a power of two is its own ceiling
    # inf and NaN ratios (a tile holding inf or NaN) are their own scale.
    return jnp.where(jnp.isfinite(ratio), jnp.ldexp(jnp.float32(1), exponent), ratio)


def _bytes(x: jax.Array) -> jax.Array:
    """The bytes of each element of ``x`` (machine order: little-endian on CPUs and GPUs), end to end along the last axis."""
    return jax.lax.bitcast_convert_type(x, jnp.uint8).reshape(*x.shape[:-1], -1)


def _from_bytes(data: jax.Array, dtype) -> jax.Array:
    """The inverse of `_bytes`: ``uint8 [..., n * itemsize]`` as ``dtype [..., n]``."""
    itemsize = jnp.dtype(dtype).itemsize
    if itemsize > 1:
        data = data.reshape(*data.shape[:-1], data.shape[-1] // itemsize, itemsize)
    return jax.lax.bitcast_convert_type(data, dtype)


def dequantize(data: jax.Array, dtype=jnp.bfloat16) -> jax.Array:
    """FP8 tokens ``uint8 [..., 656]`` as cache rows ``dtype [..., 576]`` (bfloat16 by default).

    dtype: bfloat16, float16 or float32. Where the result is exact is in the module
    docstring; in short, always in bfloat16 and float32 for what `quantize` writes, short
    of overflow.
    """
    if not hasattr(data, "shape") or jnp.dtype(data.dtype) != jnp.uint8:
        raise TypeError(f"data must be a uint8 array of FP8 tokens, got {type(data).__name__}"
                        + (f" (data of {describe(data)})" if hasattr(data, "dtype") else ""))
    if len(data.shape) < 1 or data.shape[-1] != BYTES_PER_TOKEN:
        raise ValueError(f"data must end in the {BYTES_PER_TOKEN} bytes of an FP8 token, got data of {describe(data)}")
    if jnp.dtype(dtype) not in INPUT_DTYPES:
        raise TypeError(f"dtype must be bfloat16, float16 or float32, got {jnp.dtype(dtype).name}")
    lead = data.shape[:-1]
    fp8 = _from_bytes(data[..., :SCALES_OFFSET], jnp.float8_e4m3fn).astype(jnp.float32)
    scales = _from_bytes(data[..., SCALES_OFFSET:ROPE_OFFSET], jnp.float32)
    rope = _from_bytes(data[..., ROPE_OFFSET:], jnp.bfloat16)
    latent = (fp8.reshape(*lead, TILES, TILE) * scales[..., None]).reshape(*lead, LATENT)
    return jnp.concatenate([latent.astype(dtype), rope.astype(dtype)], axis=-1)


def is_fp8_cache(kv_cache: Any) -> bool:
    """Whether `mla_decode` reads ``kv_cache`` as an FP8 cache: any uint8 array is one."""
    return jnp.dtype(kv_cache.dtype) == jnp.uint8


def decoded_cache_type(q: Any, kv_cache: Any, head_dim_v: Any) -> Any:
    """What `mla_decode` computes on, for its argument checks: the type of the dequantized
    cache for an FP8 cache, after checking what an FP8 cache requires; ``kv_cache`` itself
    otherwise. Needs q and kv_cache of rank 4 (checked before).
    """
    if not is_fp8_cache(kv_cache):
        return kv_cache
    *lead, h_kv, width = kv_cache.shape
    if width != BYTES_PER_TOKEN:
        raise ValueError(
            f"a uint8 kv_cache is an FP8 cache (jax_etap.fp8) and needs last dimension {BYTES_PER_TOKEN}, "
            f"got kv_cache of {describe(kv_cache)}"
        )
    if h_kv != 1:
        raise ValueError(f"an FP8 kv_cache (uint8) holds one KV head (h_kv = 1), got kv_cache of {describe(kv_cache)}")
    if q.shape[-1] != HEAD_DIM:
        raise ValueError(f"with an FP8 kv_cache (uint8), q's last dimension d_qk must be {HEAD_DIM}, got q of {describe(q)}")
    if head_dim_v != LATENT:
        raise ValueError(f"with an FP8 kv_cache (uint8), head_dim_v must be {LATENT} (the latent channels), got {head_dim_v!r}")
    return jax.ShapeDtypeStruct((*lead, h_kv, HEAD_DIM), q.dtype)


def as_decode_cache(kv_cache: jax.Array, dtype) -> jax.Array:
    """The cache `mla_decode` computes on: an FP8 cache dequantized to ``dtype`` (q's), any other as it is."""
    return dequantize(kv_cache, dtype) if is_fp8_cache(kv_cache) else kv_cache


def referenced_decode_cache(kv_cache: jax.Array, block_table: jax.Array, dtype) -> tuple[jax.Array, jax.Array]:
    """A paged FP8 cache as the decode kernels read it: ``(pages, block_table)`` of the
    same decode, dequantized to ``dtype``, with no more rows dequantized than the pool or
    the table holds, whichever is fewer (both known from the shapes). Any other cache
    comes back as it is.

    Where the table has fewer entries than the pool has blocks (a serving pool shared with
    other sequences than the call's), only the blocks it names are gathered and
    dequantized, in table order (``pages[b * max_blocks + j]`` is block
    ``block_table[b, j]``); an entry outside ``[0, num_blocks)`` stays outside the new pool
    (-1), which the decode answers as before: NaN where the sequence uses that block,
    nothing where it does not. Otherwise the whole pool is dequantized and the table kept.
    Block indices are those of the pool given: a device's local ones on its shard.
    """
    if not is_fp8_cache(kv_cache):
        return kv_cache, block_table
    num_blocks = kv_cache.shape[0]
    batch, max_blocks = block_table.shape
    if batch * max_blocks >= num_blocks:
        return dequantize(kv_cache, dtype), block_table
    in_pool = (block_table >= 0) & (block_table < num_blocks)
    pages = dequantize(kv_cache[jnp.where(in_pool, block_table, 0).reshape(-1)], dtype)
    table = jnp.arange(batch * max_blocks, dtype=jnp.int32).reshape(batch, max_blocks)
    return pages, jnp.where(in_pool, table, -1)
