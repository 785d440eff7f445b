"""Times a whole decode step of DeepSeek-V3's attention, L layers, the way a serving engine
runs it: jax_etap's Flax layer in one jitted ``lax.scan`` over the layers, the same step
with plain jnp attention, and the same step in PyTorch with FlashMLA in a CUDA graph.

    python benchmarks/step.py [--layers 61] [--batches 1,32,128] [--contexts 1024,4096,32768]
                              [--heads 16,128] [--impls jax_etap,plain_jnp,flashmla_<build>,...]
                              [--memory-fraction 0.6] [--csv FILE] [--small]

Run it as a script without ``-P`` (like bench.py): the installed jax_etap is imported and
the sibling modules import plainly.

The step (decode_step.py): per layer the q projection (q LoRA), the kv projection whose
latent row is written into the paged cache (one new token a sequence), the absorbed
`mla_decode` over the cache, and o_proj. Attention only: no residual, norms or MLP, each
layer's output is the next one's input. Per-GPU shapes: 16 query heads (TP8) or 128 (DP
attention), DeepSeek-V3's other dimensions, random bf16 weights and cache rows.

Implementations: ``jax_etap`` (the layer's default, the CUDA kernel on a GPU),
``plain_jnp`` (the same layer with ``implementation="xla"``, jax_etap's jnp reference:
the paged cache gathered, einsum, softmax, einsum) and one ``flashmla_<build>`` per
FlashMLA build that imports (peers/torch_step.py: the same weights and cache through
DLPack, the step captured in a CUDA graph and replayed). The JAX implementations run over
every shape first, then FlashMLA's builds, on the same seeded inputs: once torch's
profiler has subscribed to CUPTI, jax's cannot in the same process (bench.py's `run`).

Layers: ``--layers`` (61, DeepSeek-V3's), or fewer where the weights and caches of that
many would exceed ``--memory-fraction`` of the memory jax may use (its ``bytes_limit``):
each row says how many it ran.

One row per (shape, implementation): ``step_us``, the GPU time of a step (the median over
32 steps, each dispatched alone, of the span of its kernels, from the profiler);
``wall_us``, a step's wall time in a loop of 32 steps dispatched back to back (dispatch
included); ``tokens/s``, batch over the step time (GPU where measured, else wall);
``attn_%``, the share of the step's GPU time in the attention kernels (ours:
decode/combine; FlashMLA's: its split-KV, combine and metadata kernels; plain jnp's
attention is XLA fusions without names of their own, so none); ``check``, the first
step's output against jax_etap's; ``x_<impl>``, that implementation's time over this
one's (FlashMLA's first); ``kernels_us``, each kernel's median time in a step.
Every step streams all L layers' weights (gigabytes, far beyond the L2), so no cache
rotation is needed between steps. On a CPU (``--small``: DeepSeek-V3's structure at tiny
widths) the script runs end to end by wall time; what needs a GPU is skipped and said so.
"""

from __future__ import annotations

import argparse
import importlib
import os
import re
import time

# torch's step shares the GPU with jax in this process: jax must not take 75% of its
# memory up front.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402 - after the allocator setting
from bench import Measured, check, flashmla_peer, kernels_cell, peer_measured, print_table, progress_line, refusal, speedup, write_csv
from decode_step import StepShape, attention_config, cache_bytes_per_layer, layers_that_fit, make_inputs, make_step, weight_bytes_per_layer
from timing import CALLS, Timing, on_gpu, traced_spans

from jax_etap.testing import to_f32

OURS = "jax_etap"
JAX_IMPLEMENTATIONS = {OURS: None, "plain_jnp": "xla"}  # name -> mla_decode's implementation
NEW_TOKENS = CALLS  # room a sequence needs: every timing phase starts from the context again
SEED = 0
DEEPSEEK_V3_LAYERS = 61
SMALL_DEFAULTS = dict(layers=2, batches="1,2", contexts="64,128", heads="4")
GPU_DEFAULTS = dict(layers=DEEPSEEK_V3_LAYERS, batches="1,32,128", contexts="1024,4096,32768", heads="16,128")
# The kernels of the attention itself, by `gpu_trace.short_name`: ours (csrc/), and
# FlashMLA's split-KV, combine and scheduling-metadata kernels over its versions.
OUR_ATTENTION = re.compile(r"decode_sm90_kernel|decode_sm90_wide_kernel|decode_sm80_kernel|combine_splits_kernel")
FLASHMLA_ATTENTION = re.compile(r".*(mla|sched_meta).*", re.IGNORECASE)


def attention_kernels(impl: str) -> re.Pattern | None:
    """Which kernels of ``impl``'s step are its attention (None: not told apart by name)."""
    if impl == OURS:
        return OUR_ATTENTION
    if impl.startswith("flashmla"):
        return FLASHMLA_ATTENTION
    return None


def attention_share(timing: Timing, pattern: re.Pattern | None) -> float | None:
    """Percent of the step's median GPU time in the kernels ``pattern`` names (their median
    times in a step, summed), or None where there is no GPU time or no pattern."""
    if timing.kernel_us is None or pattern is None:
        return None
    attention_us = sum(us for name, us in timing.kernel_us.items() if pattern.fullmatch(name))
    return 100 * attention_us / (timing.gpu_median_s * 1e6)


