"""The decode step of benchmarks/decode_step.py in PyTorch, with FlashMLA's dense decode for
the attention, captured in one CUDA graph and replayed: how vLLM and SGLang run decode.

It reads the JAX step's own arrays (`decode_step.StepInputs`) through DLPack views, no
copy: the same weights, hidden states, pool of pages, block table and lengths. The graph
writes the pool and the lengths in place, so hand it the inputs only once JAX is done with
them. Layer l reads its pages as a view of the pool (``pool[l]``) with layer 0's block
table, the way a torch engine passes each layer its own cache tensor.

Per layer, what `MultiHeadLatentAttention.decode` computes, in the same dtypes (bf16
matmuls; the norms' statistics and the rope in float32): q_a_proj, q_a_layernorm,
q_b_proj, rope on q_pe; kv_a_proj_with_mqa, kv_a_layernorm, rope on k_pe, the row
written at each sequence's length; W_UK folded into the query; FlashMLA's decode over the
lengths including the new row; W_UV; o_proj. FlashMLA's scheduling metadata is computed
once a step, by the first layer's call (`flashmla.Decoder.first_call`), and reused by the
later layers, as its README prescribes. Each replay advances the lengths by one, as the
JAX step does.
"""

from __future__ import annotations

import time

from flax import nnx
from gpu_trace import kernel_medians_us, span_ns
from peers import flashmla
from peers.torch_trace import profiled_activities

from jax_etap.flax.attention import LATENT_NORM_EPS
from jax_etap.flax.rope import inverse_frequencies

WARM_UP = 3  # runs before capture: lazy initialisation (cuBLAS handles, workspaces) must not happen during it


