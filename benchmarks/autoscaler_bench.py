"""Autoscaler benchmark on the dev cluster: reaction times, requests lost, and one run's timeline plot.

    .venv/bin/python benchmarks/autoscaler_bench.py --runs 5 \\
        --json benchmarks/autoscaler_results.json --plot benchmarks/autoscaler_timeline.png

Each run applies a fresh LLMDeployment (tiny random-weight Llama, CPU pods through the node agent,
`minReplicas 1`, `maxReplicas 3`, `targetQueueLength 2`, 2 s scrapes, 20 s scale-down window),
waits for its one pod, then:

* **scale-up**: overload (8 concurrent requests) through the Service's proxy address; measures the
  time from overload start to the scale decision (`status.desiredReplicas >= 2`) and to the
  second replica Ready;
* **scale-down**: a light load (1 request at a time) until the fleet is back to 1 pod;
* requests served and failed in each phase.

Baseline, in the same invocation: the same overload for the same time against a fleet of one
replica with autoscaling off — the throughput and latency the autoscaler buys. A final phase
rolls the pods (`engine.maxNumSeqs` change) of a 2-replica fleet under load.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import uuid
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "e2e"))

from autoscaler_harness import (  # noqa: E402
    Fleet,
    Load,
    LoadResult,
    Recorder,
    apply_crds,
    llmd_manifest,
    make_model,
    running_operator,
    wait_until,
)
from fleetserve_devcluster.testing import DevClusterHandle, acquire, release  # noqa: E402

AUTOSCALING = {"enabled": True, "minReplicas": 1, "maxReplicas": 3, "targetQueueLength": 2,
               "targetKVCacheUsage": 0.9, "scaleUpStabilizationSeconds": 0,
               "scaleDownStabilizationSeconds": 20, "scrapeIntervalSeconds": 2}
OVERLOAD = 8
POD_READY_S = 600


def phase(result: LoadResult, start: float, end: float) -> dict[str, Any]:
    """Requests that started in [start, end): served, failed, throughput, latency percentiles."""
    rows = [r for r in result.requests if start <= r[0] < end]
    ok = [r[1] for r in rows if r[2]]
    latencies = sorted(ok)
    return {
        "served": len(ok), "failed": len(rows) - len(ok),
        "seconds": round(end - start, 1),
        "requests_per_s": round(len(ok) / (end - start), 2) if end > start else None,
        "p50_s": round(latencies[len(latencies) // 2], 2) if latencies else None,
        "p95_s": round(latencies[int(len(latencies) * 0.95)], 2) if latencies else None,
    }


def scale_run(cluster: DevClusterHandle, namespace: str, model: Path, index: int) -> dict[str, Any]:
    name = f"bench-{index}"
    fleet = Fleet(cluster, namespace, name)
    fleet.apply(llmd_manifest(name, model, autoscaling=AUTOSCALING))
    wait_until(lambda: len(fleet.ready_pods()) == 1, POD_READY_S, "the first pod Ready")
    address = fleet.proxy_address()
    load = Load(address, concurrency=OVERLOAD, max_tokens=48)
    recorder = Recorder(fleet, load).start()
    t0_wall, t0 = time.time(), time.monotonic()
    load.start()
    wait_until(lambda: (fleet.status().get("desiredReplicas") or 0) >= 2, 120, "the scale-up decision",
               interval=0.1)
    decision_s = time.monotonic() - t0
    wait_until(lambda: len(fleet.ready_pods()) >= 2, POD_READY_S, "a second replica Ready", interval=0.25)
    ready_s = time.monotonic() - t0
    desired = int(fleet.status()["desiredReplicas"])
    wait_until(lambda: len(fleet.ready_pods()) >= desired, POD_READY_S, f"{desired} replicas Ready")
    all_ready_wall = time.time()
    time.sleep(10)  # steady state at the new size
    overload = load.stop()
    up_end = time.time()

    light = Load(address, concurrency=1, max_tokens=48).start()
    down_start = time.time()
    wait_until(lambda: len(fleet.pods()) == 1 and len(fleet.ready_pods()) == 1, 300, "the fleet back to one pod")
    down_end = time.time()
    time.sleep(2)
    tail = light.stop()
    timeline = recorder.stop()
    reason = (fleet.status().get("autoscaler") or {}).get("lastDecision", {}).get("reason")
    cluster.kubectl("delete", "llmd", name, "-n", namespace, "--wait=true", "--timeout=120s", check=False)
    return {
        "decision_s": round(decision_s, 2), "replica_ready_s": round(ready_s, 2), "max_desired": desired,
        "scale_up": phase(overload, t0_wall, all_ready_wall),
        "steady": phase(overload, all_ready_wall, up_end),
        "scale_down": phase(tail, down_start, down_end),
        "failures": (overload.failures + tail.failures)[:5],
        "last_reason": reason,
        "timeline": timeline.rows, "load_start": t0_wall, "load_stop": up_end,
    }


def baseline_run(cluster: DevClusterHandle, namespace: str, model: Path, seconds: float) -> dict[str, Any]:
    fleet = Fleet(cluster, namespace, "bench-fixed")
    fleet.apply(llmd_manifest("bench-fixed", model, autoscaling={"enabled": False}, replicas=1))
    wait_until(lambda: len(fleet.ready_pods()) == 1, POD_READY_S, "the fixed pod Ready")
    load = Load(fleet.proxy_address(), concurrency=OVERLOAD, max_tokens=48)
    start = time.time()
    load.start()
    time.sleep(seconds)
    result = load.stop()
    cluster.kubectl("delete", "llmd", "bench-fixed", "-n", namespace, "--wait=true", "--timeout=120s", check=False)
    return phase(result, start, start + seconds)


def rolling_run(cluster: DevClusterHandle, namespace: str, model: Path) -> dict[str, Any]:
    fleet = Fleet(cluster, namespace, "bench-roll")
    fleet.apply(llmd_manifest("bench-roll", model, autoscaling={"enabled": False}, replicas=2))
    ready = wait_until(lambda: (lambda pods: pods if len(pods) == 2 else None)(fleet.ready_pods()),
                       POD_READY_S, "2 pods Ready")
    old = {p.metadata.name for p in ready}
    load = Load(fleet.proxy_address(), concurrency=4, max_tokens=32).start()
    time.sleep(3)
    start = time.time()
    cluster.kubectl("patch", "llmd", "bench-roll", "-n", namespace, "--type=merge",
                    "-p", json.dumps({"spec": {"engine": {"maxNumSeqs": 6}}}))
    wait_until(lambda: (lambda names: len(fleet.pods()) == 2 and len(names) == 2 and not names & old)(
        {p.metadata.name for p in fleet.ready_pods()}), 2 * POD_READY_S, "both pods replaced")
    end = time.time()
    result = load.stop()
    cluster.kubectl("delete", "llmd", "bench-roll", "-n", namespace, "--wait=true", "--timeout=120s", check=False)
    return {**phase(result, start, end), "failures": result.failures[:5]}


def plot(run: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in run["timeline"] if "error" not in r]
    t0 = run["load_start"]
    t = [r["t"] - t0 for r in rows]
    fig, axes = plt.subplots(3, 1, figsize=(9, 8), sharex=True)
    axes[0].plot(t, [r["in_flight"] for r in rows], label="requests in flight (client)")
    axes[0].plot(t, [(r["queue_per_replica"] or 0) for r in rows], label="observed queue per ready replica")
    axes[0].set_ylabel("requests")
    axes[1].plot(t, [(r["kv"] or 0) * 100 for r in rows], color="tab:purple", label="observed KV-cache usage")
    axes[1].set_ylabel("KV %")
    axes[2].step(t, [r["desired"] or 0 for r in rows], where="post", label="desired replicas")
    axes[2].step(t, [r["ready"] or 0 for r in rows], where="post", label="ready replicas")
    axes[2].set_ylabel("replicas")
    axes[2].set_xlabel("seconds since overload start")
    for ax in axes:
        ax.axvline(0, color="grey", linestyle=":")
        ax.axvline(run["load_stop"] - t0, color="grey", linestyle="--")
        ax.legend(loc="upper right", fontsize=8)
        ax.grid(alpha=0.3)
    fig.suptitle("fleetserve autoscaler: overload at 0 s (:), overload stops (--), light load after")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--json", type=Path, default=REPO / "benchmarks" / "autoscaler_results.json")
    parser.add_argument("--plot", type=Path, default=REPO / "benchmarks" / "autoscaler_timeline.png")
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/fleetserve-autoscaler-bench"))
    parser.add_argument("--state-dir", type=Path, default=os.environ.get("FLEETSERVE_DEV_CLUSTER_STATE"),
                        help="dev cluster to use or start (default: the standard one)")
    args = parser.parse_args()
    args.work_dir.mkdir(parents=True, exist_ok=True)
    cluster = acquire(Path(args.state_dir) if args.state_dir else None)
    # Not under /tmp: the pods mount their own emptyDir there.
    model = make_model(cluster.state_dir / "test-models" / "tiny-llama")
    namespace = f"bench-{uuid.uuid4().hex[:8]}"
    cluster.kubectl("create", "namespace", namespace)
    runs: list[dict[str, Any]] = []
    extra: dict[str, Any] = {}

    def save() -> dict[str, Any]:
        """Results so far (written after every phase, so a cut-short session still has numbers)."""
        summary = {
            "runs": len(runs),
            "decision_s_median": statistics.median(r["decision_s"] for r in runs) if runs else None,
            "replica_ready_s_median": statistics.median(r["replica_ready_s"] for r in runs) if runs else None,
            "per_run": [{k: v for k, v in r.items() if k != "timeline"} for r in runs],
            **extra,
        }
        args.json.write_text(json.dumps(summary, indent=2) + "\n")
        return summary

    try:
        apply_crds(cluster)
        with running_operator(cluster, namespace, args.work_dir / "operator.log"):
            for i in range(args.runs):
                runs.append(scale_run(cluster, namespace, model, i))
                if i == 0:
                    plot(runs[0], args.plot)
                save()
            steady_s = statistics.median(r["scale_up"]["seconds"] + r["steady"]["seconds"] for r in runs)
            extra["baseline_fixed_1_replica"] = baseline_run(cluster, namespace, model, steady_s)
            save()
            extra["rolling_update"] = rolling_run(cluster, namespace, model)
    finally:
        cluster.kubectl("delete", "namespace", namespace, "--wait=false", check=False)
        release(cluster)
    summary = save()
    print(json.dumps({k: v for k, v in summary.items() if k != "per_run"}, indent=2))
    for r in runs:
        print(f"decision {r['decision_s']:.1f} s, ready {r['replica_ready_s']:.1f} s, "
              f"up {r['scale_up']}, steady {r['steady']}, down {r['scale_down']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
