"""Plot and summarize the cluster-autoscaling e2e run's timeline.

Run the e2e with the timeline saved, then plot it:

    FLEETSERVE_CA_TIMELINE=/tmp/ca.json .venv/bin/python -m pytest \\
        tests/e2e/test_cluster_autoscaling_fleet.py -k fleet_grows
    .venv/bin/python benchmarks/cluster_autoscaling_plot.py /tmp/ca.json \\
        --png benchmarks/cluster_autoscaling_timeline.png

Prints the figures BENCHMARKS.md quotes (seconds from the load's start): the scale-up
decision, pods waiting for nodes, nodes Ready, all replicas Ready, scale-down, and the
requests served and failed.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any


def first(rows: list[dict[str, Any]], t0: float, pred: Any, after: float = 0.0) -> float | None:
    for row in rows:
        if "error" not in row and row["t"] - t0 >= after and pred(row):
            return float(row["t"] - t0)
    return None


def summarize(data: dict[str, Any]) -> dict[str, Any]:
    rows = [r for r in data["rows"] if "error" not in r]
    t0 = rows[0]["t"]
    peak = max(r["desired"] or 0 for r in rows)
    up = first(rows, t0, lambda r: (r["desired"] or 0) >= 2)
    waiting = first(rows, t0, lambda r: r["waiting"] > 0)
    nodes_added = first(rows, t0, lambda r: r["nodes"] > rows[0]["nodes"])
    nodes_ready = first(rows, t0, lambda r: r["ready_nodes"] == r["nodes"] > rows[0]["nodes"])
    all_ready = first(rows, t0, lambda r: (r["ready"] or 0) >= peak)
    load_end = first(rows, t0, lambda r: r["in_flight"] == 0, after=all_ready or 0)
    down = first(rows, t0, lambda r: r["desired"] == 1, after=all_ready or 0)
    nodes_gone = first(rows, t0, lambda r: r["nodes"] == rows[0]["nodes"], after=down or 0)
    return {"peak_desired": peak, "scale_up_s": up, "waiting_for_nodes_s": waiting, "nodes_created_s": nodes_added,
            "nodes_ready_s": nodes_ready, "all_replicas_ready_s": all_ready, "load_stopped_s": load_end,
            "scaled_down_s": down, "nodes_removed_s": nodes_gone, "requests_ok": data["ok"],
            "requests_failed": data["failed"], "provision_delay_s": data["provision_s"],
            "max_desired_while_waiting": max((r["desired"] or 0) for r in rows if r["waiting"]) if any(
                r["waiting"] for r in rows) else None}


def plot_timeline(data: dict[str, Any], png: Path, counts: list[tuple[str, str, str]], title: str) -> None:
    """Load on top; desired/ready replicas and the ``counts`` series (row key, label, line style) below."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in data["rows"] if "error" not in r]
    t0 = rows[0]["t"]
    t = [r["t"] - t0 for r in rows]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(10, 6), sharex=True)
    top.plot(t, [r["in_flight"] for r in rows], label="requests in flight", color="tab:gray")
    top.set_ylabel("load")
    top.legend(loc="upper right")
    bottom.step(t, [r["desired"] or 0 for r in rows], where="post", label="desired replicas")
    bottom.step(t, [r["ready"] or 0 for r in rows], where="post", label="ready replicas")
    for key, label, style in counts:
        bottom.step(t, [r[key] for r in rows], where="post", label=label, linestyle=style)
    bottom.set_xlabel("seconds since the load started")
    bottom.set_ylabel("count")
    bottom.legend(loc="upper right", fontsize="small")
    fig.suptitle(f"{title}; {data['ok']} requests ok, {data['failed']} failed)")
    fig.tight_layout()
    fig.savefig(png, dpi=100)


def plot(data: dict[str, Any], png: Path) -> None:
    plot_timeline(data, png, [("waiting", "pods waiting for nodes", "--"), ("nodes", "nodes", ":"),
                              ("ready_nodes", "Ready nodes", "-.")],
                  f"Fleet on autoscaled GPU nodes (provisioning delay {data['provision_s']} s")


def cli(doc: str | None, env_var: str, summarize: Callable[[dict[str, Any]], dict[str, Any]],
        plot: Callable[[dict[str, Any], Path], None]) -> int:
    """Print the timeline's summary as JSON; with --png, plot it too."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("timeline", type=Path, help=f"the JSON the e2e wrote (${env_var})")
    parser.add_argument("--png", type=Path, default=None, help="write the plot here")
    args = parser.parse_args()
    data = json.loads(args.timeline.read_text())
    print(json.dumps(summarize(data), indent=1))
    if args.png:
        plot(data, args.png)
    return 0


def main() -> int:
    return cli(__doc__, "FLEETSERVE_CA_TIMELINE", summarize, plot)


if __name__ == "__main__":
    raise SystemExit(main())
