"""Plot and summarize the Karpenter e2e run's timeline (tests/e2e/test_karpenter_fleet.py).

    FLEETSERVE_KARPENTER_TIMELINE=/tmp/k.json .venv/bin/python -m pytest tests/e2e/test_karpenter_fleet.py
    .venv/bin/python benchmarks/karpenter_plot.py /tmp/k.json --png benchmarks/karpenter_timeline.png

Prints the figures BENCHMARKS.md quotes, in seconds from the load's start: the scale-up decision,
the first NodeClaim, the new nodes Ready, every replica Ready (serving), the scale-down to one
replica under load, the load's end, and Karpenter's removal of the emptied nodes.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


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
    bottom.step(t, [r["nodeclaims"] for r in rows], where="post", label="NodeClaims", linestyle="--")
    bottom.step(t, [r["ready_nodes"] for r in rows], where="post", label="Karpenter nodes Ready", linestyle=":")
    bottom.set_xlabel("seconds since the load started")
    bottom.set_ylabel("count")
    bottom.legend(loc="upper right", fontsize="small")
    fig.suptitle(f"Karpenter {data.get('karpenter', '')} GPU nodes for a fleet (node boot {data['provision_s']} s; "
                 f"{data['ok']} requests ok, {data['failed']} failed)")
    fig.tight_layout()
    fig.savefig(png, dpi=100)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("timeline", type=Path, help="the JSON the e2e wrote ($FLEETSERVE_KARPENTER_TIMELINE)")
    parser.add_argument("--png", type=Path, default=None, help="write the plot here")
    args = parser.parse_args()
    data = json.loads(args.timeline.read_text())
    print(json.dumps(summarize(data), indent=1))
    if args.png:
        plot(data, args.png)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
