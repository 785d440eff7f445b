"""compute-sanitizer (memcheck, racecheck, initcheck) over small decode calls, one verdict a tool.

    python3 benchmarks/sanitize.py [--out DIR] [--tools memcheck,racecheck,initcheck]

For each tool it runs, in parallel, two Python processes under compute-sanitizer:
  * tests/sanitizer_cases.py: a handful of small `mla_decode` calls on the GPU,
    each checked against the float64 oracle on the host;
  * its ``--control TOOL`` mode: one deliberately broken kernel (through CuPy) that the
    tool must report, proof that the tool sees the process's kernels and that this
    script reads its reports right.
It then prints one line per tool, e.g.
    memcheck   CLEAN      our kernels 0 | elsewhere 0 | cases ok | control caught (1) | 41 s
A finding belongs to "our kernels" when its device-side lines name a kernel matching
OUR_KERNELS; everything else (XLA's own kernels and copies, which initcheck in particular
may flag) is counted as "elsewhere" and left in the logs, not judged.
CLEAN needs no finding in our kernels, every case matching the oracle, and (where CuPy is
there to plant it) the tool reporting the planted bug; a run where even the planted bug
went unreported is UNVERIFIED. Exit status: 0 all clean, 1 otherwise, 2 no
compute-sanitizer. Logs: DIR/<job>.<pid>.log (sanitizer), DIR/<job>.out (the program).
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
DRIVER = HERE.parent / "tests" / "sanitizer_cases.py"  # beside the tolerances and oracle it checks with
OK_MARKER = "sanitizer_cases: OK"  # the driver's last line when every case matched

OUR_KERNELS = re.compile(r"etap|mla|split_kv|combine", re.IGNORECASE)
DEFAULT_TOOLS = ("memcheck", "racecheck", "initcheck")
TOOL_FLAGS = {
    "memcheck": [],
    # Both forms of report: each hazard, and racecheck's analysis of them.
    "racecheck": ["--racecheck-report", "all"],
    "initcheck": [],
    "synccheck": [],
}
# Flags added only where this compute-sanitizer's --help lists them (versions differ):
# racecheck must follow the kernel's cp.async copies into shared memory.
OPTIONAL_FLAGS = {"racecheck": [("--racecheck-memcpy-async", "yes")]}
COMMON_FLAGS = [
    "--target-processes", "all",  # whatever process the interpreter ends up in
    "--launch-timeout", "0",  # JAX takes a while to import before its first CUDA call
    "--report-api-errors", "no",  # XLA probes the driver with calls it expects to fail
    "--print-limit", "10000",  # never let XLA's findings hide one of ours
]
SANITIZER_PLACES = ("/usr/local/cuda/bin/compute-sanitizer", "/usr/local/cuda-*/bin/compute-sanitizer",
                    "/opt/nvidia/*/compute-sanitizer/compute-sanitizer")

# Lines of a report that are not findings.
# (The program's exit status is judged from its own output instead.)
BANNERS = re.compile(
    r"^(COMPUTE-SANITIZER|ERROR SUMMARY|RACECHECK SUMMARY|LEAK SUMMARY|Target application returned"
    r"|Error: process didn't terminate successfully)"
)
# Lines saying the tool itself could not do its job.
TOOL_FAILURE = re.compile(r"Internal Sanitizer Error|not supported|Unable to", re.IGNORECASE)


@dataclasses.dataclass
class Report:
    """The findings of one or more sanitizer logs, split by whose kernel they are in."""

    ours: list[str] = dataclasses.field(default_factory=list)  # first line of each
    elsewhere: int = 0
    tool_errors: list[str] = dataclasses.field(default_factory=list)

    def add(self, other: "Report") -> None:
        self.ours += other.ours
        self.elsewhere += other.elsewhere
        self.tool_errors += other.tool_errors


def parse_report(text: str) -> Report:
    """Splits a compute-sanitizer log into findings and attributes each one.

    A finding starts at a ``========= `` line whose text is not indented and runs over the
    indented lines after it. It is ours when one of its lines other than host backtrace
    frames (which name the launching code, not the kernel) matches OUR_KERNELS.
    """
    report = Report()
    findings: list[list[str]] = []
    for line in text.splitlines():
        if not line.startswith("="):
            continue  # the program's own output, when it shares the file
        body = line.lstrip("=")
        if not body.strip():
            continue
        if body.startswith("  "):  # indented: continues the finding above
            if findings:
                findings[-1].append(body.strip())
            continue
        head = body.strip()
        if BANNERS.match(head):
            continue
        if TOOL_FAILURE.search(head):
            report.tool_errors.append(head)
            continue
        findings.append([head])
    for lines in findings:
        device_lines = [x for x in lines if not x.startswith("Host Frame")]
        if any(OUR_KERNELS.search(x) for x in device_lines):
            report.ours.append(lines[0])
        else:
            report.elsewhere += 1
    return report


def find_sanitizer(explicit: str | None) -> str | None:
    if explicit:
        return explicit
    found = shutil.which("compute-sanitizer")
    if found:
        return found
    for pattern in SANITIZER_PLACES:
        for path in sorted(glob.glob(pattern), reverse=True):
            if os.access(path, os.X_OK):
                return path
    return None


def driver_environment() -> dict[str, str]:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    # Small memory, and one cudaMalloc per XLA buffer: with XLA's default arena allocator
    # an overrun into a neighbouring buffer of the arena is invisible to memcheck.
    env["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
    env["XLA_PYTHON_CLIENT_ALLOCATOR"] = "platform"
    # No autotuning: it would launch (and sanitize) many kernels of no interest.
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_gpu_autotune_level=0").strip()
    return env


def tool_command(sanitizer: str, tool: str, help_text: str, log_pattern: str, program: list[str]) -> list[str]:
    flags = list(TOOL_FLAGS[tool])
    for flag, value in OPTIONAL_FLAGS.get(tool, []):
        if flag in help_text:
            flags += [flag, value]
    return [sanitizer, "--tool", tool, *COMMON_FLAGS, *flags, "--log-file", log_pattern, *program]


@dataclasses.dataclass
class Result:
    """What one sanitized process gave: exit status (None: killed at the deadline), the
    findings in its sanitizer logs, its own output, and how long it ran."""

    status: int | None
    report: Report
    output: str
    seconds: float


def run_all(sanitizer: str, help_text: str, out: Path, jobs: dict[str, list[str]], timeout: float) -> dict[str, Result]:
    """Runs every job (name -> (tool, driver arguments)) under its tool, all at once."""
    started = time.monotonic()
    processes = {}
    for name, (tool, driver_args) in jobs.items():
        # %p: one log per process (XLA may start helper processes, which are sanitized too).
        command = tool_command(sanitizer, tool, help_text, str(out / f"{name}.%p.log"),
                               [sys.executable, str(DRIVER), *driver_args])
        with open(out / f"{name}.out", "w") as sink:
            sink.write(" ".join(command) + "\n\n")
            sink.flush()
            processes[name] = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, env=driver_environment())
    results = {}
    for name, process in processes.items():
        try:
            status = process.wait(timeout=max(1.0, started + timeout - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            status = None
        report = Report()
        for path in sorted(glob.glob(str(out / f"{name}.*.log"))):
            report.add(parse_report(Path(path).read_text(errors="replace")))
        output = (out / f"{name}.out").read_text(errors="replace")
        results[name] = Result(status, report, output, time.monotonic() - started)
    return results


def verdict(tool: str, cases: Result, control: Result | None) -> tuple[str, str]:
    """(status, text) of a tool: CLEAN, FAIL (a finding in our kernels, or the cases did
    not run through) or UNVERIFIED (clean, but the planted bug went unreported too)."""
    problems = []
    if cases.status is None:
        problems.append("timed out")
    elif OK_MARKER not in cases.output:
        tail = cases.output.strip().splitlines()[-1:] or ["no output"]
        problems.append(f"cases failed (exit {cases.status}): {tail[0][:160]}")
    problems += [f"sanitizer: {e[:160]}" for e in cases.report.tool_errors]
    if control is None:
        control_text = "control not run"
    elif "CuPy is not installed" in control.output:
        control_text = "control skipped (no CuPy)"
    elif control.report.ours:
        control_text = f"control caught ({len(control.report.ours)})"
    else:
        control_text = "control NOT caught"
    if cases.report.ours or problems:
        status = "FAIL"
    elif control_text == "control NOT caught":
        status = "UNVERIFIED"
        problems.append("the planted bug was not reported either: a clean result here proves nothing")
    else:
        status = "CLEAN"
    ran = "cases ok" if cases.status is not None and OK_MARKER in cases.output else "cases FAILED"
    line = (f"{tool:<10} {status:<10} our kernels {len(cases.report.ours)} | elsewhere {cases.report.elsewhere} | "
            f"{ran} | {control_text} | {cases.seconds:.0f} s")
    details = [f"    ours: {first}" for first in cases.report.ours[:5]] + [f"    {p}" for p in problems]
    return status, "\n".join([line, *details])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="device_out/sanitizer", help="folder for the logs")
    parser.add_argument("--tools", default=",".join(DEFAULT_TOOLS), help="comma-separated: memcheck,racecheck,initcheck,synccheck")
    parser.add_argument("--timeout", type=float, default=180.0, help="seconds for all runs together")
    parser.add_argument("--sanitizer", help="the compute-sanitizer executable (default: PATH, then CUDA's folders)")
    parser.add_argument("--implementation", default="cuda", help="passed to sanitizer_cases.py")
    parser.add_argument("--no-control", action="store_true", help="skip the planted-bug runs")
    args = parser.parse_args(argv)

    sanitizer = find_sanitizer(args.sanitizer)
    if sanitizer is None:
        print("sanitize: compute-sanitizer not found (PATH, " + ", ".join(SANITIZER_PLACES) + "): nothing checked")
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    help_text = subprocess.run([sanitizer, "--help"], capture_output=True, text=True).stdout
    version = subprocess.run([sanitizer, "--version"], capture_output=True, text=True).stdout.strip().splitlines()
    print(f"sanitize: {sanitizer} ({version[-1] if version else 'version unknown'})", flush=True)

    tools = [t for t in args.tools.split(",") if t]
    unknown = sorted(set(tools) - set(TOOL_FLAGS))
    if unknown:
        parser.error(f"unknown tools {unknown}")
    jobs = {tool: (tool, ["--implementation", args.implementation]) for tool in tools}
    if not args.no_control:
        jobs.update({f"{tool}-control": (tool, ["--control", tool]) for tool in tools})
    results = run_all(sanitizer, help_text, out, jobs, args.timeout)

    statuses = []
    for tool in tools:
        status, text = verdict(tool, results[tool], results.get(f"{tool}-control"))
        statuses.append(status)
        print(text, flush=True)
    clean = all(s == "CLEAN" for s in statuses)
    print(f"sanitize: {'all clean' if clean else 'NOT clean'}; logs in {out}", flush=True)
    return 0 if clean else 1


if __name__ == "__main__":
    sys.exit(main())
