"""FlashMLA (deepseek-ai/FlashMLA) as a peer: its dense bf16 decode on Hopper (sm90), called
in this process on jax's arrays, shared with torch through DLPack (no copy).

A build is a torch extension module named ``flashmla_<commit7>`` or
``flashmla_<commit7>_<toolchain>`` found on ``sys.path``; each is built elsewhere from
FlashMLA's sources at that commit (none of its code is in this repository). FlashMLA has
had two dense-decode entry points, and a build exposes one of them:

- ``get_mla_metadata(cache_seqlens, s_q*h_q // h_kv, h_kv) -> [tile_scheduler_metadata,
  num_splits]``, then ``fwd_kvcache_mla(q, k_cache, None, 512, cache_seqlens, block_table,
  softmax_scale, causal, tile_scheduler_metadata, num_splits) -> [out, lse]``
  (the original interface, e.g. commit b31bfe7, 2025-03);
- ``dense_decode_fwd(q, k_cache, 512, cache_seqlens, block_table, softmax_scale, causal,
  tile_scheduler_metadata, num_splits) -> (out, lse, tile_scheduler_metadata, num_splits)``:
  given None for the last two, the call computes the metadata itself and returns it for
  reuse (the interface since late 2025, e.g. commit 9241ae3).

Per-call GPU time leaves out the scheduling metadata (its kernel,
``get_mla_metadata_kernel``). FlashMLA computes it once per decode step from
``cache_seqlens`` and reuses it in every layer of that step (its README's usage; valid while
the shapes and ``cache_seqlens`` stay the same), so a layer's call does not redo it. Here it
is computed once per cache, before any timing. What each timed call does is what a layer
does in a serving step: the split-KV kernel, the combine kernel, and the copy FlashMLA's
API makes to return lse as [b, h_q, s_q] when s_q > 1.

Out and lse come from FlashMLA's own allocations (``torch.empty`` inside its API, never a
buffer passed in). Before the checked call every free block of torch's caching allocator
is filled with NaN bytes (0xFF), and the call's out and lse must lie in that poisoned
memory (else ``measure`` raises): an element the kernels never wrote reads NaN, never a
stale answer from an earlier call on the same inputs.

Run jax with ``XLA_PYTHON_CLIENT_PREALLOCATE=false`` (or a smaller memory fraction) so that
torch finds GPU memory beside jax's.
"""

from __future__ import annotations

import importlib
import pkgutil
import re
import time
from pathlib import Path

from gpu_trace import kernel_medians_us, span_ns
from peers.torch_trace import profiled_activities

BUILD_NAME = re.compile(r"flashmla_[0-9a-f]{7}(_[a-z0-9]+)?")
HEAD_DIM = 576  # d_qk of DeepSeek's MLA: 512 latent + 64 rope
HEAD_DIM_V = 512
PAGE_SIZE = 64  # the only page size FlashMLA's dense decode takes
MIN_CALLS = 20
POISON_BYTE = 0xFF  # as bf16 (0xFFFF) and as f32 (0xFFFFFFFF): NaN


def builds() -> list[str]:
    """Names of the FlashMLA builds on ``sys.path``, sorted; [] when there are none. A
    build that is found is imported (with torch) to check it, and one that fails to
    import raises rather than being left out."""
    names = sorted(m.name for m in pkgutil.iter_modules() if BUILD_NAME.fullmatch(m.name))
    for name in names:
        load(name)
    return names


