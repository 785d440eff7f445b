"""Draws a benchmark CSV (``python benchmarks/bench.py --csv``) as a PNG.

Two panels, one group of bars per config: achieved GB/s with the copy ceiling, and
achieved TFLOP/s with the bf16 matmul ceiling (both ceilings measured in the same run,
recovered from the CSV's fraction columns).

    python benchmarks/plot_bench.py benchmarks/results/results-2026-12-03-h200-d477e56.csv out.png
"""

from __future__ import annotations

import csv
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def main(csv_path: str, png_path: str) -> None:
    with open(csv_path, newline="") as f:
        # A peer that refused a config has no rates to draw (its row holds the error).
        rows = [r for r in csv.DictReader(f) if not r.get("refused")]
    configs = list(dict.fromkeys(r["config"] for r in rows))
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    value = {(r["config"], r["impl"]): r for r in rows}
    copy_ceiling = float(rows[0]["GB/s"]) / float(rows[0]["%copy"]) * 100
    matmul_ceiling = float(rows[0]["TFLOP/s"]) / float(rows[0]["%matmul"]) * 100

    fig, axes = plt.subplots(2, 1, figsize=(14, 9), sharex=True)
    x = np.arange(len(configs))
    width = 0.8 / len(impls)
    for panel, (column, ceiling, label) in enumerate(
        [("GB/s", copy_ceiling, "copy ceiling"), ("TFLOP/s", matmul_ceiling, "bf16 matmul ceiling")]
    ):
        ax = axes[panel]
        for i, impl in enumerate(impls):
            heights = [float(value[c, impl][column]) if (c, impl) in value else 0.0 for c in configs]
            ax.bar(x + (i - (len(impls) - 1) / 2) * width, heights, width, label=impl)
        ax.axhline(ceiling, color="black", linestyle="--", linewidth=1, label=f"{label} {ceiling:.0f}")
        ax.set_ylabel(f"achieved {column}")
        ax.grid(True, axis="y", alpha=0.3)
        ax.legend(fontsize=8, ncol=3)
    axes[1].set_xticks(x, configs, rotation=30, ha="right", fontsize=8)
    fig.suptitle(f"MLA decode (causal, paged, d 576 / dv 512, bf16): {csv_path.rsplit('/', 1)[-1]}")
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
    print(f"plot: {png_path}")


if __name__ == "__main__":
    main(*sys.argv[1:3])
