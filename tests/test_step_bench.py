"""benchmarks/step.py, the decode-step benchmark, on the CPU: the script end to end at
small widths, the step's numbers against DeepSeek-V3's attention in float64, the pool
written in place, the memory budget, the attention share, and the FlashMLA pass through a
stand-in (torch and FlashMLA's builds need a GPU: their step is checked against ours by
the benchmark itself, in its ``check`` column).

Tolerances (relative error norms over a batch of 2 sequences of 64 tokens, the small
widths; measured on the CPU, where both implementations run jax_etap's jnp reference,
over seeds 0-4): the step's output against the float64 chain 4-5e-3 with one layer and
0.9-1.4e-2 with two (the second layer's input carries the first one's error), its
written cache rows 3.1-4.6e-3. They come from bf16 weights, activations and cache (2^-9
relative a rounding, several roundings a layer); the bounds, OUT_RTOL 3e-2 and ROWS_RTOL
1.5e-2, leave 2-3x. Two bf16 steps each within OUT_RTOL / 2 of float64 agree to
OUT_RTOL. Broken on purpose once each: with every layer reading layer 0's parameters the
output test failed at 1.23 relative error; with the pool carried on unwritten (each
layer's appended pages dropped) the written-rows test failed at 1.48.
"""

from __future__ import annotations

import csv
import dataclasses
from contextlib import contextmanager

import decode_step
import jax
import numpy as np
import pytest
import step
from flax import nnx
from numpy_mla_layer import latent_rows_numpy, mla_attention_numpy
from timing import Timing

from jax_etap.testing import relative_error, to_f32

SHAPE = decode_step.StepShape(heads=4, batch=2, context=64)
LAYERS = 2
OUT_RTOL = 3e-2
ROWS_RTOL = 1.5e-2


@pytest.fixture(scope="module")
def config():
    return decode_step.attention_config(SHAPE.heads, small=True)


def fresh_inputs(config):
    return decode_step.make_inputs(SHAPE, config, LAYERS, new_tokens=8, seed=3)


def oracle_spec(config) -> dict:
    """The config as the float64 oracle reads it (config.json's fields)."""
    spec = dataclasses.asdict(config)
    spec["rope_scaling"] = dataclasses.asdict(config.rope_scaling)
    return spec


def layer_checkpoint(inputs, layer: int) -> dict[str, np.ndarray]:
    """Layer ``layer``'s parameters with the checkpoints' names ([out, in] Linear weights)."""
    weights = {}
    for module, params in nnx.to_pure_dict(inputs.layers).items():
        for name, value in params.items():
            value = to_f32(value[layer])
            weights[f"{module}.weight"] = value.T if name == "kernel" else value  # kernel or norm scale
    return weights