def measure(build: str, queries: list, caches: list, *, causal: bool, softmax_scale: float,
            calls: int) -> dict:
    """Time ``calls`` calls of ``build``'s dense decode, call i on ``queries[i % len]`` and
    ``caches[i % len]``.

    queries: jax arrays [b, s_q, h_q, 576] bf16 on the GPU, all of one shape.
    caches: (kv_cache [num_blocks, 64, 1, 576] bf16, cache_seqlens int32 [b],
    block_table int32 [b, max_blocks]) of jax arrays on the same GPU.

    Returns ``gpu_us``: per call, from the start of its first GPU activity to the end of
    its last, read from torch.profiler (activities launched inside the call's
    record_function range, matched by correlation id); ``kernel_us``: each kernel's median
    microseconds in a call (`gpu_trace.kernel_medians_us`); ``wall_us``: host wall time per call
    over ``calls`` back-to-back calls, synchronized at the end; ``out`` [b, s_q, h_q, 512]
    and ``lse`` [b, h_q, s_q], float32 NumPy, of ``queries[0]`` on ``caches[0]``.
    """
    if calls < MIN_CALLS:
        raise ValueError(f"calls must be >= {MIN_CALLS}, got {calls}")
    if not queries or not caches:
        raise ValueError("queries and caches must each hold at least one entry")
    torch = _torch()
    module = load(build)
    q_all = [from_jax(torch, q, f"queries[{i}]") for i, q in enumerate(queries)]
    cache_all = [_cache_from_jax(torch, c, f"caches[{i}]") for i, c in enumerate(caches)]
    _check_shapes(torch, q_all, cache_all)
    decode = Decoder(module, causal=bool(causal), softmax_scale=float(softmax_scale))
    device = q_all[0].device
    with torch.cuda.device(device):
        cudart = _Cudart(torch)
        cudart.clear()
        metas = [decode.metadata(q_all[0], cache) for cache in cache_all]
        cudart.check("computing FlashMLA's metadata")

        poisoned = _poison_free_memory(torch, cudart, q_all[0])
        out, lse = decode(q_all[0], cache_all[0], metas[0])
        for name, t in (("out", out), ("lse", lse)):
            if not inside(t.data_ptr(), t.numel() * t.element_size(), poisoned):
                raise RuntimeError(f"{build}: {name} was not allocated in poisoned memory; "
                                   "an unwritten element could not be told from a stale one")
        cudart.check("the checked call")
        b, s_q, h_q, _ = q_all[0].shape
        if tuple(out.shape) != (b, s_q, h_q, HEAD_DIM_V) or tuple(lse.shape) != (b, h_q, s_q):
            raise RuntimeError(f"{build}: out {tuple(out.shape)} / lse {tuple(lse.shape)}, expected "
                               f"{(b, s_q, h_q, HEAD_DIM_V)} / {(b, h_q, s_q)}")
        out_np = out.float().cpu().numpy()
        lse_np = lse.float().cpu().numpy()
        del out, lse

        def call(i: int):
            j = i % len(cache_all)
            return decode(q_all[i % len(q_all)], cache_all[j], metas[j])

        for i in range(max(3, len(cache_all), len(q_all))):  # warm-up: every input once
            call(i)
        cudart.check("the warm-up calls")
        activities = profiled_activities(torch, call, calls)
        gpu_us = [span_ns(group) / 1e3 for group in activities]
        cudart.check("the profiled calls")

        torch.cuda.synchronize()
        start = time.perf_counter()
        for i in range(calls):
            call(i)
        torch.cuda.synchronize()
        wall_us = (time.perf_counter() - start) / calls * 1e6
        cudart.check("the wall-timed calls")
    return dict(gpu_us=gpu_us, kernel_us=kernel_medians_us(activities), wall_us=wall_us, out=out_np, lse=lse_np)


def inside(address: int, nbytes: int, ranges: list[tuple[int, int]]) -> bool:
    """Whether [address, address + nbytes) lies within one of the (start, size) ranges."""
    return any(start <= address and address + nbytes <= start + size for start, size in ranges)


def free_blocks(snapshot: list[dict]) -> list[tuple[int, int]]:
    """(address, size) of the inactive blocks in a torch.cuda.memory_snapshot()."""
    blocks = []
    for segment in snapshot:
        address = segment["address"]
        for block in segment["blocks"]:
            if block["state"] == "inactive":
                blocks.append((block.get("address", address), block["size"]))
            address += block["size"]
    return blocks


def _torch():
    import torch  # lazily: this module imports on machines without torch

    return torch