def capture(torch, run):
    """``(graph, outputs)``: a CUDA graph of ``run()`` and the tensors it captured, after
    WARM_UP runs on a side stream (torch's recipe for capture)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(WARM_UP):
            run()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outputs = run()
    return graph, outputs


class TorchStep:
    """The step on torch views of a `decode_step.StepInputs`; calling it runs one step and
    returns the last layer's output [batch, hidden]."""

    def __init__(self, torch, decoder: flashmla.Decoder, config, inputs):
        self.torch, self.decoder, self.config = torch, decoder, config
        view = lambda x, name: flashmla.from_jax(torch, x, name)  # noqa: E731
        weights = nnx.to_pure_dict(inputs.layers)
        self.w = {f"{module}.{param}": view(array, f"{module}.{param}")
                  for module, params in weights.items() for param, array in params.items()}
        self.num_layers = inputs.num_layers
        self.x = view(inputs.x, "x")[:, 0]
        self.pool = view(inputs.pool, "pool").view(self.num_layers, inputs.blocks_per_layer, *inputs.pool.shape[1:])
        self.block_table = view(inputs.block_table, "block_table")
        self.seqlens = view(inputs.seqlens, "seqlens")
        self.initial_seqlens = self.seqlens.clone()
        self.capacity = self.block_table.shape[1] * self.pool.shape[2]
        self.inverse_frequencies = torch.from_numpy(inverse_frequencies(config)).to(self.x.device)

    def reset(self) -> None:
        """The lengths as the inputs gave them (the rows past them are rewritten by the next
        steps)."""
        self.seqlens.copy_(self.initial_seqlens)

    def __call__(self):
        torch = self.torch
        batch = self.x.shape[0]
        positions = self.seqlens.clamp(0, self.capacity)
        angle = positions.float()[:, None] * self.inverse_frequencies
        factor = self.config.rope_attention_factor
        rotation = (torch.cos(angle) * factor, torch.sin(angle) * factor)
        rows = torch.arange(batch, device=self.x.device)
        blocks = self.block_table[rows, (positions // self.pool.shape[2]).long()].long()
        slots = (positions % self.pool.shape[2]).long()
        lengths = positions + 1
        hidden, meta = self.x, None
        for layer in range(self.num_layers):
            hidden, meta = self._layer(layer, hidden, rotation, (blocks, slots), lengths, meta)
        self.seqlens.copy_(lengths)
        return hidden

    def _layer(self, layer, hidden, rotation, write_at, lengths, meta):
        torch, cfg, w = self.torch, self.config, self.w
        heads, nope, rank = cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.kv_lora_rank
        cos, sin = rotation
        q = self._norm(hidden @ w["q_a_proj.kernel"][layer], w["q_a_layernorm.scale"][layer])
        q = (q @ w["q_b_proj.kernel"][layer]).view(-1, heads, cfg.qk_head_dim)
        q_nope, q_pe = q[..., :nope], _rope(torch, q[..., nope:], cos[:, None], sin[:, None])
        latent_and_pe = hidden @ w["kv_a_proj_with_mqa.kernel"][layer]
        latent = self._norm(latent_and_pe[:, :rank], w["kv_a_layernorm.scale"][layer])
        row = torch.cat([latent.float(), _rope(torch, latent_and_pe[:, rank:], cos, sin)], dim=-1)
        pages = self.pool[layer]
        pages[write_at[0], write_at[1], 0] = row.to(pages.dtype)

        w_kv = w["kv_b_proj.kernel"][layer].view(rank, heads, nope + cfg.v_head_dim)
        q_latent = torch.einsum("bhn,rhn->bhr", q_nope, w_kv[..., :nope])
        query = torch.cat([q_latent.float(), q_pe], dim=-1).to(pages.dtype)[:, None]  # [b, 1, h, 576]
        cache = (pages, lengths, self.block_table)
        if meta is None:
            (out, _), meta = self.decoder.first_call(query, cache)
        else:
            out, _ = self.decoder(query, cache, meta)
        out = torch.einsum("bhr,rhv->bhv", out[:, 0], w_kv[..., nope:]).reshape(out.shape[0], -1)
        return out @ w["o_proj.kernel"][layer], meta

    def _norm(self, x, scale):
        """RMSNorm with the statistics in float32, back in x's dtype (flax's RMSNorm)."""
        x32 = x.float()
        normed = x32 * self.torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + LATENT_NORM_EPS)
        return (normed * scale.float()).to(x.dtype)


def _rope(torch, x, cos, sin):
    """`jax_etap.flax.rope.apply_rope` in torch, in float32: each channel pair (2i, 2i + 1)
    rotated, the pairs left where they are."""
    pairs = x.float().unflatten(-1, (-1, 2))
    first, second = pairs[..., 0], pairs[..., 1]
    return torch.stack([first * cos - second * sin, first * sin + second * cos], dim=-1).flatten(-2)


def measure(build: str, config, inputs, calls: int) -> dict:
    """Time ``calls`` replays of the graph of ``build``'s step on ``inputs``.

    Returns ``gpu_us``: per step, the span of the GPU work its replay launched
    (torch.profiler, `torch_trace.profiled_activities`); ``kernel_us``: each kernel's median
    microseconds in a step; ``wall_us``: wall time per step over ``calls`` back-to-back
    replays, synchronized at the end; ``out``: float32 NumPy [batch, hidden] of the first
    step from the inputs' lengths. Every phase starts from those lengths, and they are
    restored at the end (the next build starts from them too).
    """
    import torch  # lazily: this module imports on machines without torch

    if calls < flashmla.MIN_CALLS:
        raise ValueError(f"calls must be >= {flashmla.MIN_CALLS}, got {calls}")
    decoder = flashmla.Decoder(flashmla.load(build), causal=True, softmax_scale=config.softmax_scale)
    step = TorchStep(torch, decoder, config, inputs)
    room = step.capacity - int(step.initial_seqlens.max())
    if room < max(calls, WARM_UP):
        raise ValueError(f"the cache has room for {room} more tokens a sequence, the timing writes "
                         f"{max(calls, WARM_UP)}")
    with torch.cuda.device(step.x.device):
        try:
            graph, out = capture(torch, step)
            step.reset()
            graph.replay()
            first = out.float().cpu().numpy()
            step.reset()
            activities = profiled_activities(torch, lambda i: graph.replay(), calls)
            step.reset()
            torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(calls):
                graph.replay()
            torch.cuda.synchronize()
            wall_us = (time.perf_counter() - start) / calls * 1e6
        finally:
            step.reset()
            torch.cuda.synchronize()
    return dict(gpu_us=[span_ns(group) / 1e3 for group in activities], kernel_us=kernel_medians_us(activities),
                wall_us=wall_us, out=first)
