"""The benchmark scripts, run end to end on the CPU so that they are known to work before
they take device time: benchmarks/bench.py (the harness of the grid, here with tiny
ceiling problems and one small config, beside a stand-in FlashMLA peer) and
benchmarks/sharded_decode.py (on 8 host devices, in a subprocess because the device count
is fixed when jax starts). The scripts import as they import each other: benchmarks/ is on
pytest's pythonpath (pyproject.toml).
"""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import bench
import clock_medians
import gpu_trace
import jax
import numpy as np
import numerics
import pytest
import stall_regions
import timeline
import timing
from jax._src.profiler import ProfileData

import jax_etap

REPO = Path(__file__).resolve().parents[1]


def test_config_names_round_trip():
    for config in bench.FULL_GRID:
        assert bench.Config.parse(config.name) == config
    with pytest.raises(ValueError, match="b<batch> s<seqlen> h<heads> sq<s_q>"):
        bench.Config.parse("b1 s1024 h16")


def test_progress_line_fills_with_the_configs_done():
    assert bench.progress_line(0, 4, "b1 s64 h16 sq1", 0.4, width=8) == "[--------] 1/4 b1 s64 h16 sq1 (0 s)"
    assert bench.progress_line(2, 4, "b1 s64 h16 sq1", 41.2, width=8) == "[####----] 3/4 b1 s64 h16 sq1 (41 s)"


def test_bench_runs_a_config_against_its_peers(tmp_path, capsys):
    csv_path = tmp_path / "bench.csv"
    bench.main(["--configs", "b2 s256 h16 sq1", "--impls", "reference,plain_jnp", "--small-ceilings",
                "--csv", str(csv_path)])
    rows = list(csv.DictReader(csv_path.open()))
    assert [(r["config"], r["impl"]) for r in rows] == [("b2 s256 h16 sq1", "reference"), ("b2 s256 h16 sq1", "plain_jnp")]
    for row in rows:
        assert float(row["wall_us"]) > 0 and float(row["GB/s"]) > 0 and float(row["TFLOP/s"]) > 0
        assert row["gpu_us"] == ""  # no GPU here: not measured, never made up
    reference, plain = rows
    # Each speedup is the peer's time over this one's, from the same run.
    assert float(reference["x_plain_jnp"]) == pytest.approx(float(plain["wall_us"]) / float(reference["wall_us"]), rel=1e-6)
    # plain jnp on the same cache and queries computes the same attention (full lengths, s_q 1).
    assert reference["check"] == "ours" and plain["check"].startswith("ok ")
    out = capsys.readouterr().out
    assert "| b2 s256 h16 sq1 | plain_jnp |" in out
    assert "note: GPU time not measured: jax runs on cpu" in out  # what a CPU run skips, it says


def refuses_the_shape(q, kv_dense):
    raise ValueError("asks 297 KB of shared memory, 232 KB available\n(the rest of a long message)")


def with_extra_impl(monkeypatch, name, impl):
    every = bench.implementations
    monkeypatch.setattr(bench, "implementations", lambda kernel: {**every(kernel), name: impl})


def bench_with_a_refusing_peer(tmp_path, monkeypatch) -> Path:
    """The CSV of a one-config run of plain jnp beside a peer that refuses the shape."""
    with_extra_impl(monkeypatch, "picky", bench.Impl(refuses_the_shape, dense=True, may_refuse=True))
    csv_path = tmp_path / "bench.csv"
    bench.main(["--configs", "b2 s256 h16 sq1", "--impls", "plain_jnp,picky", "--small-ceilings",
                "--csv", str(csv_path)])
    return csv_path


