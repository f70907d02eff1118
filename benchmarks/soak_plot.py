"""One plot of RSS over time for several `benchmarks/soak.py` results (before/after side by side).

    .venv/bin/python benchmarks/soak_plot.py --out benchmarks/results/soak30_rss.png \\
        benchmarks/results/soak30_before.json benchmarks/results/soak30_after.json ...
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    fig, ax = plt.subplots(figsize=(9, 4.5))
    warmup = 0.0
    for path in args.results:
        r = json.loads(path.read_text())
        warmup = max(warmup, r["warmup_minutes"])
        xs = [s["t"] / 60 for s in r["samples"]]
        ys = [s["rss_bytes"] / 2**20 for s in r["samples"]]
        flags = " ".join(r.get("server_flags") or [])
        ax.plot(xs, ys, label=f"{r['label']} ({r['rss_slope_mb_per_min']:+.2f} MB/min) {flags}".strip())
    ax.axvline(warmup, color="grey", linestyle=":", label="end of warm-up")
    ax.set_xlabel("minutes")
    ax.set_ylabel("server RSS (MiB)")
    ax.set_title("fleetserve serve (builtin, CPU, 1 thread) under 80 % load: RSS over time")
    ax.legend(loc="upper left", fontsize=7)
    fig.tight_layout()
    fig.savefig(args.out, dpi=100)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
