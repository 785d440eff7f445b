"""`mla_decode_sparse` on the dense decode kernels: the selected cache rows gathered by XLA
into a paged cache of their own, then `jax_etap.mla_decode`.

Query row (b, i) becomes a sequence of its own (``b * s_q + i``, one query position, all
heads) whose keys are the tokens it selects, valid entries first in their order (a stable
sort moves the skipped ones to the end, past the sequence's length). Its rows are laid out
as blocks of 64 (the Hopper kernels' page size; topk padded up to a multiple of 64), so the
same kernels that decode a paged cache run it, with causal off. What this costs: the
selected rows are read once by the gather and written as bf16 or fp16
(``batch * s_q * topk * d_qk`` elements, FP8 rows dequantized there), then read by the
kernel: about three times the bytes of a kernel that gathers for itself, and that much
temporary memory. It is the CUDA path until such a kernel exists.

The semantics are `sparse_reference`'s, entry by entry: -1 and entries past
``topk_length`` select nothing; a used entry outside the cache makes its query row NaN
(the row's first block-table entry is set to -1, which `mla_decode` never reads and
answers with NaN; the row is given one key so that the entry is looked at); a row that
selects nothing has out 0 and lse -inf; the sink scales out afterwards.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jax_etap._sparse_checks import SparseShape
from jax_etap.api import mla_decode
from jax_etap.fp8 import as_decode_cache
from jax_etap.sparse_reference import apply_sink, selected_tokens

BLOCK_SIZE = 64  # keys per block of the gathered cache: one 64-key tile of the kernels


def gathered_decode(
    q: jax.Array,
    kv_cache: jax.Array,
    indices: jax.Array,
    topk_length: jax.Array | None,
    attn_sink: jax.Array | None,
    shape: SparseShape,
    implementation: str | None,
) -> tuple[jax.Array, jax.Array]:
    """`mla_decode_sparse` for validated arguments (their sizes in ``shape``), computed by
    `mla_decode` with ``implementation`` on the gathered rows; see the module docstring."""
    rows = shape.batch * shape.s_q
    valid, bad_row = selected_tokens(indices, topk_length, shape.num_tokens)
    bad_row = bad_row.reshape(rows)
    # Whole blocks (at least one, for topk 0): the padding selects nothing.
    blocks = max(1, -(-shape.topk // BLOCK_SIZE))
    padding = ((0, 0), (0, blocks * BLOCK_SIZE - shape.topk))
    valid = jnp.pad(valid.reshape(rows, shape.topk), padding)
    tokens = jnp.pad(jnp.where(valid[:, : shape.topk], indices.reshape(rows, shape.topk), 0), padding)
    # Valid entries first, in their order; the rest point at token 0 and lie past the length.
    tokens = jnp.take_along_axis(tokens, jnp.argsort(~valid, axis=-1, stable=True), axis=-1)
    lengths = jnp.sum(valid, axis=-1, dtype=jnp.int32)

    flat_cache = kv_cache.reshape(shape.num_tokens, kv_cache.shape[-1])
    selected = as_decode_cache(flat_cache[tokens], q.dtype)  # [rows, blocks * 64, d_qk]
    pages = selected.reshape(rows * blocks, BLOCK_SIZE, 1, shape.d_qk)
    block_table = jnp.arange(rows * blocks, dtype=jnp.int32).reshape(rows, blocks)
    block_table = block_table.at[:, 0].set(jnp.where(bad_row, -1, block_table[:, 0]))
    lengths = jnp.where(bad_row, jnp.maximum(lengths, 1), lengths)

    out, lse = mla_decode(
        q.reshape(rows, 1, shape.h_q, shape.d_qk), pages, lengths, block_table,
        head_dim_v=shape.head_dim_v, softmax_scale=shape.softmax_scale, causal=False,
        implementation=implementation,
    )
    out = out.reshape(shape.batch, shape.s_q, shape.h_q, shape.head_dim_v)
    lse = lse.reshape(shape.batch, shape.s_q, shape.h_q)  # [rows, h_q, 1] -> [batch, s_q, h_q]
    out = apply_sink(out, lse, attn_sink)
    return out, jnp.transpose(lse, (0, 2, 1))
