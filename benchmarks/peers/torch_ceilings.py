"""The GPU's ceilings as torch reaches them, measured in the process that times the peers:
a device-to-device copy (bytes read plus written) and a bf16 matmul, each the median of
``reps`` runs timed by CUDA events, and the L2 size the working sets are held against."""

from __future__ import annotations

import statistics

MIN_REPS = 20
WARM_UP = 3


def copy_gbps(gib: float = 2.0, reps: int = 30) -> float:
    """GB/s (1e9 bytes) of ``dst.copy_(src)`` over ``gib`` GiB, counting each byte read and
    each byte written."""
    import torch  # lazily: this module imports on machines without torch

    _check_reps(reps)
    nbytes = int(gib * (1 << 30))
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    seconds = _median_seconds(torch, lambda: dst.copy_(src), reps)
    return 2 * nbytes / seconds / 1e9


def matmul_tflops(n: int = 8192, reps: int = 30) -> float:
    """TFLOP/s (2 n^3 per product) of an n x n x n bf16 matmul of random operands."""
    import torch

    _check_reps(reps)
    a = torch.randn(n, n, dtype=torch.bfloat16, device="cuda")
    b = torch.randn(n, n, dtype=torch.bfloat16, device="cuda")
    seconds = _median_seconds(torch, lambda: a @ b, reps)
    return 2 * n**3 / seconds / 1e12


def l2_bytes() -> int:
    """The current GPU's L2 cache size in bytes."""
    import torch

    return int(torch.cuda.get_device_properties(torch.cuda.current_device()).L2_cache_size)


def _check_reps(reps: int) -> None:
    if reps < MIN_REPS:
        raise ValueError(f"reps must be >= {MIN_REPS}, got {reps}")


def _median_seconds(torch, run, reps: int) -> float:
    for _ in range(WARM_UP):
        run()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
              for _ in range(reps)]
    for start, end in events:
        start.record()
        run()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(start.elapsed_time(end) for start, end in events) / 1e3

