"""One decode step of L layers of DeepSeek-V3's attention in JAX, as benchmarks/step.py
times it: `jax_etap.flax.MultiHeadLatentAttention` layers, their parameters stacked on a
leading layer axis, run by one ``lax.scan`` inside one jitted step.

A layer is what the module's ``decode`` does for one new token a sequence: the q
projection (q LoRA: q_a_proj, q_a_layernorm, q_b_proj), the kv projection whose latent row
is written into the paged cache, the absorbed `jax_etap.mla_decode` over that cache, and
o_proj. Attention only: each layer's output is the next layer's input, with no residual,
norms or MLP between them.

The L layers' latent caches are one pool of pages: layer l owns blocks
``l * blocks_per_layer ..`` and reads them through layer 0's block table offset by
``l * blocks_per_layer``. The pool is carried through the scan and each layer's append
writes its one row a sequence in place. A stacked ``[L, ...]`` cache scanned as xs would
instead be sliced out (a copy of each layer's whole cache) and stacked back.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from jax_etap.cache import PagedKVCache
from jax_etap.flax import MLAConfig, MultiHeadLatentAttention, YarnScaling
from jax_etap.testing import shuffled_block_table

BLOCK_SIZE = 64  # FlashMLA's only page size, so the torch step reads the same pages
DTYPE = jnp.bfloat16  # weights, activations and cache

# DeepSeek-V3's config.json, less the head count, which is per GPU here.
DEEPSEEK_V3 = dict(hidden_size=7168, q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128,
                   qk_rope_head_dim=64, v_head_dim=128, rope_theta=10000.0, max_position_embeddings=163840,
                   rope_scaling=YarnScaling(factor=40.0, original_max_position_embeddings=4096, beta_fast=32.0,
                                            beta_slow=1.0, mscale=1.0, mscale_all_dim=1.0))
# The same structure at widths a CPU runs in seconds (a 128-wide cache row: mla_decode
# takes multiples of 64).
SMALL = dict(DEEPSEEK_V3, hidden_size=128, q_lora_rank=64, kv_lora_rank=64, qk_nope_head_dim=16, v_head_dim=16)


def attention_config(heads: int, small: bool = False) -> MLAConfig:
    """DeepSeek-V3's attention with ``heads`` query heads (16 a GPU under TP8, all 128 under
    DP attention), or its small stand-in."""
    return MLAConfig(num_attention_heads=heads, **(SMALL if small else DEEPSEEK_V3))


@dataclasses.dataclass(frozen=True)
class StepShape:
    heads: int
    batch: int
    context: int  # tokens each sequence holds when a step starts

    @property
    def name(self) -> str:
        return f"h{self.heads} b{self.batch} s{self.context}"


def blocks_per_sequence(context: int, new_tokens: int) -> int:
    """Blocks a sequence needs to hold ``context`` tokens and ``new_tokens`` more."""
    return -(-(context + new_tokens) // BLOCK_SIZE)


def cache_bytes_per_layer(shape: StepShape, config: MLAConfig, new_tokens: int) -> int:
    return shape.batch * blocks_per_sequence(shape.context, new_tokens) * BLOCK_SIZE * config.latent_dim * 2


def abstract_layer(config: MLAConfig) -> MultiHeadLatentAttention:
    """The layer with shapes for parameters (nothing allocated)."""
    return nnx.eval_shape(lambda: MultiHeadLatentAttention(config, param_dtype=DTYPE, rngs=nnx.Rngs(0)))


def weight_bytes_per_layer(config: MLAConfig) -> int:
    state = nnx.state(abstract_layer(config))
    return sum(math.prod(leaf.shape) * leaf.dtype.itemsize for leaf in jax.tree.leaves(state))


def layers_that_fit(requested: int, bytes_per_layer: int, budget_bytes: int | None) -> int:
    """``requested`` layers, or as many as ``budget_bytes`` holds (None: no budget known).
    Raises when not one layer fits."""
    if budget_bytes is None:
        return requested
    fitting = budget_bytes // bytes_per_layer
    if fitting < 1:
        raise MemoryError(f"one layer needs {bytes_per_layer / 2**30:.2f} GiB, the budget is "
                          f"{budget_bytes / 2**30:.2f} GiB")
    return min(requested, fitting)


@dataclasses.dataclass(frozen=True)
class StepInputs:
    """What a step reads: every layer's parameters (``nnx.State``, leading axis L), the new
    tokens' hidden states ``x`` [batch, 1, hidden], the pool of pages [L * blocks_per_layer,
    64, 1, latent_dim], layer 0's ``block_table`` [batch, blocks_per_sequence] and the
    sequences' lengths [batch] (the context: the pool holds random rows there)."""

    layers: nnx.State
    x: jax.Array
    pool: jax.Array
    block_table: jax.Array
    seqlens: jax.Array

    @property
    def num_layers(self) -> int:
        return jax.tree.leaves(self.layers)[0].shape[0]

    @property
    def blocks_per_layer(self) -> int:
        return self.pool.shape[0] // self.num_layers


