"""Which thunks XLA put into command buffers (CUDA graphs), from its conversion-pass log.

    TF_CPP_MIN_LOG_LEVEL=0 TF_CPP_VMODULE=command_buffer_conversion_pass=2 python ... 2> LOG
    python benchmarks/command_buffer_log.py LOG

XLA forms command buffers on its thunk sequence after HLO optimisation, so the optimised
HLO does not show them; the pass logs "Creating command buffer thunk NAME with the
following thunks: a, b, ..." (HLO instruction names) for each one, after naming the
module ("Module jit_loop CommandBufferConfig: ..."). This prints, per command buffer, its
module, how many thunks it holds and which of them are while loops (a captured loop takes
its whole body) or FFI custom calls. (jax's default command types leave WHILE out: the
pass then forms command buffers inside the loop body, which is where a decode loop's
kernel calls show up.)
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

MODULE = re.compile(r"Module (\S+) CommandBufferConfig")
CREATED = re.compile(r"Creating command buffer thunk (?:(\S+) )?with the following thunks: (.*)$")
NOTABLE = re.compile(r"^(while|ffi_call|custom-call)")


def summarize(log: str) -> list[str]:
    """One line per command buffer formed: its module, size, and the loops and FFI calls in it."""
    lines, module = [], "?"
    for line in log.splitlines():
        if named := MODULE.search(line):
            module = named.group(1)
        elif created := CREATED.search(line):
            thunks = [t.strip() for t in created.group(2).split(",") if t.strip()]
            notable = [t for t in thunks if NOTABLE.match(t)]
            name = f" {created.group(1)}" if created.group(1) else ""
            lines.append(f"{module}: command buffer{name} of {len(thunks)} thunks; loops and FFI calls: "
                         f"{', '.join(notable) or 'none'}")
    return lines


def main() -> None:
    lines = summarize(Path(sys.argv[1]).read_text(errors="replace"))
    print("\n".join(lines) if lines else "no 'Creating command buffer thunk' line: none formed, or the log level was not honoured")


if __name__ == "__main__":
    main()
