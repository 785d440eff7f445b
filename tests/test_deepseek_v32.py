"""DeepSeek-V3.2's attention (jax_etap.flax.deepseek_v32): the lightning indexer against a
float64 NumPy oracle written from the formulas in the module's docstring (DeepSeek-V3.2-Exp's
inference code), and the layer's decode against the V3 layer's when the top-k holds every
token, and against the sparse decode of the oracle's top-k when it does not.

Broken on purpose, the tests failed: the indexer's rope pairing adjacent channels
(interleaved) failed the oracle test; the relu dropped failed it too; the visible window
one token short (slot < position) failed the all-tokens test.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jax_etap
from jax_etap.flax import MLAConfig, MultiHeadLatentAttention
from jax_etap.flax.deepseek_v32 import DeepseekV32Attention, IndexerConfig, index_scores, select_top_k
from jax_etap.flax.rope import inverse_frequencies

CONFIG = MLAConfig(hidden_size=64, num_attention_heads=4, q_lora_rank=32, kv_lora_rank=64, qk_nope_head_dim=32,
                   qk_rope_head_dim=64, v_head_dim=32, max_position_embeddings=4096)


def _layer(topk: int, seed: int = 0) -> DeepseekV32Attention:
    layer = DeepseekV32Attention(CONFIG, IndexerConfig(index_n_heads=4, index_head_dim=128, index_topk=topk), rngs=nnx.Rngs(seed))
    # k_norm's bias starts at 0 and scale at 1: draw them, so that a dropped term shows.
    rng = np.random.default_rng(seed)
    layer.indexer.k_norm.scale.set_value(jnp.asarray(rng.uniform(0.5, 1.5, 128), jnp.float32))
    layer.indexer.k_norm.bias.set_value(jnp.asarray(rng.normal(0, 0.3, 128), jnp.float32))
    return layer


def _np(v) -> np.ndarray:
    return np.asarray(v[...], np.float64)


def _oracle_rotate(x: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """Rope on the first 64 channels, pairs (i, i + 32), then H_128 / sqrt(128), H[i, j] = (-1)^popcount(i & j)."""
    angle = positions[..., None].astype(np.float64) * inverse_frequencies(CONFIG).astype(np.float64)  # [..., 32]
    while angle.ndim < x.ndim:
        angle = angle[..., None, :]
    a, b = x[..., :32], x[..., 32:64]
    rotated = np.concatenate([a * np.cos(angle) - b * np.sin(angle), a * np.sin(angle) + b * np.cos(angle), x[..., 64:]], axis=-1)
    i = np.arange(128)
    h = np.where(np.vectorize(lambda v: bin(v).count("1") % 2)(i[:, None] & i[None, :]) == 1, -1.0, 1.0)
    return rotated @ h / np.sqrt(128)


def _oracle_scores(layer, x: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """[b, s, t] float64 index scores of queries x against keys of the same tokens x."""
    idx = layer.indexer
    rms = lambda v, w: v / np.sqrt(np.mean(v**2, -1, keepdims=True) + 1e-6) * w  # noqa: E731
    qr = rms(x @ _np(layer.q_a_proj.kernel), _np(layer.q_a_layernorm.scale))
    q = _oracle_rotate((qr @ _np(idx.wq_b.kernel)).reshape(*x.shape[:2], 4, 128), positions)
    k = x @ _np(idx.wk.kernel)
    k = (k - k.mean(-1, keepdims=True)) / np.sqrt(k.var(-1, keepdims=True) + 1e-6) * _np(idx.k_norm.scale) + _np(idx.k_norm.bias)
    k = _oracle_rotate(k, positions)
    w = x @ _np(idx.weights_proj.kernel) * 4**-0.5 * 128**-0.5
    return np.einsum("bsh,bsht->bst", w, np.maximum(np.einsum("bshd,btd->bsht", q, k), 0))


def test_indexer_scores_and_top_k_match_the_oracle(rng):
    layer = _layer(topk=5)
    x = rng.standard_normal((2, 12, 64)).astype(np.float32)
    positions = np.broadcast_to(np.arange(12), (2, 12))
    cos, sin = jax_etap.flax.rope.rope_cos_sin(jnp.asarray(positions), CONFIG)
    q, w = layer.indexer.queries(jnp.asarray(x), layer._query_latent(jnp.asarray(x)), cos, sin)
    scores = np.asarray(index_scores(q, w, layer.indexer.keys(jnp.asarray(x), cos, sin)))
    expected = _oracle_scores(layer, x.astype(np.float64), positions)
    np.testing.assert_allclose(scores, expected, rtol=1e-4, atol=1e-5 * np.abs(expected).max())
    assert (expected > 0).any() and (expected == 0).any()  # relu both passes and cuts
    visible = np.arange(12)[None, None, :] <= positions[..., None]
    top = np.asarray(select_top_k(jnp.asarray(scores), jnp.asarray(visible), 5))
    for b in range(2):
        for i in range(12):
            masked = np.where(visible[b, i], expected[b, i], -np.inf)
            want = set(np.argsort(-masked, kind="stable")[: min(5, i + 1)].tolist())
            assert set(top[b, i][top[b, i] >= 0].tolist()) == want and (top[b, i] < 0).sum() == 5 - len(want)


def _run(layer, prompt, steps, batch=2, max_seqlen=64, block_size=16):
    cache = layer.init_cache(batch, max_seqlen, block_size=block_size)
    index_cache = layer.init_index_cache(batch, max_seqlen, block_size=block_size)
    lengths = jnp.full((batch,), prompt.shape[1], jnp.int32)
    _, cache, index_cache = layer.prefill(prompt, lengths, cache, index_cache)
    outs = []
    for x in steps:
        out, cache, index_cache = layer.decode(x, cache, index_cache)
        outs.append(out)
    return outs, cache, index_cache


def test_decode_with_every_token_selected_is_the_v3_layer(rng):
    """index_topk >= the tokens so far: the sparse layer attends to all of them, as V3 does."""
    layer = _layer(topk=64)
    dense = MultiHeadLatentAttention(CONFIG, rngs=nnx.Rngs(0))
    nnx.update(dense, nnx.state(layer, nnx.Not(nnx.PathContains("indexer"))))
    prompt = jnp.asarray(rng.standard_normal((2, 9, 64)), jnp.float32)
    steps = [jnp.asarray(rng.standard_normal((2, s, 64)), jnp.float32) for s in (1, 2, 1)]
    outs, _, _ = _run(layer, prompt, steps)
    cache = dense.init_cache(2, 64, block_size=16)
    _, cache = dense.prefill(prompt, jnp.full((2,), 9, jnp.int32), cache)
    for x, out in zip(steps, outs):
        expected, cache = dense.decode(x, cache)
        np.testing.assert_allclose(np.asarray(out), np.asarray(expected), rtol=2e-2, atol=2e-3)


def test_decode_attends_to_the_oracle_top_k(rng):
    """index_topk 4 of 20 tokens: the layer's output is the sparse decode of the tokens the
    oracle's scores (on the cached bfloat16 keys) rank highest, and not the dense one."""
    layer = _layer(topk=4, seed=1)
    prompt = jnp.asarray(rng.standard_normal((2, 3, 64)), jnp.float32)  # prefill at most index_topk
    middle = jnp.asarray(rng.standard_normal((2, 16, 64)), jnp.float32)
    x = jnp.asarray(rng.standard_normal((2, 1, 64)), jnp.float32)
    (_, out), cache, index_cache = _run(layer, prompt, [middle, x])
    # The oracle's scores of x's query against the keys the index cache holds.
    positions = np.full((2, 1), 19)
    keys = np.asarray(index_cache.pages[index_cache.block_table].reshape(2, 64, 128), np.float64)[:, :20]
    cos, sin = jax_etap.flax.rope.rope_cos_sin(jnp.asarray(positions), CONFIG)
    q, w = layer.indexer.queries(x, layer._query_latent(x), cos, sin)
    scores = np.einsum("bsh,bsht->bst", np.asarray(w, np.float64),
                       np.maximum(np.einsum("bshd,btd->bsht", np.asarray(q, np.float64), keys), 0))
    top = np.argsort(-scores, axis=-1, kind="stable")[..., :4]  # [2, 1, 4] positions
    table = np.asarray(cache.block_table)
    indices = jnp.asarray(table[np.arange(2)[:, None, None], top // 16] * 16 + top % 16, jnp.int32)
    config = CONFIG
    w_kv = layer.kv_b_proj.kernel[...].reshape(64, 4, 64)
    cos_pe, sin_pe = jax_etap.flax.rope.rope_cos_sin(jnp.asarray(positions), config)
    q_nope, q_pe = layer._queries(x, cos_pe, sin_pe)
    qa = jnp.concatenate([jnp.einsum("bshn,rhn->bshr", q_nope, w_kv[..., :32]), q_pe], -1).astype(cache.pages.dtype)
    o, _ = jax_etap.mla_decode_sparse(qa, cache.pages, indices, head_dim_v=64, softmax_scale=config.softmax_scale)
    expected = layer.o_proj(jnp.einsum("bshr,rhv->bshv", o.astype(jnp.float32), w_kv[..., 32:]).reshape(2, 1, -1))
    np.testing.assert_allclose(np.asarray(out), np.asarray(expected), rtol=1e-5, atol=1e-6)
    wide = _layer(topk=64, seed=1)
    (_, dense_out), _, _ = _run(wide, prompt, [middle, x])
    assert np.abs(np.asarray(out) - np.asarray(dense_out)).max() > 1e-2


def test_long_prefill_is_refused():
    layer = _layer(topk=4)
    cache, index_cache = layer.init_cache(1, 32, block_size=16), layer.init_index_cache(1, 32, block_size=16)
    with pytest.raises(NotImplementedError, match="prefill of 5 tokens > index_topk = 4"):
        layer.prefill(jnp.zeros((1, 5, 64)), jnp.asarray([5], jnp.int32), cache, index_cache)
