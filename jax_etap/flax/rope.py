"""DeepSeek's rotary position embedding of the rope part of queries and keys, with YaRN.

DeepSeek rotates adjacent channel pairs ``(2i, 2i + 1)`` by angle ``position * inv_freq[i]``
and leaves each pair in place (its reference code multiplies the pairs as complex
numbers). transformers' ``rope_interleave`` path computes the same rotations but writes
the results de-interleaved (all first members, then all second members); that is one
fixed permutation applied to both queries and keys, so attention scores are identical.
The public checkpoints' weights are in this interleaved-pair layout.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from jax_etap.flax.config import MLAConfig


def inverse_frequencies(config: MLAConfig) -> np.ndarray:
    """``[qk_rope_head_dim // 2]`` float32 rotation speeds, YaRN-corrected when configured.

    YaRN divides the frequencies by ``factor`` for pairs that complete fewer than
    ``beta_slow`` rotations over the original context, keeps those completing more than
    ``beta_fast``, and blends linearly in between (pair indices rounded outwards).
    """
    dim, base = config.qk_rope_head_dim, config.rope_theta
    inv_freq = 1.0 / base ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
    scaling = config.rope_scaling
    if scaling is not None:
        original = scaling.original_max_position_embeddings

        def pair_index_for(rotations: float) -> float:
            # Solves original * inv_freq[i] = 2 * pi * rotations for the (fractional) pair i.
            return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

        low = max(math.floor(pair_index_for(scaling.beta_fast)), 0)
        high = min(math.ceil(pair_index_for(scaling.beta_slow)), dim - 1)
        width = (high - low) or 0.001  # the same guard DeepSeek uses against low == high
        interpolated = np.clip((np.arange(dim // 2) - low) / width, 0.0, 1.0)
        inv_freq = inv_freq * (1 - interpolated) + inv_freq / config.yarn_factor * interpolated
    return inv_freq.astype(np.float32)


def rope_cos_sin(positions: jax.Array, config: MLAConfig) -> tuple[jax.Array, jax.Array]:
    """cos and sin ``[*positions.shape, qk_rope_head_dim // 2]`` (float32) of the rotation
    angles at integer ``positions``, times YaRN's `MLAConfig.rope_attention_factor`."""
    angle = positions.astype(jnp.float32)[..., None] * jnp.asarray(inverse_frequencies(config))
    factor = config.rope_attention_factor
    return jnp.cos(angle) * factor, jnp.sin(angle) * factor


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotates each channel pair ``(2i, 2i + 1)`` of ``x [..., d]`` by the angle whose
    cos/sin (broadcastable to ``[..., d // 2]``) are given; pairs stay in place."""
    pairs = x.reshape(*x.shape[:-1], x.shape[-1] // 2, 2)
    first, second = pairs[..., 0], pairs[..., 1]
    rotated = jnp.stack([first * cos - second * sin, first * sin + second * cos], axis=-1)
    return rotated.reshape(x.shape)
