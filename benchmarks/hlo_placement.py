"""Where a custom call sits in an optimised HLO dump: the chain of computations from ENTRY
down to each one that calls it, marking command buffers.

    python benchmarks/hlo_placement.py TARGET_PREFIX FILE...

XLA's command-buffer pass outlines the commands it captures into computations named
``command_buffer*``; a custom call counts as captured when one of the computations on its
chain is one (a whole while loop can be captured, its body then being a callee).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

HEADER = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) .*\{\s*$")
CALLEES = re.compile(r"(?:body|condition|to_apply|calls|called_computations|branch_computations)=\{?([^}\s]+(?:, [^}\s]+)*)\}?")


def placement(text: str, target: str) -> list[tuple[list[str], int]]:
    """For each computation holding calls to ``target``: its caller chain and the call count."""
    computation, entry = None, None
    callers: dict[str, str] = {}
    counts: dict[str, int] = {}
    for line in text.splitlines():
        header = HEADER.match(line)
        if header:
            computation = header.group(1)
            if line.startswith("ENTRY"):
                entry = computation
            continue
        if computation is None:
            continue
        for group in CALLEES.findall(line):
            for callee in group.split(", "):
                callers.setdefault(callee.lstrip("%"), computation)
        if f'custom_call_target="{target}' in line:
            counts[computation] = counts.get(computation, 0) + 1
    result = []
    for computation, count in counts.items():
        chain = [computation]
        while chain[-1] in callers and chain[-1] != entry and len(chain) < 32:
            chain.append(callers[chain[-1]])
        result.append((chain[::-1], count))
    return result


def main() -> None:
    target, files = sys.argv[1], sys.argv[2:]
    for name in files:
        for chain, count in placement(Path(name).read_text(), target):
            captured = any(c.startswith("command_buffer") for c in chain)
            print(f"{Path(name).name}: {count} call(s) in {' -> '.join(chain)}"
                  f"{'  [inside a command buffer]' if captured else '  [NOT in a command buffer]'}")


if __name__ == "__main__":
    main()