def pool_rows(pool: np.ndarray, inputs, layer: int, sequence: int, positions) -> np.ndarray:
    """The rows [len(positions), latent_dim] of a sequence in a layer's part of the pool."""
    table = np.asarray(inputs.block_table)[sequence] + layer * inputs.blocks_per_layer
    positions = np.asarray(positions)
    return pool[table[positions // decode_step.BLOCK_SIZE], positions % decode_step.BLOCK_SIZE, 0]


def float64_step(inputs, config, pool: np.ndarray):
    """(outputs [batch, hidden], rows written [layers, batch, latent_dim]) of one step,
    every layer in float64 from DeepSeek-V3's formulation (non-absorbed) over the rows the
    pool holds, the new row computed by the oracle."""
    spec, context = oracle_spec(config), SHAPE.context
    hidden = to_f32(inputs.x)[:, 0].astype(np.float64)
    written = []
    for layer in range(inputs.num_layers):
        weights = layer_checkpoint(inputs, layer)
        outs, rows = [], []
        for b in range(SHAPE.batch):
            new_row = latent_rows_numpy(weights, spec, hidden[b][None], [context])
            cached = pool_rows(pool, inputs, layer, b, np.arange(context)).astype(np.float64)
            tokens = np.concatenate([np.zeros((context, config.hidden_size)), hidden[b][None]])
            outs.append(mla_attention_numpy(weights, spec, tokens, rows=np.concatenate([cached, new_row]))[-1])
            rows.append(new_row[0])
        hidden = np.stack(outs)
        written.append(np.stack(rows))
    return hidden, np.stack(written)


@pytest.fixture(scope="module")
def stepped(config):
    """(inputs, pool before, each implementation's output [batch, hidden] and pool after)."""
    inputs = fresh_inputs(config)
    results = {}
    for name, implementation in step.JAX_IMPLEMENTATIONS.items():
        pool = jax.numpy.array(inputs.pool)  # a copy: the step donates it
        out, pool, seqlens = decode_step.make_step(config, implementation)(
            inputs.layers, inputs.x, pool, inputs.block_table, inputs.seqlens)
        np.testing.assert_array_equal(seqlens, SHAPE.context + 1)
        results[name] = (to_f32(out)[:, 0], to_f32(pool))
    return inputs, to_f32(inputs.pool), results


def test_steps_match_deepseek_attention_in_float64(config, stepped):
    inputs, before, results = stepped
    expected_out, expected_rows = float64_step(inputs, config, before)
    for name, (out, pool) in results.items():
        assert relative_error(out, expected_out) < OUT_RTOL, name
        written = np.stack([pool_rows(pool, inputs, layer, b, [SHAPE.context])[0]
                            for layer in range(LAYERS) for b in range(SHAPE.batch)])
        assert relative_error(written, expected_rows.reshape(written.shape)) < ROWS_RTOL, name
        # Nothing else in the pool changed: the rows before the context, and the room after it.
        untouched = np.ones(before.shape[:2], bool)
        for layer in range(LAYERS):
            for b in range(SHAPE.batch):
                table = np.asarray(inputs.block_table)[b] + layer * inputs.blocks_per_layer
                untouched[table[SHAPE.context // 64], SHAPE.context % 64] = False
        np.testing.assert_array_equal(pool[untouched], before[untouched])


def test_kernel_and_reference_steps_agree(stepped):
    """jax_etap's default (the kernel on a GPU) and plain_jnp ("xla") from the same inputs."""
    _, _, results = stepped
    assert relative_error(results["jax_etap"][0], results["plain_jnp"][0]) < OUT_RTOL


def test_step_writes_the_pool_in_place(config):
    """The compiled step aliases the donated pool to its output and never copies a pool."""
    inputs = fresh_inputs(config)
    compiled = decode_step.make_step(config, None).lower(
        inputs.layers, inputs.x, inputs.pool, inputs.block_table, inputs.seqlens).compile().as_text()
    pool_type = f"bf16[{','.join(map(str, inputs.pool.shape))}]"
    assert "input_output_alias={ {1}: (8," in compiled  # output 1 (the pool) is argument 8's buffer
    copies = [line for line in compiled.splitlines() if pool_type in line and " copy(" in line]
    assert copies == []


def test_small_run_end_to_end(tmp_path, capsys):
    csv_path = tmp_path / "step.csv"
    step.main(["--small", "--heads", "4", "--batches", "2", "--contexts", "64", "--csv", str(csv_path)])
    rows = list(csv.DictReader(csv_path.open()))
    assert [(r["config"], r["layers"], r["impl"]) for r in rows] == [("h4 b2 s64", "2", "jax_etap"),
                                                                      ("h4 b2 s64", "2", "plain_jnp")]
    for row in rows:
        assert row["step_us"] == "" and row["attn_%"] == ""  # no GPU here: not measured, never made up
        assert float(row["tokens/s"]) == pytest.approx(2 / (float(row["wall_us"]) / 1e6), rel=1e-6)
    ours, plain = rows
    assert ours["check"] == "ours" and plain["check"].startswith("ok ")
    assert float(ours["x_plain_jnp"]) == pytest.approx(float(plain["wall_us"]) / float(ours["wall_us"]), rel=1e-6)
    out = capsys.readouterr().out
    assert "note: GPU time not measured: jax runs on cpu" in out
    assert "note: FlashMLA not run" in out
    assert "| h4 b2 s64 | 2 | plain_jnp |" in out


@pytest.mark.parametrize("argv, message", [
    (["--batches", "1,x"], "--batches: expected comma-separated positive integers"),
    (["--layers", "0"], "--layers must be positive"),
    (["--impls", "jax_etap,no_such_step"], "no_such_step"),
])
def test_bad_arguments_are_named(argv, message, capsys):
    with pytest.raises(SystemExit):
        step.main(["--small", *argv])
    assert message in capsys.readouterr().err


def test_layers_fit_the_memory_budget():
    gib = 2**30
    assert decode_step.layers_that_fit(61, 5 * gib, 36 * gib) == 7
    assert decode_step.layers_that_fit(61, gib // 8, 36 * gib) == 61
    assert decode_step.layers_that_fit(61, 5 * gib, None) == 61  # no budget known: as asked
    with pytest.raises(MemoryError, match="one layer needs 5.00 GiB, the budget is 4.00 GiB"):
        decode_step.layers_that_fit(61, 5 * gib, 4 * gib)


def test_cache_bytes_count_every_block_of_every_sequence():
    config = decode_step.attention_config(16)
    shape = decode_step.StepShape(16, 128, 32768)
    # 513 blocks a sequence: the context and 32 new tokens, in blocks of 64.
    assert decode_step.cache_bytes_per_layer(shape, config, 32) == 128 * 513 * 64 * 576 * 2


def test_a_shape_over_the_budget_is_a_refused_row(monkeypatch, capsys):
    monkeypatch.setattr(step, "memory_budget", lambda fraction: (1000, "memory budget: 1000 bytes"))
    step.main(["--small", "--heads", "4", "--batches", "2", "--contexts", "64"])
    out = capsys.readouterr().out
    assert "| h4 b2 s64 | jax_etap | refused: MemoryError: one layer needs" in out


def test_attention_share_counts_the_attention_kernels_of_each_implementation():
    ours = Timing(wall_s=1e-3, gpu_s=[100e-6, 120e-6, 100e-6],
                  kernel_us={"decode_sm90_kernel": 30.0, "combine_splits_kernel": 5.0, "nvjet_gemm": 60.0})
    assert step.attention_share(ours, step.attention_kernels("jax_etap")) == pytest.approx(35.0)
    flashmla = Timing(wall_s=1e-3, gpu_s=[200e-6], kernel_us={
        "flash_fwd_splitkv_mla_kernel": 40.0, "flash_fwd_mla_combine_kernel": 8.0, "get_mla_metadata_kernel": 2.0,
        "vectorized_elementwise_kernel": 10.0, "sm90_xmma_gemm_bf16bf16": 140.0})
    assert step.attention_share(flashmla, step.attention_kernels("flashmla_0123abc")) == pytest.approx(25.0)
    assert step.attention_kernels("plain_jnp") is None
    assert step.attention_share(ours, None) is None
    assert step.attention_share(Timing(1e-3, None), step.attention_kernels("jax_etap")) is None


class StandInTorchStep:
    """Stands in for benchmarks/peers/torch_step.py (same ``measure``): "flashmla_good"
    returns the first step's output by the jnp reference step, "flashmla_wrong" 10% more;
    made-up times."""

    def __init__(self):
        self.calls = []

    def measure(self, build, config, inputs, calls):
        self.calls.append(dict(build=build, layers=inputs.num_layers, calls=calls))
        pool = jax.numpy.array(inputs.pool)  # a copy: the step donates it, the next build reads the inputs'
        out, _, _ = decode_step.make_step(config, "xla")(inputs.layers, inputs.x, pool, inputs.block_table,
                                                         inputs.seqlens)
        scale = 1.0 if build == "flashmla_good" else 1.1
        return dict(gpu_us=[500.0] * calls, kernel_us={"flash_fwd_splitkv_mla_kernel": 100.0}, wall_us=800.0,
                    out=to_f32(out)[:, 0] * scale)


def test_flashmla_pass_runs_after_jax_on_the_same_inputs_and_is_checked(monkeypatch):
    """Every build gets a row after the JAX ones, on inputs of the same layer count, checked
    against ours (a wrong output is marked DIFFERS), with its ratios first."""
    stand_in = StandInTorchStep()
    monkeypatch.setattr(step, "torch_step_peer", lambda: stand_in)
    rows = step.run([SHAPE], ["jax_etap", "plain_jnp"], ["flashmla_good", "flashmla_wrong"], LAYERS, small=True,
                    budget=None)
    assert [r["impl"] for r in rows] == ["jax_etap", "plain_jnp", "flashmla_good", "flashmla_wrong"]
    by_impl = {r["impl"]: r for r in rows}
    assert by_impl["flashmla_good"]["check"].startswith("ok ")
    assert by_impl["flashmla_wrong"]["check"].startswith("DIFFERS ")
    assert by_impl["flashmla_good"]["step_us"] == pytest.approx(500.0)
    assert by_impl["flashmla_good"]["attn_%"] == pytest.approx(20.0)
    assert stand_in.calls == [dict(build=b, layers=LAYERS, calls=step.CALLS) for b in ("flashmla_good", "flashmla_wrong")]
    assert [k for k in by_impl["jax_etap"] if k.startswith("x_")][:2] == ["x_flashmla_good", "x_flashmla_wrong"]


class FakeCuda:
    """The parts of torch.cuda that `torch_step.capture` uses, logging what happens where."""

    def __init__(self, log):
        self.log, self.on = log, "current"

    def Stream(self):  # noqa: N802 - torch's name
        return FakeStream(self, "side")

    def current_stream(self):
        return FakeStream(self, "current")

    @contextmanager
    def stream(self, stream):
        previous, self.on = self.on, stream.name
        yield
        self.on = previous

    def CUDAGraph(self):  # noqa: N802 - torch's name
        return object()

    @contextmanager
    def graph(self, graph):
        previous, self.on = self.on, "capture"
        yield
        self.on = previous


@dataclasses.dataclass
class FakeStream:
    cuda: FakeCuda
    name: str

    def wait_stream(self, other):
        self.cuda.log.append(f"{self.name} waits for {other.name}")


def test_capture_warms_up_on_a_side_stream_then_captures_one_run():
    import types

    from peers import torch_step

    log = []
    fake_torch = types.SimpleNamespace(cuda=FakeCuda(log))

    def run():
        log.append(f"run on {fake_torch.cuda.on}")
        return len(log)

    graph, outputs = torch_step.capture(fake_torch, run)
    warm_up = ["run on side"] * torch_step.WARM_UP
    assert log == ["side waits for current", *warm_up, "current waits for side", "run on capture"]
    assert outputs == len(log)  # what the captured run returned: the graph's output tensors