def test_bench_reports_a_peer_that_refuses_a_shape(tmp_path, capsys, monkeypatch):
    """A third-party peer's refusal is a row of its own (type and first line of the error),
    the run goes on, and the other rows have no speedup over it."""
    csv_path = bench_with_a_refusing_peer(tmp_path, monkeypatch)
    reference, plain, picky = csv.DictReader(csv_path.open())  # ours is always timed, to check against
    assert reference["impl"] == "reference" and float(plain["wall_us"]) > 0 and "x_picky" not in plain
    assert picky["impl"] == "picky" and not picky["wall_us"]
    assert picky["refused"] == "ValueError: asks 297 KB of shared memory, 232 KB available"
    assert "| b2 s256 h16 sq1 | picky | refused: ValueError: asks 297 KB" in capsys.readouterr().out


def test_plot_draws_a_csv_with_a_refused_row(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    csv_path = bench_with_a_refusing_peer(tmp_path, monkeypatch)
    import plot_bench

    plot_bench.main(str(csv_path), str(tmp_path / "bench.png"))
    assert (tmp_path / "bench.png").stat().st_size > 0


def test_bench_stops_when_an_implementation_of_ours_fails(monkeypatch):
    """Only a peer marked may_refuse is allowed to fail: our own failures end the run."""
    with_extra_impl(monkeypatch, "ours", bench.Impl(refuses_the_shape, dense=True))
    with pytest.raises(ValueError, match="297 KB"):
        bench.main(["--configs", "b2 s256 h16 sq1", "--impls", "ours", "--small-ceilings"])


def test_tokamax_peer_computes_the_same_attention():
    """The tokamax peer's wiring (K the 576-wide cache, V its first 512 channels, the heads
    over one KV head) against plain jnp, through tokamax's XLA path that runs on any
    machine; only where tokamax is installed."""
    pytest.importorskip("tokamax")
    cfg = bench.Config(2, 256, 16, 1)
    kv, _, table = bench.make_cache(cfg, seed=0)
    (q,) = bench.make_queries(cfg, 1)
    kv_dense = bench.dense_cache(kv, table)
    tokamax_out = bench.tokamax_decode("xla")(q, kv_dense).astype(np.float32)
    plain_out = bench.plain_jnp_decode(q, kv_dense).astype(np.float32)
    assert tokamax_out.shape == (2, 1, 16, bench.D_V)
    np.testing.assert_allclose(tokamax_out, plain_out, rtol=2e-2, atol=2e-2)


def test_numerics_study_at_chosen_points(tmp_path):
    """--heads/--seqlens replace the grid's points; the reference lands at the bf16 floor."""
    numerics.main(["--small", "--heads", "8", "--seqlens", "128", "--out", str(tmp_path)])
    rows = list(csv.DictReader((tmp_path / "numerics.csv").open()))
    assert {(r["seqlen"], r["h_q"]) for r in rows} == {("128", "8")}
    reference = next(r for r in rows if r["impl"] == "reference")
    assert 0.99 <= float(reference["ratio"]) <= 1.01


def test_bench_names_what_it_cannot_run(capsys):
    with pytest.raises(SystemExit):
        bench.main(["--impls", "reference,no_such_kernel", "--small-ceilings"])
    assert "no_such_kernel" in capsys.readouterr().err


def test_sharded_decode_script_on_8_host_devices():
    result = subprocess.run([sys.executable, "benchmarks/sharded_decode.py", "--small", "--host-devices", "8"],
                            cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [line for line in result.stdout.splitlines() if line.startswith("| total") or line.startswith("| per-device")]
    assert len(rows) == 8  # n = 1, 2, 4, 8 for each series
    assert all("| none |" in row for row in rows)  # no collective in any compiled step


# A device plane as jax's profiler writes it: a decode kernel and a combine that starts
# before the decode kernel ends (kernels may overlap in a trace), twice, 10 us apart.
GPU_PLANE = """
planes {
  id: 1
  name: "/device:GPU:0"
  lines {
    id: 1 name: "Stream #13(Compute)" timestamp_ns: 1000
    events { metadata_id: 1 offset_ps: 0 duration_ps: 20000000 }
    events { metadata_id: 2 offset_ps: 15000000 duration_ps: 7000000 }
    events { metadata_id: 1 offset_ps: 32000000 duration_ps: 22000000 }
    events { metadata_id: 2 offset_ps: 50000000 duration_ps: 6000000 }
  }
  lines { id: 2 name: "XLA Ops" timestamp_ns: 1000 events { metadata_id: 3 offset_ps: 0 duration_ps: 90000000 } }
  event_metadata { key: 1 value { id: 1 name: "_ZN8jax_etap12_GLOBAL__N_118decode_sm90_kernelI13__nv_bfloat16Li16EEEvNS_15MlaDecodeParamsE14CUtensorMap_st" } }
  event_metadata { key: 2 value { id: 2 name: "void jax_etap::combine_splits_kernel<__nv_bfloat16>(jax_etap::MlaDecodeParams)" } }
  event_metadata { key: 3 value { id: 3 name: "custom-call.1" } }
}
"""


def test_timeline_splits_calls_into_kernels_and_gaps():
    kernels = timeline.device_kernels(ProfileData.from_text_proto(GPU_PLANE))
    assert [timeline.kernel_kind(k.name) for k in kernels] == ["etap decode", "combine"] * 2  # stream lines only
    row = timeline.summarize(kernels, calls=2)
    assert row["span_us"] == pytest.approx(56 / 2)
    assert row["busy_us"] == pytest.approx((22 + 24) / 2)  # overlapping launches counted once
    assert row["gaps_us"] == pytest.approx(10 / 2)
    assert row["etap decode (x1)"] == pytest.approx(21) and row["combine (x1)"] == pytest.approx(6.5)


def test_timeline_says_when_the_trace_has_no_gpu():
    with pytest.raises(RuntimeError, match="no /device:GPU:0 plane"):
        timeline.device_kernels(ProfileData.from_text_proto('planes { id: 1 name: "/host:CPU" }'))


def test_timeline_ranks_host_events_per_call():
    host = """planes { id: 2 name: "/host:CPU"
      lines { id: 1 name: "python" timestamp_ns: 0
        events { metadata_id: 1 duration_ps: 4000000 } events { metadata_id: 2 duration_ps: 1000000 }
        events { metadata_id: 1 duration_ps: 2000000 } }
      event_metadata { key: 1 value { id: 1 name: "CustomCallThunk" } }
      event_metadata { key: 2 value { id: 2 name: "Execute" } } }"""
    hotspots = timeline.host_hotspots(ProfileData.from_text_proto(host), calls=2)
    assert list(hotspots.items()) == [("host CustomCallThunk", 3.0), ("host Execute", 0.5)]


def test_stall_regions_splits_the_samples_at_setmaxnreg(tmp_path):
    """benchmarks/stall_regions.py on a made-up ncu source page: the prologue, then one
    region per setmaxnreg, each with its own stall counts (gzipped like the committed ones)."""
    import gzip

    lines = [
        '"Kernel Name","void k()",',
        '"Address","Source","stall_long_sb","stall_wait","stall_long_sb (Not Issued)"',
        '"0x10","  MOV R1, c[0x0][0x28]","1","2","9"',
        '"0x20","  USETMAXREG.TRY_ALLOC.CTAPOOL UP0, 0xe0","0","0","0"',
        '"0x30","  SYNCS.PHASECHK.TRANS64.TRYWAIT P0, [R3]","30","0","9"',
        '"0x40","  USETMAXREG.DEALLOC.CTAPOOL 0x38","0","0","0"',
        '"0x50","  UTMALDG.3D [UR8], [UR4]","1,000","3","9"',
    ]
    path = tmp_path / "page.csv.gz"
    with gzip.open(path, "wt") as f:
        f.write("\n".join(lines) + "\n")
    found = stall_regions.regions(*stall_regions.read_rows(str(path)))
    assert [r.name for r in found] == ["prologue", "consumer 1", "producer 1"]
    assert [dict(r.samples) for r in found] == [
        {"long_sb": 1, "wait": 2}, {"long_sb": 30, "wait": 0}, {"long_sb": 1000, "wait": 3}
    ]


def test_clock_medians_takes_each_stamp_over_the_ctas():
    """benchmarks/clock_medians.py on made-up TSW lines of the wide kernel's clock: each
    warpgroup's name / cycles pairs in order, the median over the lines, other lines ignored."""
    lines = [
        "TSW cta 0 | wg0 QK0 4500 P0 5200 | wg1 start -250 P0in 5300\n",
        "some other output\n",
        "TSW cta 1 | wg0 QK0 4400 P0 5000 | wg1 start -300 P0in 5100\n",
        "TSW cta 2 | wg0 QK0 4700 P0 5100 | wg1 start -200 P0in 5200\n",
    ]
    assert clock_medians.parse(lines[0]) == [("wg0.QK0", 4500), ("wg0.P0", 5200), ("wg1.start", -250), ("wg1.P0in", 5300)]
    assert clock_medians.medians(lines) == [("wg0.QK0", 4500), ("wg0.P0", 5100), ("wg1.start", -250), ("wg1.P0in", 5200)]
    assert clock_medians.medians(["no clock here\n"]) == []


class StandInFlashMLA:
    """Stands in for benchmarks/peers/flashmla.py (same interface): build "flashmla_good"
    returns the attention of the first query on the first cache (jax_etap's jnp reference),
    "flashmla_wrong" that output 10% too large; each reports made-up times."""

    def __init__(self):
        self.calls = []

    def builds(self):
        return ["flashmla_good", "flashmla_wrong"]

    def measure(self, build, queries, caches, *, causal, softmax_scale, calls):
        self.calls.append(dict(build=build, queries=len(queries), caches=len(caches), causal=causal,
                               softmax_scale=softmax_scale, calls=calls))
        kv, seqlens, table = caches[0]
        out, lse = jax_etap.mla_decode(queries[0], kv, seqlens, table, causal=causal, softmax_scale=softmax_scale,
                                       implementation="xla")
        scale = 1.0 if build == "flashmla_good" else 1.1
        return dict(gpu_us=[100.0] * calls, kernel_us={"decode": 90.0, "combine": 10.0}, wall_us=150.0, out=np.asarray(out, np.float32) * scale,
                    lse=np.asarray(lse, np.float32))


def test_bench_runs_flashmla_builds_as_peers_and_checks_their_output(tmp_path, monkeypatch, capsys):
    """Every build the peer module names gets a row, checked against ours (a wrong output is
    marked DIFFERS, not dropped), and the ratio columns start with FlashMLA's builds.
    (With bench.AGREEMENT_RTOL set to 1.0, the wrong build read "ok" and this test failed.)"""
    peer = StandInFlashMLA()
    monkeypatch.setattr(bench, "flashmla_peer", lambda: peer)
    csv_path = tmp_path / "bench.csv"
    bench.main(["--configs", "b2 s256 h16 sq1", "--impls", "reference,plain_jnp,flashmla_good,flashmla_wrong",
                "--small-ceilings", "--csv", str(csv_path)])
    with csv_path.open() as f:
        header = next(csv.reader(f))
    rows = {r["impl"]: r for r in csv.DictReader(csv_path.open())}
    assert list(rows) == ["reference", "plain_jnp", "flashmla_good", "flashmla_wrong"]
    ratios = [c for c in header if c.startswith("x_")]
    assert ratios[:2] == ["x_flashmla_good", "x_flashmla_wrong"]
    assert rows["flashmla_good"]["check"].startswith("ok ")
    assert rows["flashmla_wrong"]["check"].startswith("DIFFERS ")
    # Same inputs for the peer as for ours: the rotated caches, the calls, causal, the scale.
    assert {c["build"] for c in peer.calls} == {"flashmla_good", "flashmla_wrong"}
    for call in peer.calls:
        assert call == dict(call, queries=timing.CALLS, caches=timing.CPU_CACHES, causal=True,
                            softmax_scale=pytest.approx(576**-0.5), calls=timing.CALLS)
    assert timing.CALLS >= 20
    # Without a GPU time of ours, the ratio is by wall time on both sides.
    assert float(rows["reference"]["x_flashmla_good"]) == pytest.approx(150.0 / float(rows["reference"]["wall_us"]))
    assert float(rows["flashmla_good"]["gpu_us"]) == pytest.approx(100.0)
    assert rows["flashmla_good"]["kernels_us"] == "decode 90.0; combine 10.0"
    assert "| b2 s256 h16 sq1 | flashmla_wrong |" in capsys.readouterr().out


def test_bench_says_when_flashmla_is_absent(capsys, monkeypatch):
    monkeypatch.setattr(bench, "flashmla_peer", lambda: None)
    bench.main(["--configs", "b1 s64 h16 sq1", "--impls", "reference", "--small-ceilings"])
    out = capsys.readouterr().out
    assert "note: FlashMLA not run: benchmarks/peers/flashmla.py is absent" in out
    assert "note: torch ceilings not measured" in out


def test_rotation_puts_twice_the_l2_between_two_uses_of_a_cache():
    l2 = 60 * 2**20
    small = bench.Config(1, 1024, 16, 1).bytes_moved()  # 1.2 MB
    n = timing.rotation(small, l2)
    assert (n - 1) * small >= 2 * l2 > (n - 2) * small  # the fewest that do it
    assert timing.rotation(3 * l2, l2) == 1  # one cache alone streams past twice the L2
    assert timing.rotation(small, None) == timing.CPU_CACHES


def plane_of_two_calls(gap_ns: int) -> ProfileData:
    """A device plane with two calls of a decode kernel and an overlapping combine each
    (20 + 7 us from 0, 22 + 6 us from 32 us past the first), the second call ``gap_ns``
    after the first one's end."""
    second = 22_000 + gap_ns
    return ProfileData.from_text_proto(f"""
planes {{ id: 1 name: "/device:GPU:0"
  lines {{ id: 1 name: "Stream #13(Compute)" timestamp_ns: 1000
    events {{ metadata_id: 1 offset_ps: 0 duration_ps: 20000000 }}
    events {{ metadata_id: 2 offset_ps: 15000000 duration_ps: 7000000 }}
    events {{ metadata_id: 1 offset_ps: {second * 1000} duration_ps: 22000000 }}
    events {{ metadata_id: 2 offset_ps: {(second + 18_000) * 1000} duration_ps: 6000000 }} }}
  event_metadata {{ key: 1 value {{ id: 1 name: "decode_sm90_kernel" }} }}
  event_metadata {{ key: 2 value {{ id: 2 name: "combine_splits_kernel" }} }} }}""")


def test_gpu_spans_are_each_calls_first_kernel_start_to_last_kernel_end(monkeypatch):
    """Each call's span on the device plane (overlapping kernels counted once), each
    kernel's median time in a call, and the first call's output."""
    monkeypatch.setattr(timing, "trace", lambda run: (run(), plane_of_two_calls(gap_ns=2_000_000))[1])
    monkeypatch.setattr(timing, "IDLE_S", 0.0)  # the calls here take no GPU time to wait for
    spans, kernels, first = timing.gpu_spans(lambda x: x * 2, [(np.float32(1),), (np.float32(5),)], calls=2)
    assert spans == pytest.approx([22e-6, 24e-6])
    assert list(kernels) == ["decode_sm90_kernel", "combine_splits_kernel"]
    assert kernels["decode_sm90_kernel"] == pytest.approx(21.0) and kernels["combine_splits_kernel"] == pytest.approx(6.5)
    assert float(first) == 2.0


@pytest.mark.parametrize("name, short", [
    ("void jax_etap::(anonymous namespace)::decode_sm90_kernel<__nv_bfloat16, 16>(jax_etap::MlaDecodeParams, CUtensorMap)",
     "decode_sm90_kernel"),
    ("flash::flash_fwd_splitkv_mla_kernel<Flash_fwd_kernel_traits_mla<576, 64, 64, 8, cutlass::bfloat16_t, 512>, "
     "flash::SharedStorageMLA<T>>(Flash_fwd_mla_params)", "flash_fwd_splitkv_mla_kernel"),
    ("input_reduce_fusion", "input_reduce_fusion"),
])
def test_short_kernel_names_drop_templates_and_namespaces(name, short):
    assert gpu_trace.short_name(name) == short


def test_split_calls_refuses_kernels_it_cannot_tell_apart():
    kernels = gpu_trace.device_kernels(plane_of_two_calls(gap_ns=10_000))  # 10 us: less than the idle mark
    with pytest.raises(RuntimeError, match="1 groups apart by 500 us idle, for 2 calls"):
        gpu_trace.split_calls(kernels, 2, idle_ns=500_000)
    assert [len(c) for c in gpu_trace.split_calls(kernels, 1, idle_ns=500_000)] == [4]


@pytest.mark.parametrize("peer", ["plain_jnp", "dot_product_attention"])
def test_dense_peers_compute_the_same_attention_as_the_oracle(peer):
    """The README's speedups over the JAX peers rest on the peers computing our attention:
    each, on the dense layout the benchmark gives it, against the float64 oracle of
    mla_decode on the paged cache (full-length sequences, s_q 1, as in the grid).
    Broken on purpose once: plain jnp's scale as 512 ** -0.5 failed this test."""
    from jax_etap.testing import mla_decode_numpy, random_paged_cache, relative_error, to_f32

    kq, kc = jax.random.split(jax.random.key(7))
    kv, seqlens, table = random_paged_cache(kc, 2, 256)
    q = jax.random.normal(kq, (2, 1, 16, bench.D_QK), jax.numpy.bfloat16)
    exact, _ = mla_decode_numpy(to_f32(q), to_f32(kv).astype(np.float64), np.asarray(seqlens), np.asarray(table),
                                head_dim_v=bench.D_V, causal=True)
    fn = {"plain_jnp": bench.plain_jnp_decode, "dot_product_attention": bench.xla_attention_decode}[peer]
    got = jax.jit(fn)(q, bench.dense_cache(kv, table))
    # bf16 operands and probabilities: 4.1e-3 (plain jnp) and 2.3e-3 measured on this case;
    # an indexing or scale bug is O(1).
    assert relative_error(to_f32(got), exact) < 1e-2


def test_sparse_bench_runs_end_to_end_on_a_cpu(tmp_path, capsys):
    """benchmarks/sparse_bench.py at tiny sizes: a row per config and implementation, in
    the table and the CSV, rates from the bytes of the selected rows."""
    import sparse_bench

    path = tmp_path / "sparse.csv"
    sparse_bench.main(["--configs", "b2 h4 sq1 k64 bf16,b1 h4 sq2 k64 fp8", "--context", "256", "--small-ceilings",
                       "--csv", str(path)])
    out = capsys.readouterr().out
    assert "| b2 h4 sq1 k64 bf16 | reference |" in out and "| b1 h4 sq2 k64 fp8 | reference |" in out
    with open(path) as f:
        rows = list(csv.DictReader(f))
    assert [r["config"] for r in rows] == ["b2 h4 sq1 k64 bf16", "b1 h4 sq2 k64 fp8"]
    assert all(float(r["wall_us"]) > 0 and r["check"] == "ours" for r in rows)


def test_sparse_bench_counts_the_selected_rows():
    import sparse_bench

    cfg = sparse_bench.SparseConfig.parse("b128 h16 sq2 k2048 fp8")
    assert cfg == sparse_bench.SparseConfig(128, 16, 2, 2048, "fp8") and cfg.name == "b128 h16 sq2 k2048 fp8"
    assert cfg.bytes_moved() == 256 * 2048 * 656 + 2 * 256 * 16 * (576 + 512)
    assert sparse_bench.SparseConfig(1, 16, 1, 2048, "bf16").bytes_moved() == 2048 * 1152 + 2 * 16 * (576 + 512)
    with pytest.raises(ValueError, match="is not of the form"):
        sparse_bench.SparseConfig.parse("b1 h16 sq1 k2048 fp16")
