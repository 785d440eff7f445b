"""A paged KV cache as a pytree, with the pure functions a decoding loop needs.

`PagedKVCache` holds the three arrays `jax_etap.mla_decode` reads, ``pages``
``[num_blocks, block_size, h_kv, d]``, ``block_table`` ``[batch, max_blocks]`` and
``seqlens`` ``[batch]``, and an ``overflowed`` ``[batch]`` mark. Token t of sequence b lives at
``pages[block_table[b, t // block_size], t % block_size]``.

Allocation is static: `create_cache` gives sequence b the contiguous blocks
``b * max_blocks .. (b + 1) * max_blocks - 1``, so every sequence (a batch slot) owns
``capacity = max_blocks * block_size`` token slots for the cache's whole life. Freeing a
slot (`reset`) sets its length to 0 and the next tokens written to it reuse its blocks;
no free list is needed and no shape ever changes, so the functions work unchanged inside
``jit``, ``lax.scan`` and ``lax.while_loop``. Each returns a new cache; under
``jax.jit(..., donate_argnums=...)`` XLA updates the pages in place.

FP8: ``create_cache(..., dtype="fp8")`` gives the FP8 latent cache of `jax_etap.fp8`,
uint8 pages ``[num_blocks, block_size, 1, 656]`` of DeepSeek-V3.2's 656-byte tokens, 1.76x
fewer bytes than bfloat16. `append` still takes rows of 576 channels and quantizes them
with `jax_etap.fp8.quantize`; `jax_etap.mla_decode` reads the pages as they are.

Overflow: a compiled program cannot raise, so a token that would land at or past a
sequence's capacity is dropped, that sequence's length saturates at capacity, and the
sequence is marked: ``overflowed[b]`` is set until `reset` frees it. Decoding reads
`PagedKVCache.decode_block_table`, whose first entry for a marked sequence is out of
range, so `jax_etap.mla_decode` makes every later output of that sequence NaN (its
convention for a bad block) rather than silently attending over a cache that lost
tokens. Call the host-side `check_capacity` before a generation loop to get an error
instead.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jax_etap import fp8
from jax_etap._describe import describe

FP8 = "fp8"  # create_cache's dtype for the FP8 latent cache (jax_etap.fp8)


@functools.partial(
    jax.tree_util.register_dataclass, data_fields=["pages", "block_table", "seqlens", "overflowed"], meta_fields=[]
)
@dataclasses.dataclass(frozen=True)
class PagedKVCache:
    """A paged KV cache: ``pages`` ``[num_blocks, block_size, h_kv, d]``, ``block_table``
    ``[batch, max_blocks]`` int32 (block indices into ``pages``), ``seqlens`` ``[batch]``
    int32 (valid tokens per sequence), ``overflowed`` ``[batch]`` bool (an append dropped
    tokens of the sequence since it was last reset; all False when not given). A pytree
    of its four arrays."""

    pages: jax.Array
    block_table: jax.Array
    seqlens: jax.Array
    overflowed: jax.Array | None = None

    def __post_init__(self):
        if self.overflowed is None and hasattr(self.block_table, "shape"):
            object.__setattr__(self, "overflowed", jnp.zeros(self.block_table.shape[:1], bool))

    @property
    def batch(self) -> int:
        return self.block_table.shape[0]

    @property
    def block_size(self) -> int:
        return self.pages.shape[1]

    @property
    def is_fp8(self) -> bool:
        """Whether this is an FP8 latent cache (uint8 pages of `jax_etap.fp8` tokens)."""
        return fp8.is_fp8_cache(self.pages)

    @property
    def head_dim(self) -> int:
        """Width of the rows `append` takes: 576 for an FP8 cache (its pages hold the
        656-byte tokens they are quantized to), the pages' last dimension otherwise."""
        return fp8.HEAD_DIM if self.is_fp8 else self.pages.shape[-1]

    @property
    def capacity(self) -> int:
        """Tokens each sequence can hold: ``max_blocks * block_size``."""
        return self.block_table.shape[1] * self.pages.shape[1]

    @property
    def decode_block_table(self) -> jax.Array:
        """The block table to decode with: ``block_table`` with its first entry -1 for
        every overflowed sequence, so that `jax_etap.mla_decode` returns NaN for all its
        outputs (an overflowed sequence holds ``capacity`` > 0 tokens, so that block is
        used)."""
        first = jnp.where(self.overflowed[:, None], -1, self.block_table[:, :1])
        return jnp.concatenate([first, self.block_table[:, 1:]], axis=1)


