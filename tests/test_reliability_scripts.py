"""The reliability scripts (run on the GPU by benchmarks/reliability_run.sh), exercised on
any backend so that they are known to run before they reach the device:

* sanitize.py: its reading of compute-sanitizer reports (on report text in the formats
  the tool prints), and the whole run - driver, logs, verdicts, exit status - with a
  stand-in for compute-sanitizer that runs the real driver and writes canned reports;
* tests/soak.py with ``--steps 200 --small``; benchmarks/numerics.py with ``--small``.
"""

from __future__ import annotations

import csv
import os
import stat
import sys
from pathlib import Path

import command_buffer_log
import numerics
import pytest
import sanitize
import soak

OUR_KERNEL = "void jax_etap::(anonymous namespace)::split_kv_decode_kernel<__nv_bfloat16, 16>(jax_etap::MlaDecodeParams)"
OUR_OUT_OF_BOUNDS = f"""========= COMPUTE-SANITIZER
========= Invalid __global__ read of size 16 bytes
=========     at {OUR_KERNEL}+0x1a30 in split_kv_decode.cu:96
=========     by thread (5,0,0) in block (3,1,0)
=========     Address 0x7f3a00400000 is out of bounds
=========     Saved host backtrace up to driver entry point at kernel launch time
=========         Host Frame: cuLaunchKernel [0x2f1c4] in libcuda.so.1
=========
"""
# An XLA kernel's finding, launched from a Python function whose name happens to contain
# "mla": host frames name the launching code, not the kernel, so it is not ours.
XLA_OUT_OF_BOUNDS = """========= Invalid __global__ read of size 4 bytes
=========     at loop_add_fusion+0x70
=========     by thread (3,0,0) in block (0,0,0)
=========     Address 0x7f00 is out of bounds
=========     Saved host backtrace up to driver entry point at kernel launch time
=========         Host Frame: run_mla_step [0x1234] in python3
=========
========= ERROR SUMMARY: 2 errors
"""
OUR_RACE = f"""========= COMPUTE-SANITIZER
========= Error: Race reported between Write access at {OUR_KERNEL}+0x1a30 in split_kv_decode.cu:240
=========     and Read access at {OUR_KERNEL}+0x1b80 in split_kv_decode.cu:262 [256 hazards]
=========
========= RACECHECK SUMMARY: 1 hazard displayed (1 error, 0 warnings)
"""
XLA_UNINITIALISED_COPY = """========= COMPUTE-SANITIZER
========= Host API memory access error at host access to 0x7f1200000000 of size 64 bytes
=========     Uninitialized access at 0x7f1200000020 on access by cudaMemcpyAsync source
=========
========= ERROR SUMMARY: 1 error
"""
CONTROL_CAUGHT = """========= COMPUTE-SANITIZER
========= Invalid __global__ read of size 4 bytes
=========     at etap_control_out_of_bounds+0x90
=========     by thread (0,0,0) in block (0,0,0)
=========
========= ERROR SUMMARY: 1 error
"""
CLEAN = "========= COMPUTE-SANITIZER\n========= ERROR SUMMARY: 0 errors\n"


def test_sanitizer_findings_are_attributed_by_kernel_name():
    report = sanitize.parse_report(OUR_OUT_OF_BOUNDS + XLA_OUT_OF_BOUNDS)
    assert report.ours == ["Invalid __global__ read of size 16 bytes"]
    assert report.elsewhere == 1 and not report.tool_errors
    race = sanitize.parse_report(OUR_RACE)
    assert len(race.ours) == 1 and race.ours[0].startswith("Error: Race reported between Write access")
    copy = sanitize.parse_report(XLA_UNINITIALISED_COPY)
    assert copy.ours == [] and copy.elsewhere == 1


def test_sanitizer_banners_and_program_output_are_not_findings():
    text = CLEAN + "ok bf16-paged64-h16\n========= Target application returned an error\n"
    assert sanitize.parse_report(text) == sanitize.Report()


def test_sanitizer_failing_to_run_is_reported():
    report = sanitize.parse_report("========= Internal Sanitizer Error: The Sanitizer failed to attach\n")
    assert report.tool_errors and not report.ours


