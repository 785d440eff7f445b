"""Which thunks XLA put into command buffers (CUDA graphs), from its conversion-pass log.

    TF_CPP_MIN_LOG_LEVEL=0 TF_CPP_VMODULE=command_buffer_conversion_pass=2 python ... 2> LOG
    python benchmarks/command_buffer_log.py LOG

XLA forms command buffers on its thunk sequence after HLO optimisation, so the optimised
HLO does not show them; the pass logs "Creating command buffer thunk NAME with the
following thunks: a, b, ..." (HLO instruction names) for each one. This prints, per
command buffer, how many thunks it holds and which of them are while loops (a captured
loop takes its whole body, custom calls included) or FFI custom calls.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

CREATED = re.compile(r"Creating command buffer thunk (\S+) with the following thunks: (.*)$")
NOTABLE = re.compile(r"^(while|ffi_call|custom-call)")


def summarize(log: str) -> list[str]:
    lines = []
    for line in log.splitlines():
        created = CREATED.search(line)
        if created:
            thunks = [t.strip() for t in created.group(2).split(",") if t.strip()]
            notable = [t for t in thunks if NOTABLE.match(t)]
            lines.append(f"{created.group(1)}: {len(thunks)} thunks; loops and FFI calls: {', '.join(notable) or 'none'}")
    return lines


def main() -> None:
    lines = summarize(Path(sys.argv[1]).read_text(errors="replace"))
    print("\n".join(lines) if lines else "no 'Creating command buffer thunk' line: none formed, or the log level was not honoured")


if __name__ == "__main__":
    main()