def create_cache(
    batch: int,
    max_seqlen: int,
    *,
    block_size: int = 64,
    h_kv: int = 1,
    head_dim: int = 576,
    dtype=jnp.bfloat16,
) -> PagedKVCache:
    """An empty cache in which each of ``batch`` sequences can hold ``max_seqlen`` tokens.

    Sequence b owns blocks ``b * max_blocks .. (b + 1) * max_blocks - 1`` with
    ``max_blocks = ceil(max_seqlen / block_size)``, so its capacity is ``max_seqlen``
    rounded up to whole blocks. Pages start as zeros and all lengths as 0.

    dtype: the pages' dtype (bfloat16 or float16 for `jax_etap.mla_decode`), or ``"fp8"``:
      the FP8 latent cache, uint8 pages ``[num_blocks, block_size, 1, 656]`` of
      `jax_etap.fp8` tokens, for rows of ``h_kv = 1`` and ``head_dim = 576`` (`append`
      quantizes them). A uint8 or float8 dtype is an error: those are not the FP8 layout.
    """
    for name, value in (("batch", batch), ("max_seqlen", max_seqlen), ("block_size", block_size),
                        ("h_kv", h_kv), ("head_dim", head_dim)):
        if not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"create_cache: {name} must be a positive int, got {value!r}")
    page_dtype, page_width = _page_layout(dtype, h_kv, head_dim)
    max_blocks = -(-max_seqlen // block_size)
    return PagedKVCache(
        pages=jnp.zeros((batch * max_blocks, block_size, h_kv, page_width), page_dtype),
        block_table=jnp.arange(batch * max_blocks, dtype=jnp.int32).reshape(batch, max_blocks),
        seqlens=jnp.zeros((batch,), jnp.int32),
        overflowed=jnp.zeros((batch,), bool),
    )


def _page_layout(dtype, h_kv: int, head_dim: int) -> tuple[jnp.dtype, int]:
    """(dtype, last dimension) of create_cache's pages."""
    if isinstance(dtype, str) and dtype == FP8:
        if (h_kv, head_dim) != (1, fp8.HEAD_DIM):
            raise ValueError(
                f"create_cache: dtype='fp8' holds rows of one KV head and {fp8.HEAD_DIM} channels (jax_etap.fp8), "
                f"so h_kv must be 1 and head_dim {fp8.HEAD_DIM}, got h_kv={h_kv}, head_dim={head_dim}")
        return jnp.dtype(jnp.uint8), fp8.BYTES_PER_TOKEN
    try:
        page_dtype = jnp.dtype(dtype)
    except TypeError:
        raise TypeError(f"create_cache: dtype must be a floating dtype or 'fp8', got {dtype!r}") from None
    if not jnp.issubdtype(page_dtype, jnp.floating) or page_dtype.itemsize == 1:
        raise ValueError(
            f"create_cache: dtype must be a floating dtype of 2 or more bytes (bfloat16 or float16 for mla_decode), "
            f"got {page_dtype.name}; for the FP8 latent cache pass dtype='fp8'")
    return page_dtype, head_dim


def _check_cache(cache: PagedKVCache) -> None:
    if not isinstance(cache, PagedKVCache):
        raise TypeError(f"cache must be a PagedKVCache, got {type(cache).__name__}")
    shapes = {name: tuple(getattr(cache, name).shape) for name in ("pages", "block_table", "seqlens")}
    if len(shapes["pages"]) != 4 or len(shapes["block_table"]) != 2 or shapes["seqlens"] != shapes["block_table"][:1]:
        raise ValueError(
            "cache must have pages [num_blocks, block_size, h_kv, d], block_table [batch, max_blocks] "
            f"and seqlens [batch], got shapes {shapes}"
        )
    if cache.is_fp8 and shapes["pages"][2:] != (1, fp8.BYTES_PER_TOKEN):
        raise ValueError(
            f"cache.pages is uint8, an FP8 cache (jax_etap.fp8), and must be [num_blocks, block_size, 1, "
            f"{fp8.BYTES_PER_TOKEN}], got {describe(cache.pages)}")
    for name in ("block_table", "seqlens"):
        if jnp.dtype(getattr(cache, name).dtype) != jnp.int32:
            raise TypeError(f"cache.{name} must be int32, got {jnp.dtype(getattr(cache, name).dtype).name}")
    if tuple(cache.overflowed.shape) != shapes["seqlens"] or jnp.dtype(cache.overflowed.dtype) != jnp.bool_:
        raise ValueError(f"cache.overflowed must be a bool array of shape [batch], got {describe(cache.overflowed)}")


def append(cache: PagedKVCache, kv: jax.Array, num_new: jax.Array | None = None) -> PagedKVCache:
    """Writes new tokens after each sequence's current end and advances its length.

    Args:
      cache: the cache.
      kv: ``[batch, s_new, h_kv, d]``, the new tokens' cache rows (d: ``cache.head_dim``);
        rounded to the cache's dtype, or, for an FP8 cache, bfloat16, float16 or float32
        rows of 576 channels quantized by `jax_etap.fp8.quantize`. Token i of sequence b goes to position ``seqlens[b] + i``.
      num_new: ``[batch]`` integers, how many of the s_new tokens of each sequence are
        real (a batch of right-padded prompts); the rest are ignored. None: all s_new.
        Values are clamped to ``[0, s_new]``.

    Returns:
      The cache with the tokens written and ``seqlens + num_new``. Tokens that would land
      at or past a sequence's capacity are dropped, its length saturates at capacity and
      it is marked ``overflowed`` (its decode outputs are NaN until `reset`; see
      `check_capacity` for an error instead); tokens whose block-table entry lies outside
      the pool are never written.
    """
    _check_cache(cache)
    num_blocks, block_size, h_kv, _ = cache.pages.shape
    batch, d = cache.batch, cache.head_dim
    if not hasattr(kv, "shape") or len(kv.shape) != 4 or kv.shape[0] != batch or tuple(kv.shape[2:]) != (h_kv, d):
        rows = " (rows, which append quantizes to the FP8 cache's 656-byte tokens)" if cache.is_fp8 else ""
        raise ValueError(f"kv must have shape [batch={batch}, s_new, h_kv={h_kv}, d={d}]{rows}, got {describe(kv)}")
    tokens = _page_rows(cache, kv)
    s_new = kv.shape[1]
    if num_new is None:
        num_new = jnp.full((batch,), s_new, jnp.int32)
    else:
        if not hasattr(num_new, "shape") or tuple(num_new.shape) != (batch,) or not jnp.issubdtype(num_new.dtype, jnp.integer):
            raise ValueError(f"num_new must be an integer array of shape [batch={batch}], got {describe(num_new)}")
        num_new = jnp.clip(num_new.astype(jnp.int32), 0, s_new)

    capacity = cache.capacity
    seqlens = jnp.clip(cache.seqlens, 0, capacity)  # as mla_decode reads them
    step = jnp.arange(s_new, dtype=jnp.int32)[None, :]
    position = seqlens[:, None] + step  # [batch, s_new]
    last_block = cache.block_table.shape[1] - 1
    block = jnp.take_along_axis(cache.block_table, jnp.minimum(position // block_size, last_block), axis=1)
    write = (step < num_new[:, None]) & (position < capacity) & (block >= 0) & (block < num_blocks)
    # Index num_blocks is out of bounds, so mode="drop" discards exactly the unwritten
    # tokens (a negative index would instead wrap around to the end of the pool).
    block = jnp.where(write, block, num_blocks)
    pages = cache.pages.at[block, position % block_size].set(tokens, mode="drop")
    overflowed = cache.overflowed | (seqlens + num_new > capacity)
    return PagedKVCache(pages=pages, block_table=cache.block_table, seqlens=jnp.minimum(seqlens + num_new, capacity),
                        overflowed=overflowed)


def _page_rows(cache: PagedKVCache, kv: jax.Array) -> jax.Array:
    """``kv`` as the pages store it: quantized to FP8 tokens for an FP8 cache, rounded to
    the pages' dtype otherwise."""
    if not cache.is_fp8:
        return kv.astype(cache.pages.dtype)
    if jnp.dtype(kv.dtype) not in fp8.INPUT_DTYPES:
        raise TypeError(f"kv for an FP8 cache must be bfloat16, float16 or float32 rows, got {describe(kv)}")
    return fp8.quantize(kv)


def reset(cache: PagedKVCache, sequences: jax.Array) -> PagedKVCache:
    """Frees the sequences where the ``[batch]`` bool mask ``sequences`` is True.

    Their lengths become 0, their overflow marks are cleared, and their next tokens
    overwrite their own blocks from the start. The pages are not cleared: nothing past a
    sequence's length is ever read.
    """
    _check_cache(cache)
    if not hasattr(sequences, "shape") or tuple(sequences.shape) != (cache.batch,) or jnp.dtype(sequences.dtype) != jnp.bool_:
        raise ValueError(f"sequences must be a bool mask of shape [batch={cache.batch}], got {describe(sequences)}")
    return dataclasses.replace(cache, seqlens=jnp.where(sequences, 0, cache.seqlens).astype(jnp.int32),
                               overflowed=cache.overflowed & ~sequences)


def check_capacity(cache: PagedKVCache, new_tokens: int | Sequence[int] | np.ndarray) -> None:
    """Raises ValueError if appending ``new_tokens`` (one count, or one per sequence) would
    overflow a sequence.

    Host-side: it reads the cache's current lengths, so call it outside ``jit`` (e.g.
    before a generation loop), where a compiled program would silently drop the tokens.
    """
    _check_cache(cache)
    try:
        seqlens = np.clip(np.asarray(cache.seqlens, np.int64), 0, cache.capacity)
    except jax.errors.TracerArrayConversionError:
        raise TypeError("check_capacity reads concrete lengths: call it outside jax.jit") from None
    needed = seqlens + np.broadcast_to(np.asarray(new_tokens, np.int64), seqlens.shape)
    over = np.flatnonzero(needed > cache.capacity)
    if over.size:
        detail = ", ".join(f"sequence {b}: {seqlens[b]} + {needed[b] - seqlens[b]} tokens" for b in over[:8])
        more = f" (and {over.size - 8} more)" if over.size > 8 else ""
        raise ValueError(
            f"the cache holds {cache.capacity} tokens per sequence; {detail}{more} would overflow it "
            f"(create the cache with a larger max_seqlen)"
        )
