"""The CUDA kernels as ptxas compiles them: no serialised wgmma, no register spills, no
descriptor moves inside an HGMMA chain.

When ptxas serialises a kernel's wgmma (its "Potential Performance Loss" notes, C7510 to
C7520), every warpgroup MMA of the kernel waits for the one before: the results stay
right and the kernel gets up to ~2x slower, which no test of values can see (two such
causes were met building the wide kernel's seesaw schedule; docs/design.md). Spills move
registers to local memory. The report is `benchmarks/resources.sh`'s, the one RESULTS.md's
resource tables come from. Needs nvcc (CI has it), no GPU.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc to compile the kernels")

# "kernel<type N> <stack> bytes stack frame, <stores> bytes spill stores, <loads> bytes spill loads ..."
RESOURCE_LINE = re.compile(r"^(\w+)<[^>]*> \d+ bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", re.M)


def resource_report(tree: Path = ROOT) -> str:
    """`benchmarks/resources.sh`'s report of the kernels in `tree`'s csrc/ (sm90/, sm80/, combine/)."""
    result = subprocess.run(["bash", str(ROOT / "benchmarks" / "resources.sh"), str(tree)], capture_output=True,
                            text=True, timeout=1200)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


@pytest.fixture(scope="module")
def report() -> str:
    return resource_report()


def serialised_wgmma(report: str) -> list[str]:
    return [line for line in report.splitlines() if "serialised wgmma" in line]


def test_no_kernel_has_serialised_wgmma(report):
    serialised = serialised_wgmma(report)
    assert not serialised, "\n".join(serialised)


@pytest.mark.parametrize("kernel", [
    "decode_sm90_kernel",
    "decode_sm90_wide_kernel",
    "decode_sm80_kernel",
    "combine_splits_kernel",
])
def test_kernel_does_not_spill(report, kernel):
    lines = [m for m in RESOURCE_LINE.finditer(report) if m.group(1) == kernel]
    assert lines, f"no resource line for {kernel} in the report:\n{report}"
    spilling = [m.group(0) for m in lines if int(m.group(2)) or int(m.group(3))]
    assert not spilling, "\n".join(spilling)


# "kernel<type N>: <n> HGMMA, <m> R2UR inside HGMMA chains, ..." (only with cuobjdump on PATH)
CHAIN_LINE = re.compile(r"^(\w+)<[^>]*>: (\d+) HGMMA, (\d+) R2UR inside HGMMA chains", re.M)


def descriptor_moves(report: str) -> list[str]:
    """The report's Hopper kernels with an R2UR inside an HGMMA chain (asserts there are any)."""
    chains = [m for m in CHAIN_LINE.finditer(report) if int(m.group(2))]
    assert chains, f"no Hopper kernel's SASS in the report:\n{report}"
    return [m.group(0) for m in chains if int(m.group(3))]


@pytest.mark.skipif(shutil.which("cuobjdump") is None, reason="needs cuobjdump to read the SASS")
def test_no_descriptor_moves_inside_hgmma_chains(report):
    """An R2UR between the HGMMAs of one group means the kernel's descriptors are
    computed per thread, because ptxas could not prove them warp-uniform; ptxas says
    nothing. Making them uniform removed 66-277 such moves per kernel and gained
    1.04-1.11x at 64+ rows (H200, 2026-12-02, f8dd2f2)."""
    moving = descriptor_moves(report)
    assert not moving, "\n".join(moving)
