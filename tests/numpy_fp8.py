"""The tests' oracle of the FP8 cache layout, in NumPy, written from its description alone.

Shares no code with `jax_etap.fp8`. Per token (656 bytes): bytes 0-511 the 512 latent
channels as float8_e4m3fn, bytes 512-527 four little-endian float32 scales (one per 128
channels), bytes 528-655 the 64 rope channels as little-endian bfloat16.

* scale of a tile = 2 ** ceil(log2(max(amax / 448, 1e-4))): amax / 448 in float32 (as the
  layout's producer computes it), the logarithm and ceiling in float64;
* fp8 = x / scale rounded to the nearest float8_e4m3fn value, ties to the even code, by
  search in the table of all 256 codes (decoded here from the bit layout: 1 sign bit,
  4 exponent bits of bias 7, 3 mantissa bits; exponent 0 subnormal; 0x7F and 0xFF NaN;
  no infinities);
* dequantized value = float32(fp8) * scale rounded to float32, then to the output dtype.

Only the bfloat16 rounding of the rope channels (and of dequantized values) comes from
ml_dtypes.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np

LATENT, ROPE, TILE = 512, 64, 128
SCALES, ROPE_AT, TOKEN = 512, 528, 656


def e4m3_values() -> np.ndarray:
    """float64 value of each of the 256 float8_e4m3fn codes (NaN for 0x7F and 0xFF)."""
    code = np.arange(256)
    sign = np.where(code & 0x80, -1.0, 1.0)
    exponent = (code >> 3) & 0xF
    mantissa = code & 0x7
    normal = (1 + mantissa / 8) * 2.0 ** (exponent - 7)
    subnormal = (mantissa / 8) * 2.0**-6
    values = sign * np.where(exponent == 0, subnormal, normal)
    values[(code & 0x7F) == 0x7F] = np.nan
    return values


_POSITIVE = e4m3_values()[:0x7F]  # codes 0x00 .. 0x7E: 0 .. 448, increasing


def e4m3_encode(x: np.ndarray) -> np.ndarray:
    """Codes of float values (already divided by the scale), round to nearest, ties to even code.

    Only finite values of magnitude <= 448 (1 + 2^-23) occur in a quantized tile; others are refused.
    """
    x = np.asarray(x, np.float64)
    magnitude = np.abs(x)
    assert np.isfinite(x).all() and (magnitude <= 448 * (1 + 2.0**-23)).all(), "outside what a tile quantizes to"
    upper = np.minimum(np.searchsorted(_POSITIVE, magnitude), 0x7E)  # first code >= magnitude
    lower = np.maximum(upper - 1, 0)
    below, above = magnitude - _POSITIVE[lower], _POSITIVE[upper] - magnitude
    take_upper = (above < below) | ((above == below) & (upper % 2 == 0))
    take_upper |= magnitude >= _POSITIVE[upper]  # exactly a code, or 448 and a little more
    code = np.where(take_upper, upper, lower)
    return (code | np.where(np.signbit(x), 0x80, 0)).astype(np.uint8)


def tile_scales(tiles: np.ndarray) -> np.ndarray:
    """float32 scale of each tile of float32 values ``[..., TILE]``."""
    amax = np.abs(tiles).max(axis=-1)
    ratio = np.maximum(amax / np.float32(448), np.float32(1e-4)).astype(np.float32)
    return (2.0 ** np.ceil(np.log2(ratio.astype(np.float64)))).astype(np.float32)


def quantize(rows: np.ndarray) -> np.ndarray:
    """``uint8 [..., 656]`` of finite rows ``[..., 576]`` (float32, float16 or ml_dtypes.bfloat16)."""
    rows = np.asarray(rows)
    lead = rows.shape[:-1]
    tiles = rows[..., :LATENT].astype(np.float32).reshape(*lead, 4, TILE)
    scales = tile_scales(tiles)
    codes = e4m3_encode(tiles.astype(np.float64) / scales[..., None].astype(np.float64)).reshape(*lead, LATENT)
    scale_bytes = scales.astype("<f4").view(np.uint8).reshape(*lead, 16)
    rope = rows[..., LATENT:].astype(np.float32).astype(ml_dtypes.bfloat16)
    rope_bytes = rope.view(np.uint16).astype("<u2").view(np.uint8).reshape(*lead, 2 * ROPE)
    return np.concatenate([codes, scale_bytes, rope_bytes], axis=-1)


def dequantize(data: np.ndarray, dtype=ml_dtypes.bfloat16) -> np.ndarray:
    """Rows ``dtype [..., 576]`` of FP8 tokens ``uint8 [..., 656]``."""
    data = np.asarray(data, np.uint8)
    lead = data.shape[:-1]
    fp8 = e4m3_values()[data[..., :SCALES]].astype(np.float32).reshape(*lead, 4, TILE)
    scales = np.ascontiguousarray(data[..., SCALES:ROPE_AT]).view("<f4").astype(np.float32)
    with np.errstate(invalid="ignore", over="ignore"):
        latent = (fp8 * scales[..., None]).reshape(*lead, LATENT).astype(dtype)
        rope_bits = np.ascontiguousarray(data[..., ROPE_AT:]).view("<u2").astype(np.uint16)
        rope = rope_bits.view(ml_dtypes.bfloat16).astype(np.float32).astype(dtype)
    return np.concatenate([latent, rope], axis=-1)
