"""Draw bench.png from summary.json: ``python plot.py summary.json bench.png``.

Run by the peers' interpreter (``benchmarks/.peers/py``), which has matplotlib; govflow's
own environment does not need it.
"""

# mypy: disable-error-code="import-not-found,untyped-decorator"
# (the peers' packages live in benchmarks/.peers/py, not in govflow's environment)

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def main(src: Path, dst: Path) -> None:
    summary = json.loads(src.read_text())
    drain, steady = summary["drain"], summary["steady"]
    systems = [s for s in summary["versions"] if s in drain]
    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(16, 5))
    palette = {"govflow": "#2b6cb0", "reference": "#2f855a"}  # the limit, in green
    colors = [palette.get(s, "#a0aec0") for s in systems]

    rates = [drain[s]["events_per_s"] for s in systems]
    low = [drain[s]["events_per_s"] - drain[s]["events_per_s_min"] for s in systems]
    high = [drain[s]["events_per_s_max"] - drain[s]["events_per_s"] for s in systems]
    ax1.bar(systems, rates, yerr=[low, high], color=colors, capsize=4)
    ax1.set_title("Backlog drain (events/s, median, min-max)")
    for i, r in enumerate(rates):
        ax1.text(i, r, f"{r:,.0f}", ha="center", va="bottom")

    with_steady = [s for s in systems if s in steady and "skipped" not in steady[s]]
    x = range(len(with_steady))
    for offset, key in ((-0.2, "p50_ms"), (0.2, "p99_ms")):
        ax2.bar([i + offset for i in x], [steady[s][key] for s in with_steady], width=0.4,
                label=key.replace("_ms", ""))  # fmt: skip
    ax2.set_xticks(list(x), with_steady)
    ax2.set_yscale("log")
    ax2.set_ylim(bottom=1)
    ax2.set_title(f"Steady load {summary['options']['rate']:.0f}/s: latency (ms, log)")
    ax2.legend()

    scaling = summary["scaling"]["govflow"]
    ax3.plot([int(p) for p in scaling], list(scaling.values()), marker="o", color="#2b6cb0")
    ax3.set_xticks([int(p) for p in scaling])
    ax3.set_title("govflow drain by worker processes (events/s)")
    ax3.set_ylim(bottom=0)

    cores = summary["machine"]["cores"]
    fig.suptitle(f"govflow benchmark on {cores} cores, Redis and Postgres on the same machine")
    fig.tight_layout()
    fig.savefig(dst, dpi=100)


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