class ChainedSteps:
    """Steps of jitted step functions (`decode_step.make_step`) from one `StepInputs`: the
    pool, donated to each step, is handed on to the next, whichever function runs it."""

    def __init__(self, inputs):
        self.inputs, self.pool, self.seqlens = inputs, inputs.pool, inputs.seqlens

    def reset(self) -> None:
        """Back to the inputs' lengths (the rows past them are rewritten by the next steps)."""
        self.seqlens = self.inputs.seqlens

    def run(self, step) -> jax.Array:
        """One step; its output [batch, 1, hidden] (the lengths advance by one)."""
        inputs = self.inputs
        out, self.pool, self.seqlens = step(inputs.layers, inputs.x, self.pool, inputs.block_table, self.seqlens)
        return out


def torch_step_peer():
    """benchmarks/peers/torch_step.py (imported only where FlashMLA's builds run)."""
    return importlib.import_module("peers.torch_step")


def measure_jax(steps: ChainedSteps, step, gpu: bool) -> Measured:
    """``step``'s Timing over CALLS steps from the inputs' lengths, and its first step's
    output [batch, hidden] (after a warm-up step: compilation)."""
    steps.reset()
    jax.block_until_ready(steps.run(step))
    steps.reset()
    first = to_f32(steps.run(step))
    steps.reset()
    start = time.perf_counter()
    for _ in range(CALLS):
        out = steps.run(step)
    jax.block_until_ready(out)
    wall_s = (time.perf_counter() - start) / CALLS
    spans = kernels = None
    if gpu:
        steps.reset()
        spans, kernels = traced_spans(lambda i: jax.block_until_ready(steps.run(step)), CALLS)
    return Measured(Timing(wall_s, spans, kernels), first.reshape(first.shape[0], -1))


def measured_row(shape: StepShape, layers: int, name: str, results: dict[str, Measured]) -> dict:
    own = results[name].timing
    share = attention_share(own, attention_kernels(name))
    peers = sorted((p for p in results if p != name), key=lambda p: (not p.startswith("flashmla"), p))
    return {
        "config": shape.name, "layers": layers, "impl": name,
        "step_us": "" if own.gpu_s is None else own.gpu_median_s * 1e6, "wall_us": own.wall_s * 1e6,
        "tokens/s": shape.batch / own.headline_s, "attn_%": "" if share is None else share,
        "check": "ours" if name == OURS else check(results[name].out, results[OURS].out),
        **{f"x_{peer}": speedup(own, results[peer].timing) for peer in peers},
        "kernels_us": kernels_cell(own.kernel_us),
    }


def row_columns(rows: list[dict]) -> list[str]:
    fixed = ["config", "layers", "impl", "step_us", "wall_us", "tokens/s", "attn_%", "check"]
    ratios = sorted({k for r in rows for k in r if k.startswith("x_")}, key=lambda k: (not k.startswith("x_flashmla"), k))
    return fixed + ratios + ["kernels_us"] + (["refused"] if any("refused" in r for r in rows) else [])


def memory_budget(fraction: float) -> tuple[int | None, str]:
    """Bytes the weights and caches may take, and how the number came about."""
    stats = jax.devices()[0].memory_stats()
    if not stats or "bytes_limit" not in stats:
        return None, f"{jax.devices()[0].platform} reports no memory limit: the layers as asked"
    budget = int(fraction * stats["bytes_limit"])
    return budget, (f"memory budget for weights and caches: {fraction:.0%} of the {stats['bytes_limit'] / 2**30:.1f} GiB "
                    f"jax may use, {budget / 2**30:.1f} GiB")


def run(shapes: list[StepShape], jax_impls: list[str], builds: list[str], requested_layers: int, small: bool,
        budget: int | None, after_config=None) -> list[dict]:
    """Times every implementation on every shape, the JAX ones over all shapes first, then
    FlashMLA's builds on the same seeded inputs; ``after_config(rows)`` after each shape of
    each pass (the CSV is rewritten there, so a run cut short keeps what it measured)."""
    gpu = on_gpu()
    torch_step = torch_step_peer() if builds else None
    layers, results, refused = {}, {s.name: {} for s in shapes}, {s.name: {} for s in shapes}
    for shape in shapes:
        config = attention_config(shape.heads, small)
        per_layer = cache_bytes_per_layer(shape, config, NEW_TOKENS) + weight_bytes_per_layer(config)
        try:
            layers[shape.name] = layers_that_fit(requested_layers, per_layer, budget)
        except MemoryError as error:
            refused[shape.name] = {name: refusal(error) for name in [*jax_impls, *builds]}

    def rows_so_far():
        rows = []
        for shape in shapes:
            for name in [*jax_impls, *builds]:
                if name in refused[shape.name]:
                    rows.append({"config": shape.name, "impl": name, "refused": refused[shape.name][name]})
                elif name in results[shape.name]:
                    rows.append(measured_row(shape, layers[shape.name], name, results[shape.name]))
        return rows

    passes = [("jax", jax_impls)] + ([("flashmla", builds)] if builds else [])
    started = time.perf_counter()
    for label, names in passes:
        for n, shape in enumerate(shapes):
            if shape.name not in layers:
                continue
            count = layers[shape.name]
            print(progress_line(n, len(shapes), f"{shape.name} L{count} [{label}]", time.perf_counter() - started), flush=True)
            config = attention_config(shape.heads, small)
            inputs = make_inputs(shape, config, count, NEW_TOKENS, SEED)
            steps = ChainedSteps(inputs)
            for name in names:
                if label == "jax":
                    results[shape.name][name] = measure_jax(steps, make_step(config, JAX_IMPLEMENTATIONS[name]), gpu)
                    continue
                try:
                    results[shape.name][name] = peer_measured(torch_step.measure(name, config, inputs, CALLS))
                except Exception as error:  # noqa: BLE001 - a peer's refusal of a shape is a result
                    refused[shape.name][name] = refusal(error)
            del inputs, steps
            if after_config is not None:
                after_config(rows_so_far())
    return rows_so_far()