def load(name: str):
    """The extension module ``name`` (torch first: it loads the libraries the build links)."""
    if not BUILD_NAME.fullmatch(name):
        raise ValueError(f"build must be named flashmla_<commit7>[_<toolchain>], got {name!r}")
    _torch()
    module = importlib.import_module(name)
    if not (hasattr(module, "dense_decode_fwd")
            or (hasattr(module, "fwd_kvcache_mla") and hasattr(module, "get_mla_metadata"))):
        raise ImportError(f"{name} ({module.__file__}) has neither FlashMLA dense-decode interface")
    return module


class Decoder:
    """One dense-decode call of either interface, and its metadata, for fixed flags."""

    def __init__(self, module, causal: bool, softmax_scale: float):
        self.module, self.causal, self.scale = module, causal, softmax_scale
        self.fused = hasattr(module, "dense_decode_fwd")

    def metadata(self, q, cache):
        kv, seqlens, table = cache
        if self.fused:
            _, _, tile_meta, num_splits = self.module.dense_decode_fwd(
                q, kv, HEAD_DIM_V, seqlens, table, self.scale, self.causal, None, None)
            return tile_meta, num_splits
        _, s_q, h_q, _ = q.shape
        h_kv = kv.shape[2]
        return tuple(self.module.get_mla_metadata(seqlens, s_q * h_q // h_kv, h_kv))

    def first_call(self, q, cache):
        """The first layer's call of a decode step, ``((out, lse), meta)``, with the metadata
        that the step's later layers reuse: computed by the call itself (the fused
        interface) or just before it (the original), from ``cache``'s lengths."""
        if not self.fused:
            meta = self.metadata(q, cache)
            return self(q, cache, meta), meta
        kv, seqlens, table = cache
        out, lse, tile_meta, num_splits = self.module.dense_decode_fwd(
            q, kv, HEAD_DIM_V, seqlens, table, self.scale, self.causal, None, None)
        return (out, lse), (tile_meta, num_splits)

    def __call__(self, q, cache, meta):
        kv, seqlens, table = cache
        if self.fused:
            out, lse, _, _ = self.module.dense_decode_fwd(
                q, kv, HEAD_DIM_V, seqlens, table, self.scale, self.causal, *meta)
        else:
            out, lse = self.module.fwd_kvcache_mla(
                q, kv, None, HEAD_DIM_V, seqlens, table, self.scale, self.causal, *meta)
        return out, lse


def from_jax(torch, x, name: str):
    """A torch view of the jax array ``x`` (DLPack, zero-copy; checked)."""
    x.block_until_ready()
    t = torch.from_dlpack(x)
    if not t.is_cuda:
        raise ValueError(f"{name} must be on the GPU, got {t.device}")
    if t.data_ptr() != x.unsafe_buffer_pointer():
        raise RuntimeError(f"{name}: DLPack gave a copy, not a view of jax's buffer")
    return t


def _cache_from_jax(torch, cache, name: str):
    if len(cache) != 3:
        raise ValueError(f"{name} must be (kv_cache, cache_seqlens, block_table), got {len(cache)} items")
    kv, seqlens, table = (from_jax(torch, x, f"{name}[{k}]") for k, x in enumerate(cache))
    if kv.dtype != torch.bfloat16 or kv.dim() != 4 or tuple(kv.shape[1:]) != (PAGE_SIZE, 1, HEAD_DIM):
        raise ValueError(f"{name}[0] (kv_cache) must be bfloat16 [num_blocks, {PAGE_SIZE}, 1, {HEAD_DIM}], "
                         f"got {kv.dtype} {tuple(kv.shape)}")
    if seqlens.dtype != torch.int32 or seqlens.dim() != 1:
        raise ValueError(f"{name}[1] (cache_seqlens) must be int32 [b], got {seqlens.dtype} {tuple(seqlens.shape)}")
    if table.dtype != torch.int32 or table.dim() != 2 or table.shape[0] != seqlens.shape[0]:
        raise ValueError(f"{name}[2] (block_table) must be int32 [b={seqlens.shape[0]}, max_blocks], "
                         f"got {table.dtype} {tuple(table.shape)}")
    return kv, seqlens, table


def _check_shapes(torch, q_all, cache_all) -> None:
    shape = tuple(q_all[0].shape)
    for i, q in enumerate(q_all):
        if q.dtype != torch.bfloat16:
            raise ValueError(f"queries[{i}] must be bfloat16, got {q.dtype}")
        if q.dim() != 4 or q.shape[-1] != HEAD_DIM:
            raise ValueError(f"queries[{i}] must be [b, s_q, h_q, {HEAD_DIM}], got {tuple(q.shape)}")
        if tuple(q.shape) != shape:
            raise ValueError(f"queries[{i}] has shape {tuple(q.shape)}, queries[0] {shape}: "
                             "the metadata is computed for one query shape")
    for i, (kv, seqlens, _) in enumerate(cache_all):
        if seqlens.shape[0] != shape[0]:
            raise ValueError(f"caches[{i}] holds {seqlens.shape[0]} sequences, queries have batch {shape[0]}")
        if kv.device != q_all[0].device:
            raise ValueError(f"caches[{i}] is on {kv.device}, queries on {q_all[0].device}")


class _Cudart:
    """The CUDA runtime torch loaded, which the builds link by the same soname, so it is the
    instance their launches report to: its error check and memset, which torch does not
    expose."""

    def __init__(self, torch):
        import ctypes

        soname = f"libcudart.so.{torch.version.cuda.split('.')[0]}"
        if soname not in Path("/proc/self/maps").read_text():
            raise RuntimeError(f"torch has not loaded {soname} into this process")
        self.lib = ctypes.CDLL(soname)  # the loaded one: dlopen matches sonames already in the process
        self.lib.cudaGetErrorString.restype = ctypes.c_char_p
        self.lib.cudaMemsetAsync.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t, ctypes.c_void_p]
        self.torch = torch

    def clear(self) -> None:
        """Forget an error recorded before this measurement (not ours to report)."""
        self.lib.cudaGetLastError()

    def check(self, what: str) -> None:
        self.torch.cuda.synchronize()  # raises on an asynchronous error
        code = self.lib.cudaGetLastError()  # a launch that failed (e.g. bad configuration)
        if code != 0:
            raise RuntimeError(f"CUDA error {code} in {what}: {self.lib.cudaGetErrorString(code).decode()}")

    def memset(self, address: int, value: int, nbytes: int) -> None:
        stream = self.torch.cuda.current_stream().cuda_stream
        code = self.lib.cudaMemsetAsync(address, value, nbytes, stream)
        if code != 0:
            raise RuntimeError(f"cudaMemsetAsync failed: {self.lib.cudaGetErrorString(code).decode()}")


def _poison_free_memory(torch, cudart: _Cudart, q) -> list[tuple[int, int]]:
    """Fill every free block of torch's caching allocator with POISON_BYTE, after growing the
    pools so that FlashMLA's allocations of one call fit in them; returns the blocks."""
    b, s_q, h_q, _ = q.shape
    # out, lse and the split accumulators ([b + num_sm_parts, h_q*s_q, 512] f32; parts <= SMs)
    parts = torch.cuda.get_device_properties(q.device).multi_processor_count
    large = 4 * (b + parts) * s_q * h_q * (HEAD_DIM_V + 1) + 2 * b * s_q * h_q * HEAD_DIM_V
    grow = [torch.empty(4 * large + (64 << 20), dtype=torch.uint8, device=q.device),
            torch.empty(1 << 20, dtype=torch.uint8, device=q.device)]  # a large and a small segment
    del grow
    snapshot = [s for s in torch.cuda.memory_snapshot() if s["device"] == q.device.index]
    blocks = free_blocks(snapshot)
    for address, nbytes in blocks:
        cudart.memset(address, POISON_BYTE, nbytes)
    cudart.check("poisoning free memory")
    return blocks
