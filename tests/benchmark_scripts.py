"""For the CPU tests of benchmarks/: a script (not a package) imported as a module, and the
kernel sources with benchmarks/' patches applied."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"benchmarks_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while it loads
    spec.loader.exec_module(module)
    return module


def patched_sources(dest: Path, patches: list[Path]) -> None:
    """A copy of csrc/ in `dest` with `patches` applied in order (git apply; the kernel
    patches change csrc/ only); asserts that each applies."""
    shutil.copytree(ROOT / "csrc", dest / "csrc")
    for patch in patches:
        applied = subprocess.run(["git", "apply", str(patch)], cwd=dest, capture_output=True, text=True)
        assert applied.returncode == 0, f"{patch.name}: {applied.stderr}"