STAND_IN = """#!{python}
# Stands in for compute-sanitizer: runs the program (but not the CuPy controls, which
# need a GPU) and writes a canned report for the tool into the --log-file.
import os, subprocess, sys
reports = {reports!r}
args = sys.argv[1:]
if args[0] in ("--help", "--version"):
    print("stand-in compute-sanitizer")
    sys.exit(0)
tool = args[args.index("--tool") + 1]
at = args.index("--log-file")
log, program = args[at + 1].replace("%p", str(os.getpid())), args[at + 2:]
control = "--control" in program
status = 0 if control else subprocess.call(program)
with open(log, "w") as f:
    f.write(reports["control" if control else tool])
sys.exit(status)
"""


def test_sanitize_run_gives_one_verdict_per_tool(tmp_path, capsys):
    """memcheck: only XLA's finding (clean); racecheck: a race in our kernel (fail)."""
    stand_in = tmp_path / "compute-sanitizer"
    reports = {"memcheck": CLEAN + XLA_OUT_OF_BOUNDS, "racecheck": OUR_RACE, "control": CONTROL_CAUGHT}
    stand_in.write_text(STAND_IN.format(python=sys.executable, reports=reports))
    stand_in.chmod(stand_in.stat().st_mode | stat.S_IXUSR)
    status = sanitize.main(["--sanitizer", str(stand_in), "--tools", "memcheck,racecheck", "--out", str(tmp_path / "logs"),
                            "--implementation", "xla", "--timeout", "120"])
    lines = capsys.readouterr().out.splitlines()
    memcheck = next(x for x in lines if x.startswith("memcheck"))
    racecheck = next(x for x in lines if x.startswith("racecheck"))
    assert memcheck.split()[1] == "CLEAN" and "our kernels 0 | elsewhere 1 | cases ok | control caught (1)" in memcheck
    assert racecheck.split()[1] == "FAIL" and "our kernels 1 |" in racecheck
    assert status == 1
    assert "sanitizer_cases: OK" in (tmp_path / "logs" / "memcheck.out").read_text()


def _rows(path: Path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


def test_soak_smoke(tmp_path):
    assert soak.main(["--steps", "200", "--small", "--out", str(tmp_path)]) == 0
    rows = _rows(tmp_path / "soak.csv")
    assert [int(r["steps"]) for r in rows] == [50, 100, 150, 200]
    assert all(float(r["kernel_vs_float64"]) <= 1e-2 for r in rows)


@pytest.mark.skipif(os.environ.get("JAX_PLATFORMS", "") not in ("", "cpu"), reason="the --small run is for CPU")
def test_numerics_small(tmp_path):
    """The reference computes in float32 and rounds once: its bf16 output is at the floor."""
    assert numerics.main(["--small", "--out", str(tmp_path)]) == 0
    rows = _rows(tmp_path / "numerics.csv")
    assert {r["impl"] for r in rows} >= {"floor", "reference"}
    assert all(float(r["ratio"]) == 1.0 for r in rows if r["impl"] == "floor")
    assert all(float(r["ratio"]) <= 1.1 for r in rows if r["impl"] == "reference")


def test_command_buffer_log_names_captured_loops_and_ffi_calls():
    log = "\n".join([
        "I1125 17:02:13.16 1917 command_buffer_conversion_pass.cc:652] Module jit_loop CommandBufferConfig: enabled_commands: [FUSION]",
        "I1125 17:02:13.16 1917 command_buffer_conversion_pass.cc:392] Thunk kind kWhile lowering is not enabled by the user",
        "I1125 17:02:13.16 1917 command_buffer_conversion_pass.cc:564] Creating command buffer thunk with the following"
        " thunks: input_scatter_fusion, ffi_call.24, loop_convert_fusion",
        "I1125 17:02:14.00 1917 command_buffer_conversion_pass.cc:652] Module jit_step CommandBufferConfig: enabled_commands: [WHILE]",
        "I1125 17:02:14.01 1917 command_buffer_conversion_pass.cc:564] Creating command buffer thunk command_buffer_7"
        " with the following thunks: loop_add_fusion.2, while.14",
    ])
    summary = command_buffer_log.summarize(log)
    assert summary == [
        "jit_loop: command buffer of 3 thunks; loops and FFI calls: ffi_call.24",
        "jit_step: command buffer command_buffer_7 of 2 thunks; loops and FFI calls: while.14",
    ]
    assert command_buffer_log.summarize("nothing here") == []
