"""DeepSeek-V3.2's attention: V3's multi-head latent attention restricted, for each query,
to the ``index_topk`` cache tokens its lightning indexer scores highest (DeepSeek Sparse
Attention), decoded through `jax_etap.mla_decode_sparse`.

The indexer, from DeepSeek-V3.2-Exp's published inference code (``inference/model.py``,
class ``Indexer``; facts only), for a token x at position p with the attention's query
latent ``qr = q_a_layernorm(q_a_proj(x))``, H = index_n_heads heads of D = index_head_dim
channels, R = qk_rope_head_dim:

* ``q = wq_b(qr)`` as ``[H, D]``; ``k = k_norm(wk(x))`` ``[D]`` (k_norm a LayerNorm with
  weight and bias, eps 1e-6): one key per token, shared by the heads, kept in the
  indexer's own key cache;
* rope on the *first* R channels of q and k, *not interleaved*: channel i is paired with
  channel i + R/2 (the attention's own rope pairs adjacent channels; the published code
  had this wrong before 2025-11-17). Same angles as the attention's rope;
* q and k times the Hadamard matrix of order D scaled by ``D ** -0.5`` (an orthogonal
  rotation: it leaves q . k unchanged and evens out values before FP8 quantization);
* ``w = weights_proj(x) * H ** -0.5 * D ** -0.5`` ``[H]``;
* the score of cached token t: ``sum_h w[h] * relu(q[h] . k_t)``;
* the query attends to the ``min(index_topk, tokens so far)`` tokens of highest score
  among those at or before its position.

Parameter names are the checkpoints' (``self_attn.indexer.wq_b``, ``.wk``, ``.k_norm``,
``.weights_proj``). Not done here: the indexer's FP8 key cache (keys are kept in
bfloat16/float16; the published code quantizes q and k per 128 channels and scores in
FP8), and prefill past ``index_topk`` tokens (which needs the indexer's mask on the dense
prefill; refused).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jax_etap import cache as kv_cache
from jax_etap.flax.attention import LATENT_NORM_EPS, MultiHeadLatentAttention
from jax_etap.flax.config import MLAConfig
from jax_etap.flax.rope import rope_cos_sin
from jax_etap.sparse import mla_decode_sparse


@dataclasses.dataclass(frozen=True)
class IndexerConfig:
    """The indexer's sizes, with DeepSeek-V3.2's config.json names (its values in brackets):
    index_n_heads [64], index_head_dim [128] (a power of two, at least qk_rope_head_dim),
    index_topk [2048]."""

    index_n_heads: int = 64
    index_head_dim: int = 128
    index_topk: int = 2048

    def __post_init__(self) -> None:
        for name in ("index_n_heads", "index_head_dim", "index_topk"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"IndexerConfig.{name} must be a positive int, got {value!r}")
        if self.index_head_dim & (self.index_head_dim - 1):
            raise ValueError(f"IndexerConfig.index_head_dim must be a power of two (the Hadamard rotation), got {self.index_head_dim}")


def hadamard(n: int) -> np.ndarray:
    """The Sylvester Hadamard matrix of order n (a power of two), entries +-1."""
    matrix = np.ones((1, 1), np.float32)
    while matrix.shape[0] < n:
        matrix = np.block([[matrix, matrix], [matrix, -matrix]])
    return matrix


def rope_halves(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotates the pairs ``(i, i + d/2)`` of ``x [..., d]`` (the indexer's non-interleaved rope)."""
    first, second = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([first * cos - second * sin, first * sin + second * cos], axis=-1)


