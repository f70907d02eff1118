"""Plot and summarize the Karpenter e2e run's timeline (tests/e2e/test_karpenter_fleet.py).

    FLEETSERVE_KARPENTER_TIMELINE=/tmp/k.json .venv/bin/python -m pytest tests/e2e/test_karpenter_fleet.py
    .venv/bin/python benchmarks/karpenter_plot.py /tmp/k.json --png benchmarks/karpenter_timeline.png

Prints the figures BENCHMARKS.md quotes, in seconds from the load's start: the scale-up decision,
the first NodeClaim, the new nodes Ready, every replica Ready (serving), the scale-down to one
replica under load, the load's end, and Karpenter's removal of the emptied nodes.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cluster_autoscaling_plot import cli, plot_timeline  # noqa: E402 - the same two-panel timeline


def first(rows: list[dict[str, Any]], t0: float, pred: Any, after: float = 0.0) -> float | None:
    for row in rows:
        if "error" not in row and row["t"] - t0 >= after and pred(row):
            return round(float(row["t"] - t0), 1)
    return None


def summarize(data: dict[str, Any]) -> dict[str, Any]:
    rows = [r for r in data["rows"] if "error" not in r]
    t0 = rows[0]["t"]
    peak = max(r["desired"] or 0 for r in rows)
    up = first(rows, t0, lambda r: (r["desired"] or 0) >= 2)
    claims = first(rows, t0, lambda r: r["nodeclaims"] > 0)
    nodes_ready = first(rows, t0, lambda r: r["ready_nodes"] >= peak - 1 > 0)
    serving = first(rows, t0, lambda r: (r["ready"] or 0) >= peak)
    down = first(rows, t0, lambda r: r["desired"] == 1, after=serving or 0)
    load_end = first(rows, t0, lambda r: r["in_flight"] == 0, after=down or 0)
    gone = first(rows, t0, lambda r: r["nodeclaims"] == 0 and r["nodes"] == 0, after=down or 0)
    return {"peak_desired": peak, "scale_up_decision_s": up, "first_nodeclaim_s": claims,
            "new_nodes_ready_s": nodes_ready, "all_replicas_serving_s": serving, "scaled_down_to_1_s": down,
            "load_stopped_s": load_end, "karpenter_removed_nodes_s": gone, "requests_ok": data["ok"],
            "requests_failed": data["failed"], "node_provision_s": data["provision_s"],
            "max_nodeclaims": max(r["nodeclaims"] for r in rows)}


def plot(data: dict[str, Any], png: Path) -> None:
    plot_timeline(data, png, [("nodeclaims", "NodeClaims", "--"), ("ready_nodes", "Karpenter nodes Ready", ":")],
                  f"Karpenter {data.get('karpenter', '')} GPU nodes for a fleet (node boot {data['provision_s']} s")


def main() -> int:
    return cli(__doc__, "FLEETSERVE_KARPENTER_TIMELINE", summarize, plot)


if __name__ == "__main__":
    raise SystemExit(main())