def make_inputs(shape: StepShape, config: MLAConfig, num_layers: int, new_tokens: int, seed: int) -> StepInputs:
    """Random bf16 weights (the layer's initialisers: lecun-normal kernels, unit norm
    scales), hidden states and cache rows (N(0, 1)), one layer at a time (``lax.map``) so
    that generating them needs one layer's temporaries, not L layers'. Sequences' blocks are
    shuffled over their layer's part of the pool; each holds ``shape.context`` tokens and
    has room for ``new_tokens`` more."""
    keys = jax.random.split(jax.random.key(seed), 4)
    blocks = blocks_per_sequence(shape.context, new_tokens)
    blocks_per_layer = shape.batch * blocks

    def one_layer(key):
        return nnx.state(MultiHeadLatentAttention(config, param_dtype=DTYPE, rngs=nnx.Rngs(params=key)))

    def layer_pages(key):
        return jax.random.normal(key, (blocks_per_layer, BLOCK_SIZE, 1, config.latent_dim), DTYPE)

    def pool_pages(key):  # reshaped inside jit: outside, the reshape would be a second pool
        pages = jax.lax.map(layer_pages, jax.random.split(key, num_layers))
        return pages.reshape(num_layers * blocks_per_layer, *pages.shape[2:])

    return StepInputs(
        layers=jax.jit(lambda k: jax.lax.map(one_layer, jax.random.split(k, num_layers)))(keys[0]),
        x=jax.random.normal(keys[2], (shape.batch, 1, config.hidden_size), DTYPE),
        pool=jax.jit(pool_pages)(keys[1]),
        block_table=shuffled_block_table(keys[3], shape.batch, blocks),
        seqlens=jnp.full((shape.batch,), shape.context, jnp.int32),
    )


def make_step(config: MLAConfig, implementation: str | None):
    """The jitted step ``(layers, x, pool, block_table, seqlens) -> (out [batch, 1, hidden],
    pool, seqlens + 1)``, the pool donated (its one new row a sequence a layer is written
    in place). ``implementation`` goes to `jax_etap.mla_decode` (None: the CUDA kernel on a
    GPU; "xla": the jnp reference)."""
    graph = nnx.graphdef(abstract_layer(config))

    def step(layers, x, pool, block_table, seqlens):
        num_layers = jax.tree.leaves(layers)[0].shape[0]
        blocks_per_layer = pool.shape[0] // num_layers

        def layer(carry, layer_xs):
            hidden, pool = carry
            params, index = layer_xs
            cache = PagedKVCache(pages=pool, block_table=block_table + index * blocks_per_layer, seqlens=seqlens)
            out, cache = nnx.merge(graph, params).decode(hidden, cache, implementation=implementation)
            return (out, cache.pages), None

        (out, pool), _ = jax.lax.scan(layer, (x, pool), (layers, jnp.arange(num_layers, dtype=jnp.int32)))
        return out, pool, seqlens + 1

    return jax.jit(step, donate_argnums=2)
