"""`MultiHeadLatentAttention`: DeepSeek-V3's attention layer as a flax.nnx module.

Prefill runs the plain formulation: the latent is expanded into per-head keys and values
by kv_b_proj and the prompt attends causally to itself. Decode runs the absorbed one:
W_UK (kv_b_proj's key half) is folded into the query and W_UV (its value half) applied to
the attention output, so every head attends directly over the cached latent rows
``[kv_a_layernorm(latent), rope(k_pe)]`` through `jax_etap.mla_decode`.

With an FP8 cache (``init_cache(..., dtype="fp8")``) the rows are stored quantized
(`jax_etap.fp8`) and decode attends over them dequantized. Prefill attends over the
prompt's rows as computed, unquantized: it never reads the cache (its keys and values are
kv_b_proj's expansion of the fresh latent), so quantizing the rows only to read them back
would add error and save nothing. A prompt's outputs are therefore the same with either
cache; the FP8 rows are what every later decode step attends over.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jax_etap import cache as kv_cache
from jax_etap import fp8
from jax_etap._checks import MAX_HEAD_DIM
from jax_etap.api import mla_decode
from jax_etap.flax.config import MLAConfig
from jax_etap.flax.rope import apply_rope, rope_cos_sin

# DeepSeek's q_a_layernorm and kv_a_layernorm use this epsilon, not config.rms_norm_eps
# (in every released reference implementation).
LATENT_NORM_EPS = 1e-6


class MultiHeadLatentAttention(nnx.Module):
    """DeepSeek-V3 multi-head latent attention over a `jax_etap.cache.PagedKVCache`.

    Submodules carry the checkpoints' names: ``q_a_proj``, ``q_a_layernorm``, ``q_b_proj``
    (or ``q_proj`` when ``q_lora_rank`` is None), ``kv_a_proj_with_mqa``,
    ``kv_a_layernorm``, ``kv_b_proj``, ``o_proj``; `jax_etap.flax.load_deepseek_weights`
    fills them from a checkpoint's arrays. Linear kernels are ``[in, out]`` (flax's layout,
    the transpose of the checkpoints').

    The cache holds one row of ``kv_lora_rank + qk_rope_head_dim`` channels per token; for
    `mla_decode` that width must be a multiple of 64 up to 576 (576 for V3).

    fp8_query_dtype: the dtype decode computes the attention in from an FP8 cache
    (bfloat16, DeepSeek-V3.2's, or float16): the absorbed queries are rounded to it and the
    cache dequantized to it. A bfloat16 or float16 cache computes in its own dtype.
    """

    def __init__(self, config: MLAConfig, *, param_dtype=jnp.float32, fp8_query_dtype=jnp.bfloat16, rngs: nnx.Rngs):
        if config.latent_dim % 64 or config.latent_dim > MAX_HEAD_DIM:
            raise ValueError(
                f"kv_lora_rank + qk_rope_head_dim = {config.latent_dim} must be a multiple of 64 up to "
                f"{MAX_HEAD_DIM} (the width of a cache row that mla_decode reads)"
            )
        if jnp.dtype(fp8_query_dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
            raise ValueError(f"fp8_query_dtype must be bfloat16 or float16, got {jnp.dtype(fp8_query_dtype).name}")
        self.config = config
        self.fp8_query_dtype = jnp.dtype(fp8_query_dtype)
        heads, bias = config.num_attention_heads, config.attention_bias
        linear = lambda n_in, n_out, use_bias: nnx.Linear(  # noqa: E731
            n_in, n_out, use_bias=use_bias, param_dtype=param_dtype, rngs=rngs)
        if config.q_lora_rank is None:
            self.q_proj = linear(config.hidden_size, heads * config.qk_head_dim, False)
        else:
            self.q_a_proj = linear(config.hidden_size, config.q_lora_rank, bias)
            self.q_a_layernorm = nnx.RMSNorm(config.q_lora_rank, epsilon=LATENT_NORM_EPS, param_dtype=param_dtype, rngs=rngs)
            self.q_b_proj = linear(config.q_lora_rank, heads * config.qk_head_dim, False)
        self.kv_a_proj_with_mqa = linear(config.hidden_size, config.latent_dim, bias)
        self.kv_a_layernorm = nnx.RMSNorm(config.kv_lora_rank, epsilon=LATENT_NORM_EPS, param_dtype=param_dtype, rngs=rngs)
        self.kv_b_proj = linear(config.kv_lora_rank, heads * (config.qk_nope_head_dim + config.v_head_dim), False)
        self.o_proj = linear(heads * config.v_head_dim, config.hidden_size, bias)

    def init_cache(self, batch: int, max_seqlen: int, *, block_size: int = 64, dtype=jnp.bfloat16) -> kv_cache.PagedKVCache:
        """An empty latent cache for this layer (see `jax_etap.cache.create_cache`).

        dtype: bfloat16 or float16, what `mla_decode` reads, or ``"fp8"``: the FP8 latent
          cache (`jax_etap.fp8`, 656 bytes a token), for layers whose rows are 576 wide
          (kv_lora_rank 512 + qk_rope_head_dim 64, as in DeepSeek-V3).
        """
        return kv_cache.create_cache(batch, max_seqlen, block_size=block_size, h_kv=1,
                                     head_dim=self.config.latent_dim, dtype=dtype)

    def _queries(self, x: jax.Array, cos: jax.Array, sin: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(q_nope ``[b, s, h, qk_nope_head_dim]``, rotated q_pe ``[b, s, h, qk_rope_head_dim]``)."""
        config = self.config
        if config.q_lora_rank is None:
            q = self.q_proj(x)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q = q.reshape(*x.shape[:2], config.num_attention_heads, config.qk_head_dim)
        q_nope, q_pe = jnp.split(q, [config.qk_nope_head_dim], axis=-1)
        return q_nope, apply_rope(q_pe, cos[:, :, None], sin[:, :, None])

    def _latent_rows(self, x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
        """The cache rows ``[b, s, latent_dim]``: normalized latent, then the rotated k_pe."""
        latent, k_pe = jnp.split(self.kv_a_proj_with_mqa(x), [self.config.kv_lora_rank], axis=-1)
        return jnp.concatenate([self.kv_a_layernorm(latent), apply_rope(k_pe, cos, sin)], axis=-1)

    def _check_inputs(self, x: jax.Array, cache: kv_cache.PagedKVCache) -> None:
        config = self.config
        if not isinstance(cache, kv_cache.PagedKVCache):
            raise TypeError(f"cache must be a jax_etap.cache.PagedKVCache, got {type(cache).__name__}")
        if x.ndim != 3 or x.shape[0] != cache.batch or x.shape[2] != config.hidden_size:
            raise ValueError(
                f"x must have shape [batch={cache.batch}, tokens, hidden_size={config.hidden_size}], got {tuple(x.shape)}")
        if cache.is_fp8 and config.latent_dim != fp8.HEAD_DIM:
            raise ValueError(
                f"cache is an FP8 cache (uint8 pages, rows of {fp8.HEAD_DIM} channels), but this layer's rows have "
                f"kv_lora_rank + qk_rope_head_dim = {config.latent_dim} channels")
        if cache.pages.shape[2] != 1 or cache.head_dim != config.latent_dim:
            raise ValueError(
                f"cache.pages must be [num_blocks, block_size, 1, {config.latent_dim}] for this layer, "
                f"got {tuple(cache.pages.shape)} (use init_cache)")

    def prefill(self, x: jax.Array, lengths: jax.Array, cache: kv_cache.PagedKVCache) -> tuple[jax.Array, kv_cache.PagedKVCache]:
        """Causal attention of right-padded prompts over themselves; their latent rows go
        into the cache.

        Args:
          x: ``[batch, s, hidden_size]``, the prompts' hidden states at positions 0..s-1.
          lengths: ``[batch]`` int32, the real tokens of each prompt. A sequence with
            length > 0 is reset and its cache then holds exactly its prompt; a sequence
            with length 0 is left untouched (so one slot can be refilled while the others
            keep decoding). A prompt longer than the cache's capacity marks its sequence
            overflowed: its later decode outputs are NaN (see `jax_etap.cache`).
          cache: this layer's cache. The prompt attends over its rows as computed (float32
            here); they are rounded or, for an FP8 cache, quantized as they are written.

        Returns:
          ``(out [batch, s, hidden_size], cache)``. Rows at or past a prompt's length are
          padding: finite, but meaningless.
        """
        self._check_inputs(x, cache)
        lengths = jnp.asarray(lengths)
        if lengths.shape != (cache.batch,) or not jnp.issubdtype(lengths.dtype, jnp.integer):
            raise ValueError(f"lengths must be integers of shape [batch={cache.batch}], got {lengths.dtype} {lengths.shape}")
        config = self.config
        batch, s, _ = x.shape
        cos, sin = rope_cos_sin(jnp.broadcast_to(jnp.arange(s), (batch, s)), config)
        q_nope, q_pe = self._queries(x, cos, sin)
        rows = self._latent_rows(x, cos, sin)
        latent, k_pe = jnp.split(rows, [config.kv_lora_rank], axis=-1)

        kv = self.kv_b_proj(latent).reshape(batch, s, config.num_attention_heads, -1)
        k_nope, v = jnp.split(kv, [config.qk_nope_head_dim], axis=-1)
        scores = jnp.einsum("bqhd,bkhd->bhqk", q_nope, k_nope) + jnp.einsum("bqhd,bkd->bhqk", q_pe, k_pe)
        # Causal is enough: a real query (i < length) only sees real keys (j <= i).
        causal = jnp.arange(s)[:, None] >= jnp.arange(s)[None, :]
        scores = jnp.where(causal, scores.astype(jnp.float32) * config.softmax_scale, -jnp.inf)
        probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
        out = jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(batch, s, -1)

        cache = kv_cache.reset(cache, lengths > 0)
        cache = kv_cache.append(cache, rows[:, :, None, :], lengths)
        return self.o_proj(out), cache

    def decode(
        self, x: jax.Array, cache: kv_cache.PagedKVCache, *, implementation: str | None = None
    ) -> tuple[jax.Array, kv_cache.PagedKVCache]:
        """Appends ``x``'s tokens to each sequence and attends over the whole sequence.

        Args:
          x: ``[batch, s_new, hidden_size]``, the next s_new tokens of every sequence
            (s_new = 1 for plain decoding), at positions ``cache.seqlens ..``; they attend
            causally.
          cache: this layer's cache. The queries are rounded to its dtype, or for an FP8
            cache to ``fp8_query_dtype``, and attend over its rows (dequantized).
          implementation: passed to `jax_etap.mla_decode` (None: the CUDA kernel on a
            GPU, the jnp reference elsewhere; "xla": always the reference).

        Returns:
          ``(out [batch, s_new, hidden_size], cache)`` with ``cache.seqlens`` advanced by
          s_new. A sequence whose tokens no longer fit is marked overflowed (see
          `jax_etap.cache`): its out is NaN from that step until it is prefilled again.
        """
        self._check_inputs(x, cache)
        config = self.config
        heads, nope, rank = config.num_attention_heads, config.qk_nope_head_dim, config.kv_lora_rank
        positions = jnp.clip(cache.seqlens, 0, cache.capacity)[:, None] + jnp.arange(x.shape[1])
        cos, sin = rope_cos_sin(positions, config)
        q_nope, q_pe = self._queries(x, cos, sin)
        cache = kv_cache.append(cache, self._latent_rows(x, cos, sin)[:, :, None, :])

        w_kv = self.kv_b_proj.kernel[...].reshape(rank, heads, nope + config.v_head_dim)
        w_uk, w_uv = w_kv[..., :nope], w_kv[..., nope:]
        # q_nope . (W_UK latent) == (W_UK^T q_nope) . latent: heads score the latent directly.
        q_latent = jnp.einsum("bshn,rhn->bshr", q_nope, w_uk)
        query_dtype = self.fp8_query_dtype if cache.is_fp8 else cache.pages.dtype
        q = jnp.concatenate([q_latent, q_pe], axis=-1).astype(query_dtype)
        # decode_block_table: an overflowed sequence's outputs are NaN, not silently wrong.
        out, _ = mla_decode(q, cache.pages, cache.seqlens, cache.decode_block_table, head_dim_v=rank,
                            softmax_scale=config.softmax_scale, causal=True, implementation=implementation)
        out = jnp.einsum("bshr,rhv->bshv", out.astype(w_uv.dtype), w_uv).reshape(*x.shape[:2], -1)
        return self.o_proj(out), cache
