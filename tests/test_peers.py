"""CPU tests of benchmarks/peers: the modules import without torch, an absent FlashMLA gives
no builds, and the per-call grouping of a profiler trace (torch_trace.py, checked on a
synthetic trace).

Broken on purpose once: with ``call_spans`` matching a GPU activity to the call whose range
holds the activity's own start (instead of its launch's, on the range's thread), five of
the trace tests failed, the PDL-overlapped combine of call 0 among them."""

from __future__ import annotations

import importlib
import sys

import pytest


def load_script(name: str):
    """benchmarks/<name>.py imported afresh (benchmarks/ is on pytest's pythonpath), so that
    an import under the no_torch fixture really runs without torch."""
    module = name.replace("/__init__", "").replace("/", ".")
    sys.modules.pop(module, None)
    return importlib.import_module(module)


@pytest.fixture
def no_torch(monkeypatch):
    """`import torch` fails, as on a machine without it."""
    monkeypatch.setitem(sys.modules, "torch", None)


@pytest.fixture
def flashmla(no_torch):
    return load_script("peers/flashmla")


@pytest.fixture
def torch_trace(no_torch):
    return load_script("peers/torch_trace")


def test_modules_import_without_torch(no_torch):
    load_script("peers/__init__")
    load_script("peers/flashmla")
    load_script("peers/torch_ceilings")
    load_script("peers/torch_trace")
    load_script("peers/torch_step")


def test_no_build_on_the_path_gives_no_builds(flashmla, monkeypatch, tmp_path):
    monkeypatch.setattr(sys, "path", [str(tmp_path)])
    assert flashmla.builds() == []


def test_a_build_that_cannot_import_raises(flashmla, monkeypatch, tmp_path):
    (tmp_path / "flashmla_0123abc.py").write_text("")
    monkeypatch.setattr(sys, "path", [str(tmp_path)])
    with pytest.raises(ImportError):
        flashmla.builds()


def test_measure_refuses_too_few_calls(flashmla):
    with pytest.raises(ValueError, match="calls must be >= 20"):
        flashmla.measure("flashmla_0123abc", [object()], [object()], causal=True, softmax_scale=0.1, calls=19)


def test_ceilings_refuse_too_few_reps(no_torch):
    ceilings = load_script("peers/torch_ceilings")
    with pytest.raises(ValueError, match="reps must be >= 20"):
        ceilings._check_reps(19)


def _annotation(i, ts, dur, tid=7):
    return {"ph": "X", "cat": "user_annotation", "name": f"timed_call_{i}", "ts": ts, "dur": dur, "tid": tid}


def _launch(corr, ts, tid=7, name="cudaLaunchKernel", cat="cuda_runtime"):
    return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": 2, "tid": tid, "args": {"correlation": corr}}


def _gpu(corr, ts, dur, name="kernel_x", cat="kernel"):
    return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur, "tid": 100, "args": {"correlation": corr}}


def _two_calls():
    """Call 0 launches a split kernel and a combine that runs after call 1's range has begun
    (it overlaps call 1's first kernel, as programmatic dependent launch allows); call 1
    launches a kernel (driver API) and a memset."""
    return [
        _annotation(0, 0, 10), _annotation(1, 10, 10),
        _launch(1, 1), _gpu(1, 5, 20, "split"),
        _launch(2, 4, name="cudaLaunchKernelExC"), _gpu(2, 25, 8, "combine"),
        _launch(3, 11, name="cuLaunchKernelEx", cat="cuda_driver"), _gpu(3, 30, 40, "split"),
        _launch(4, 15, name="cudaMemsetAsync"), _gpu(4, 71, 1, "memset", cat="gpu_memset"),
        {"ph": "X", "cat": "cpu_op", "name": "aten::empty", "ts": 2, "dur": 1, "tid": 7},
    ]


def test_spans_run_from_first_start_to_last_end(torch_trace):
    assert torch_trace.call_spans(_two_calls(), 2) == [33 - 5, 72 - 30]


def test_kernel_that_runs_after_its_range_counts_for_its_call(torch_trace):
    events = _two_calls()
    spans = torch_trace.call_spans(events, 2)
    combine_late = [e for e in events if e.get("name") == "combine"][0]
    combine_late["ts"] = 60  # long after call 0's range closed, while call 1's kernel runs
    assert torch_trace.call_spans(events, 2) == [68 - 5, spans[1]]


def test_launch_on_another_thread_belongs_to_no_call(torch_trace):
    events = _two_calls() + [_launch(9, 12, tid=8), _gpu(9, 40, 5, "other")]
    with pytest.raises(RuntimeError, match="'other'.* 0 call ranges"):
        torch_trace.call_spans(events, 2)


def test_kernel_without_launch_raises(torch_trace):
    with pytest.raises(RuntimeError, match="no launch"):
        torch_trace.call_spans(_two_calls() + [_gpu(42, 3, 1, "orphan")], 2)


def test_call_that_launched_nothing_raises(torch_trace):
    events = _two_calls() + [_annotation(2, 20, 5)]
    with pytest.raises(RuntimeError, match=r"calls \[2\] launched no GPU work"):
        torch_trace.call_spans(events, 3)


def test_missing_call_range_raises(torch_trace):
    with pytest.raises(RuntimeError, match="call ranges"):
        torch_trace.call_spans(_two_calls(), 3)


def test_free_blocks_and_inside(flashmla):
    snapshot = [{"address": 1000, "blocks": [
        {"size": 100, "state": "active_allocated"},
        {"size": 50, "state": "inactive"},
        {"size": 30, "state": "active_allocated"},
        {"size": 20, "state": "inactive"},
    ]}]
    blocks = flashmla.free_blocks(snapshot)
    assert blocks == [(1100, 50), (1180, 20)]
    assert flashmla.inside(1100, 50, blocks)
    assert flashmla.inside(1185, 15, blocks)
    assert not flashmla.inside(1140, 20, blocks)  # runs past the block's end
    assert not flashmla.inside(1000, 10, blocks)  # an allocated block
