"""The GPU work of each timed call, read from torch.profiler: what the torch peers are
timed by (FlashMLA's calls in flashmla.py, the CUDA-graph decode step in torch_step.py).

A call is whatever ``call(i)`` launches inside its ``record_function`` range; its GPU
activities are found by correlation id from their launches (a CUDA graph's kernels carry
the id of the graph's launch), so a kernel that runs after its range has closed (e.g. one
overlapped by programmatic dependent launch) still counts for its own call.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from gpu_trace import Kernel, span_ns

CALL_RANGE = "timed_call_"  # record_function name of timed call i: CALL_RANGE + str(i)
# Chrome-trace categories: the host side of a launch, and the GPU work it starts.
LAUNCH_CATEGORIES = ("cuda_runtime", "cuda_driver")
GPU_CATEGORIES = ("kernel", "gpu_memcpy", "gpu_memset")


def call_activities(trace_events: list[dict], calls: int, prefix: str = CALL_RANGE) -> list[list[Kernel]]:
    """Per timed call, the GPU activities (kernels, copies, sets) of a torch.profiler chrome
    trace whose launch, found by correlation id, lies inside that call's ``prefix + str(i)``
    range on the same thread. Raises when a GPU activity belongs to no
    call, has no launch in the trace, or when a call launched nothing."""
    ranges: dict[int, tuple[object, float, float]] = {}
    for e in trace_events:
        if e.get("cat") == "user_annotation" and e.get("name", "").startswith(prefix):
            index = int(e["name"][len(prefix):])
            ranges[index] = (e.get("tid"), e["ts"], e["ts"] + e["dur"])
    if sorted(ranges) != list(range(calls)):
        raise RuntimeError(f"the trace holds call ranges {sorted(ranges)}, expected 0..{calls - 1}")
    launches = {e["args"]["correlation"]: e for e in trace_events
                if e.get("cat") in LAUNCH_CATEGORIES and "correlation" in e.get("args", {})}
    activities: dict[int, list[Kernel]] = {}
    for e in trace_events:
        if e.get("cat") not in GPU_CATEGORIES:
            continue
        launch = launches.get(e["args"]["correlation"])
        if launch is None:
            raise RuntimeError(f"GPU activity {e['name']!r} has no launch in the trace")
        owner = [i for i, (tid, lo, hi) in ranges.items()
                 if tid == launch.get("tid") and lo <= launch["ts"] <= hi]
        if len(owner) != 1:
            raise RuntimeError(f"GPU activity {e['name']!r} launched at {launch['ts']} us lies in "
                               f"{len(owner)} call ranges, expected 1")
        start_ns = e["ts"] * 1e3  # the chrome trace's microseconds
        activities.setdefault(owner[0], []).append(Kernel(e["name"], start_ns, start_ns + e["dur"] * 1e3))
    idle = [i for i in range(calls) if i not in activities]
    if idle:
        raise RuntimeError(f"calls {idle} launched no GPU work")
    return [sorted(activities[i], key=lambda k: k.start_ns) for i in range(calls)]


def call_spans(trace_events: list[dict], calls: int, prefix: str = CALL_RANGE) -> list[float]:
    """Per timed call, the GPU span in microseconds of its activities (`call_activities`):
    from the earliest start to the latest end."""
    return [span_ns(group) / 1e3 for group in call_activities(trace_events, calls, prefix)]


def profiled_activities(torch, call, calls: int) -> list[list[Kernel]]:
    """The GPU activities of each of ``calls`` calls of ``call(i)`` (`call_activities`),
    from one torch.profiler trace."""
    from torch.profiler import ProfilerActivity, profile, record_function

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for i in range(calls):
            with record_function(f"{CALL_RANGE}{i}"):
                call(i)
        torch.cuda.synchronize()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(path))
        events = json.loads(path.read_text())["traceEvents"]
    return call_activities(events, calls)