def parse_sizes(text: str, option: str) -> list[int]:
    """``"1,32,128"`` -> [1, 32, 128]; ValueError naming ``option`` unless all are positive."""
    values = [int(v) if v.strip().isdigit() else 0 for v in text.split(",")]
    if any(v < 1 for v in values):
        raise ValueError(f"{option}: expected comma-separated positive integers, got {text!r}")
    return values


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, help=f"layers a step (default {DEEPSEEK_V3_LAYERS}; fewer where memory requires)")
    parser.add_argument("--batches", help=f"comma-separated batch sizes (default {GPU_DEFAULTS['batches']})")
    parser.add_argument("--contexts", help=f"comma-separated tokens a sequence holds (default {GPU_DEFAULTS['contexts']})")
    parser.add_argument("--heads", help=f"comma-separated query heads a GPU (default {GPU_DEFAULTS['heads']}: TP8, DP attention)")
    parser.add_argument("--impls", help="comma-separated implementations (default: all that can run here)")
    parser.add_argument("--memory-fraction", type=float, default=0.6,
                        help="of the memory jax may use, the share for weights and caches (default 0.6)")
    parser.add_argument("--csv", help="write the rows to this CSV file")
    parser.add_argument("--small", action="store_true",
                        help=f"DeepSeek-V3's structure at tiny widths, defaults {SMALL_DEFAULTS}: a CPU run of this script")
    args = parser.parse_args(argv)

    defaults = SMALL_DEFAULTS if args.small else GPU_DEFAULTS
    requested = defaults["layers"] if args.layers is None else args.layers
    if requested < 1:
        parser.error(f"--layers must be positive, got {requested}")
    if not 0 < args.memory_fraction <= 1:
        parser.error(f"--memory-fraction must be in (0, 1], got {args.memory_fraction}")
    try:
        sizes = [parse_sizes(getattr(args, name) or defaults[name], f"--{name}") for name in ("heads", "batches", "contexts")]
    except ValueError as error:
        parser.error(str(error))
    shapes = [StepShape(h, b, s) for h in sizes[0] for b in sizes[1] for s in sizes[2]]

    gpu = on_gpu()
    notes = []
    peer = flashmla_peer()
    builds = peer.builds() if peer is not None else []
    if peer is None:
        notes.append("FlashMLA not run: benchmarks/peers/flashmla.py is absent")
    elif not builds:
        notes.append("FlashMLA not run: no build of it imports here (torch with CUDA and a flashmla_<commit> module)")
    elif args.small:
        builds = []
        notes.append("FlashMLA not run: --small's cache rows are 128 channels, FlashMLA reads 576")
    every = [*JAX_IMPLEMENTATIONS, *builds]
    chosen = args.impls.split(",") if args.impls else every
    unknown = set(chosen) - set(every)
    if unknown:
        parser.error(f"--impls: {sorted(unknown)} cannot run here; choose from {sorted(every)}")
    if OURS not in chosen:
        chosen.insert(0, OURS)  # every row is checked against ours
    if not gpu:
        notes.append(f"GPU time not measured: jax runs on {jax.devices()[0].platform}; rates and ratios by wall time")
    elif "plain_jnp" in chosen:
        notes.append("plain_jnp has no attention share: its attention is XLA fusions the trace does not name")
    budget, budget_note = memory_budget(args.memory_fraction)
    notes.append(budget_note)
    for note in notes:
        print(f"note: {note}", flush=True)

    checkpoint = (lambda rows: write_csv(args.csv, rows, row_columns(rows))) if args.csv else None
    rows = run(shapes, [n for n in chosen if n in JAX_IMPLEMENTATIONS], [n for n in chosen if n in builds], requested,
               args.small, budget, after_config=checkpoint)
    print_table(rows, f"device: {jax.devices()[0].device_kind}; attention-only decode step "
                      f"({'small widths' if args.small else 'DeepSeek-V3'}), layers as the column says; "
                      f"{'GPU' if gpu else 'wall'} time for tokens/s and the ratios", row_columns(rows))


if __name__ == "__main__":
    main()
