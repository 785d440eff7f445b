"""Flax (nnx) integration: DeepSeek-V3's multi-head latent attention over a paged cache.

Needs flax (``pip install "jax_etap[flax]"``); ``import jax_etap`` alone never imports it.
See docs/flax.md.
"""

from __future__ import annotations

try:
    import flax.nnx  # noqa: F401
except ImportError as error:  # pragma: no cover - depends on the environment
    raise ImportError('jax_etap.flax needs flax: pip install "jax_etap[flax]"') from error

from jax_etap.flax.attention import MultiHeadLatentAttention
from jax_etap.flax.config import MLAConfig, YarnScaling
from jax_etap.flax.deepseek_v32 import DeepseekV32Attention, IndexerConfig, LightningIndexer
from jax_etap.flax.weights import load_deepseek_weights

__all__ = ["DeepseekV32Attention", "IndexerConfig", "LightningIndexer", "MLAConfig", "MultiHeadLatentAttention", "YarnScaling", "load_deepseek_weights"]