class LightningIndexer(nnx.Module):
    """DeepSeek-V3.2's lightning indexer: its keys, queries, head weights and scores."""

    def __init__(self, config: MLAConfig, indexer: IndexerConfig, *, param_dtype=jnp.float32, rngs: nnx.Rngs):
        if config.q_lora_rank is None:
            raise ValueError("the indexer reads the query latent: MLAConfig.q_lora_rank must be set")
        if indexer.index_head_dim < config.qk_rope_head_dim:
            raise ValueError(f"index_head_dim {indexer.index_head_dim} < qk_rope_head_dim {config.qk_rope_head_dim}")
        self.config, self.sizes = config, indexer
        heads, dim = indexer.index_n_heads, indexer.index_head_dim
        linear = lambda n_in, n_out: nnx.Linear(n_in, n_out, use_bias=False, param_dtype=param_dtype, rngs=rngs)  # noqa: E731
        self.wq_b = linear(config.q_lora_rank, heads * dim)
        self.wk = linear(config.hidden_size, dim)
        self.k_norm = nnx.LayerNorm(dim, epsilon=LATENT_NORM_EPS, param_dtype=param_dtype, rngs=rngs)
        self.weights_proj = linear(config.hidden_size, heads)

    def _rotate(self, x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
        """Rope on the first qk_rope_head_dim channels, then the scaled Hadamard rotation."""
        rope = self.config.qk_rope_head_dim
        x = jnp.concatenate([rope_halves(x[..., :rope], cos, sin), x[..., rope:]], axis=-1)
        dim = self.sizes.index_head_dim
        return x @ jnp.asarray(hadamard(dim) * dim**-0.5, x.dtype)

    def keys(self, x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
        """The indexer keys ``[b, s, index_head_dim]`` of tokens ``x [b, s, hidden]``."""
        return self._rotate(self.k_norm(self.wk(x)), cos, sin)

    def queries(self, x: jax.Array, qr: jax.Array, cos: jax.Array, sin: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(queries ``[b, s, H, D]``, head weights ``[b, s, H]`` with both scales folded in)."""
        heads, dim = self.sizes.index_n_heads, self.sizes.index_head_dim
        q = self.wq_b(qr).reshape(*qr.shape[:2], heads, dim)
        weights = self.weights_proj(x) * (heads**-0.5 * dim**-0.5)
        return self._rotate(q, cos[:, :, None], sin[:, :, None]), weights


def index_scores(q: jax.Array, weights: jax.Array, keys: jax.Array) -> jax.Array:
    """``sum_h weights[b, s, h] * relu(q[b, s, h] . keys[b, t])`` ``[b, s, t]`` in float32."""
    dots = jnp.einsum("bshd,btd->bsht", q.astype(jnp.float32), keys.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)
    return jnp.einsum("bsh,bsht->bst", weights.astype(jnp.float32), jax.nn.relu(dots), precision=jax.lax.Precision.HIGHEST)


def select_top_k(scores: jax.Array, visible: jax.Array, k: int) -> jax.Array:
    """Positions ``[b, s, k]`` of the k highest scores among the visible ones (-1 past the
    visible count), by `jax.lax.top_k`."""
    _, positions = jax.lax.top_k(jnp.where(visible, scores, -jnp.inf), k)
    return jnp.where(jnp.take_along_axis(visible, positions, axis=-1), positions, -1)


class DeepseekV32Attention(MultiHeadLatentAttention):
    """DeepSeek-V3.2 attention over a latent cache and the indexer's key cache.

    Submodules: those of `MultiHeadLatentAttention` (q_lora_rank must be set) and
    ``indexer`` (`LightningIndexer`). The caches: `init_cache` (the latent rows) and
    `init_index_cache` (the indexer keys), created with the same batch, max_seqlen and
    block_size, so that token t of a sequence lies at the same slot of both.
    """

    def __init__(self, config: MLAConfig, indexer: IndexerConfig = IndexerConfig(), *, param_dtype=jnp.float32, rngs: nnx.Rngs):
        super().__init__(config, param_dtype=param_dtype, rngs=rngs)
        self.indexer = LightningIndexer(config, indexer, param_dtype=param_dtype, rngs=rngs)

    def init_index_cache(self, batch: int, max_seqlen: int, *, block_size: int = 64, dtype=jnp.bfloat16) -> kv_cache.PagedKVCache:
        """An empty indexer key cache (one row of index_head_dim channels a token)."""
        return kv_cache.create_cache(batch, max_seqlen, block_size=block_size, h_kv=1,
                                     head_dim=self.indexer.sizes.index_head_dim, dtype=dtype)

    def _query_latent(self, x: jax.Array) -> jax.Array:
        return self.q_a_layernorm(self.q_a_proj(x))

    def _check_index_cache(self, cache: kv_cache.PagedKVCache, index_cache: kv_cache.PagedKVCache) -> None:
        if not isinstance(index_cache, kv_cache.PagedKVCache):
            raise TypeError(f"index_cache must be a jax_etap.cache.PagedKVCache, got {type(index_cache).__name__}")
        expected = (cache.block_table.shape, cache.block_size, 1, self.indexer.sizes.index_head_dim)
        got = (index_cache.block_table.shape, index_cache.block_size, *index_cache.pages.shape[2:])
        if got != expected:
            raise ValueError(f"index_cache must match cache (block_table {cache.block_table.shape}, block_size "
                             f"{cache.block_size}) with rows of {expected[-1]} channels; got {got} (use init_index_cache)")

    def prefill(self, x, lengths, cache, index_cache):  # noqa: D417 - documented below
        """`MultiHeadLatentAttention.prefill` (dense causal attention), also filling the
        indexer's key cache. Exact while a prompt has at most index_topk tokens (each
        query's top-k is then every token before it); longer prompts are refused.

        Returns ``(out, cache, index_cache)``.
        """
        self._check_index_cache(cache, index_cache)
        if x.shape[1] > self.indexer.sizes.index_topk:
            raise NotImplementedError(
                f"prefill of {x.shape[1]} tokens > index_topk = {self.indexer.sizes.index_topk}: the indexer's "
                "top-k mask on the dense prefill is not built; prefill at most index_topk tokens, then decode")
        out, cache = super().prefill(x, lengths, cache)
        lengths = jnp.asarray(lengths)
        batch, s, _ = x.shape
        cos, sin = rope_cos_sin(jnp.broadcast_to(jnp.arange(s), (batch, s)), self.config)
        keys = self.indexer.keys(x, cos, sin).astype(index_cache.pages.dtype)
        index_cache = kv_cache.reset(index_cache, lengths > 0)
        return out, cache, kv_cache.append(index_cache, keys[:, :, None, :], lengths)

    def decode(self, x, cache, index_cache, *, implementation: str | None = None):  # noqa: D417 - documented below
        """Appends ``x``'s tokens ``[batch, s_new, hidden]`` to both caches; each attends to
        the index_topk tokens its indexer scores highest among those at or before it.

        implementation: passed to `jax_etap.mla_decode_sparse`. An overflowed sequence
        (see `jax_etap.cache`) has NaN outputs. Returns ``(out, cache, index_cache)``.
        """
        self._check_inputs(x, cache)
        self._check_index_cache(cache, index_cache)
        config, sizes = self.config, self.indexer.sizes
        heads, nope, rank = config.num_attention_heads, config.qk_nope_head_dim, config.kv_lora_rank
        s_new = x.shape[1]
        start = jnp.clip(cache.seqlens, 0, cache.capacity)
        positions = start[:, None] + jnp.arange(s_new)
        cos, sin = rope_cos_sin(positions, config)
        q_nope, q_pe = self._queries(x, cos, sin)
        cache = kv_cache.append(cache, self._latent_rows(x, cos, sin)[:, :, None, :])
        index_cache = kv_cache.append(index_cache, self.indexer.keys(x, cos, sin).astype(index_cache.pages.dtype)[:, :, None, :])

        # Score every slot of each sequence; a query sees the slots at or before its position.
        block = cache.block_size
        keys = index_cache.pages[index_cache.block_table].reshape(cache.batch, cache.capacity, -1)
        q_index, weights = self.indexer.queries(x, self._query_latent(x), cos, sin)
        slot = jnp.arange(cache.capacity)
        visible = slot[None, None, :] <= jnp.minimum(positions, cache.capacity - 1)[:, :, None]
        top = select_top_k(index_scores(q_index, weights, keys), visible, min(sizes.index_topk, cache.capacity))
        flat = cache.block_table[jnp.arange(cache.batch)[:, None, None], jnp.maximum(top, 0) // block] * block + top % block
        num_tokens = cache.pages.shape[0] * block
        # An overflowed sequence names a token that is not there: mla_decode_sparse makes it NaN.
        indices = jnp.where(top < 0, -1, jnp.where(cache.overflowed[:, None, None], num_tokens, flat)).astype(jnp.int32)

        w_kv = self.kv_b_proj.kernel[...].reshape(rank, heads, nope + config.v_head_dim)
        w_uk, w_uv = w_kv[..., :nope], w_kv[..., nope:]
        q = jnp.concatenate([jnp.einsum("bshn,rhn->bshr", q_nope, w_uk), q_pe], axis=-1).astype(cache.pages.dtype)
        out, _ = mla_decode_sparse(q, cache.pages, indices, head_dim_v=rank, softmax_scale=config.softmax_scale,
                                   implementation=implementation)
        out = jnp.einsum("bshr,rhv->bshv", out.astype(w_uv.dtype), w_uv).reshape(*x.shape[:2], -1)
        return self.o_proj(out), cache, index_cache
