"""Test support for users of `mla_decode`, like `numpy.testing`: random paged caches and
the float64 NumPy oracle. The package's tests, benchmarks and examples use them too.

* `random_paged_cache`: a cache pool whose sequences' blocks are shuffled over the pool
  (the layout a serving loop's allocator leaves), as `mla_decode`'s paged arguments.
* `shuffled_block_table`: the block table alone, optionally with each batch shard's
  sequences confined to its slice of the pool (what a pool split over the batch needs).
* `mla_decode_numpy`: MLA decode in float64 NumPy, written from the specification alone.
  It shares no code with the rest of `jax_etap` (in particular not `jax_etap.reference`),
  loops over sequences and query positions, and does each row's products for all heads as
  float64 matrix products (np.matmul, i.e. BLAS), so it stays fast from the tests' shapes
  up to the numerics study's (16 sequences of 64K keys at 128 heads). Looping over rows
  rather than masking is deliberate: a row only ever multiplies the keys it sees, so a NaN
  or inf it does not see cannot reach it (0 * NaN would be NaN).
* `relative_error`, `to_f32`: the comparisons' two helpers.

The oracle's semantics (the specification of `jax_etap.mla_decode`):
  * K = all d_qk channels of a cache row, V = its first head_dim_v channels; query head h
    reads KV head h // (h_q // h_kv); softmax_scale None means d_qk ** -0.5.
  * L = cache_seqlens[b] clamped to [0, capacity] (capacity = s_k dense, or
    max_blocks_per_seq * block_size paged).
  * causal: query row i (of s_q) sees keys 0 .. L - s_q + i; otherwise keys 0 .. L - 1.
  * a row that sees no key: out 0, lse -inf.
  * paged: token t of sequence b is kv_cache[block_table[b, t // bs], t % bs]; if any of
    the entries block_table[b, :ceil(L / bs)] lies outside [0, num_blocks), every out and
    lse value of sequence b is NaN; later entries are never looked at.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "capacity_of",
    "clamped_seqlens",
    "mla_decode_numpy",
    "random_paged_cache",
    "relative_error",
    "shuffled_block_table",
    "to_f32",
]


def shuffled_block_table(key: jax.Array, batch: int, blocks_per_seq: int, num_blocks: int | None = None,
                         shards: int = 1) -> jax.Array:
    """An int32 [batch, blocks_per_seq] table of distinct blocks drawn at random from a pool
    of ``num_blocks`` (default: exactly batch * blocks_per_seq, so every block is used).

    ``shards``: the batch is split into that many equal shards, and shard i's sequences
    take their blocks only from the i-th equal slice of the pool, in random order.
    Pure jax, so that it can run under `jax.jit` (e.g. with ``out_shardings``).
    """
    num_blocks = batch * blocks_per_seq if num_blocks is None else num_blocks
    if batch % shards or num_blocks % shards:
        raise ValueError(f"shards={shards} must divide batch={batch} and num_blocks={num_blocks}")
    rows, part = batch // shards, num_blocks // shards
    if rows * blocks_per_seq > part:
        raise ValueError(f"a shard's {rows} sequences of {blocks_per_seq} blocks do not fit its {part} blocks")
    tables = [
        shard * part + jax.random.permutation(shard_key, part)[: rows * blocks_per_seq].reshape(rows, blocks_per_seq)
        for shard, shard_key in enumerate(jax.random.split(key, shards))
    ]
    return jnp.concatenate(tables).astype(jnp.int32)


def random_paged_cache(key: jax.Array, batch: int, seqlen: int, *, block_size: int = 64, h_kv: int = 1,
                       d_qk: int = 576, dtype=jnp.bfloat16, spare_blocks: int = 0, ragged: bool = False,
                       shards: int = 1) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(kv_cache, cache_seqlens, block_table)`` for `jax_etap.mla_decode`: an N(0, 1) pool
    of ``dtype`` [num_blocks, block_size, h_kv, d_qk], room for ``seqlen`` tokens a sequence
    in blocks shuffled over the pool (`shuffled_block_table`, with ``shards``), and
    ``spare_blocks`` blocks per shard that no sequence references.

    cache_seqlens: ``seqlen`` for every sequence, or with ``ragged`` uniform in
    [seqlen // 2, seqlen]. Pure jax (the pool is drawn where it will live), so it can run
    under `jax.jit`.
    """
    blocks_per_seq = max(1, -(-seqlen // block_size))
    num_blocks = batch * blocks_per_seq + shards * spare_blocks
    key_kv, key_table, key_len = jax.random.split(key, 3)
    kv_cache = jax.random.normal(key_kv, (num_blocks, block_size, h_kv, d_qk), dtype)
    block_table = shuffled_block_table(key_table, batch, blocks_per_seq, num_blocks, shards)
    if ragged:
        seqlens = jax.random.randint(key_len, (batch,), seqlen // 2, seqlen + 1, jnp.int32)
    else:
        seqlens = jnp.full((batch,), seqlen, jnp.int32)
    return kv_cache, seqlens, block_table


def to_f32(x) -> np.ndarray:
    """A bf16/fp16 jax array as float32 NumPy (exact: both widen losslessly).

    Widened by NumPy (ml_dtypes) on the host: a jax ``astype`` would compile a convert
    for every new shape, which dominated the host time of loops over shapes."""
    return np.asarray(x).astype(np.float32)


def relative_error(actual, expected) -> float:
    """||actual - expected|| / ||expected||, in float64."""
    actual = np.asarray(actual, np.float64)
    expected = np.asarray(expected, np.float64)
    return float(np.linalg.norm(actual - expected) / np.linalg.norm(expected))


def capacity_of(kv_cache, block_table) -> int:
    kv_cache = np.asarray(kv_cache)
    if block_table is None:
        return int(kv_cache.shape[1])
    return int(np.asarray(block_table).shape[1] * kv_cache.shape[1])


def clamped_seqlens(cache_seqlens, kv_cache, block_table) -> np.ndarray:
    return np.clip(np.asarray(cache_seqlens, np.int64), 0, capacity_of(kv_cache, block_table))


def mla_decode_numpy(q, kv_cache, cache_seqlens, block_table=None, *, head_dim_v=512, softmax_scale=None, causal=False):
    """float64 (out [b, s_q, h_q, head_dim_v], lse [b, h_q, s_q]) from NumPy inputs.

    q and kv_cache should hold the values the implementation sees (already rounded to
    bfloat16/float16, passed e.g. as float32); they are widened to float64 here.
    """
    q = np.asarray(q, np.float64)
    kv = np.asarray(kv_cache, np.float64)
    batch, s_q, h_q, d_qk = q.shape
    h_kv = kv.shape[2]
    assert kv.shape[3] == d_qk and h_q % h_kv == 0 and head_dim_v <= d_qk
    groups = h_q // h_kv
    scale = d_qk**-0.5 if softmax_scale is None else float(softmax_scale)
    lengths = clamped_seqlens(cache_seqlens, kv, block_table)

    out = np.zeros((batch, s_q, h_q, head_dim_v), np.float64)
    lse = np.full((batch, h_q, s_q), -np.inf, np.float64)
    for b in range(batch):
        length = int(lengths[b])
        if block_table is None:
            keys = kv[b, :length]  # [L, h_kv, d]
        else:
            table = np.asarray(block_table, np.int64)
            block_size = kv.shape[1]
            used = table[b, : -(-length // block_size)]
            if np.any((used < 0) | (used >= kv.shape[0])):
                out[b] = np.nan
                lse[b] = np.nan
                continue
            # Token t: block used[t // bs], slot t % bs, i.e. the used blocks end to end.
            keys = kv[used].reshape(-1, *kv.shape[2:])[:length]
        for i in range(s_q):
            visible = length - s_q + i + 1 if causal else length
            if visible <= 0:
                continue  # out stays 0, lse -inf
            k = keys[:visible].transpose(1, 0, 2)  # [h_kv, n, d]
            qi = q[b, i].reshape(h_kv, groups, d_qk)  # head h = kv_head * groups + g
            # Non-finite inputs are part of the specification: inf - inf and 0 * inf are NaN.
            with np.errstate(invalid="ignore"):
                scores = np.matmul(qi, k.transpose(0, 2, 1)) * scale  # [h_kv, groups, n]
                m = scores.max(axis=-1, keepdims=True)
                w = np.exp(scores - m)
                z = w.sum(axis=-1)
                o = np.matmul(w, k[..., :head_dim_v]) / z[..., None]  # [h_kv, groups, dv]
            out[b, i] = o.reshape(h_q, head_dim_v)
            lse[b, :, i] = (m[..., 0] + np.log(z)).reshape(h_q)
    return out, lse
