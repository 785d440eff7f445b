"""Running a test file under pytest in a fresh process with 8 CPU host devices.

jax fixes its device count when its backend starts, and the rest of the suite runs on one
device, so the multi-device checks (tests/*sharded_checks.py) run in a process of their own
(JAX_PLATFORMS=cpu there, also on a GPU machine).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def run_on_8_host_devices(checks: Path) -> tuple[subprocess.CompletedProcess, str, str]:
    """(the finished process, pytest's summary line, the tail of its output to report)."""
    flags = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
    env = dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu")
    command = [sys.executable, "-P", "-m", "pytest", "-q", "-p", "no:cacheprovider", str(checks)]
    proc = subprocess.run(command, cwd=checks.parent.parent, env=env, capture_output=True, text=True, timeout=900)
    report = proc.stdout[-30000:] + proc.stderr[-5000:]
    return proc, proc.stdout.strip().splitlines()[-1], report
