"""Operator benchmark: apply-to-children latency, a burst of 50 CRs, and the operator's RSS.

Runs against the dev cluster (`fleetserve dev-cluster up`) with the operator as
its own process (`fleetserve operator -n NS`), as a user runs it. Pods are
pinned to a node that does not exist, so only the control plane and the
operator are measured, not model loading.

    .venv/bin/python benchmarks/operator_reconcile.py [--sequential 20] [--burst 50]

Baseline measured in the same run: the time the API server itself needs to
create the same three children (ConfigMap, Service, Deployment) by server-side
apply from this client, one request after the other.
The operator's CPU seconds per CR (sequential phase) and for the burst are
reported too: on a shared machine they show its own cost, apart from the
API server's.

API calls: the operator process runs with benchmarks/api_count/ on its
PYTHONPATH, which counts every request both of its clients send (fleetserve's
own and kopf's), so the numbers compare any two versions of the operator:
requests per CR while creating, per reconcile (the operator's
``fleetserve_operator_reconciles_total``), and per CR per minute once every
fleet has converged (``--idle`` seconds, longer than one resync), with the
writes among them.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

from fleetserve_devcluster.testing import acquire
from fleetserve_operator.kube import Kube

ROOT = Path(__file__).resolve().parents[1]
NOWHERE = {"nodeSelector": {"fleetserve.io/test-no-such-node": "true"}}
KINDS = ("ConfigMap", "Service", "Deployment")


def body(name: str) -> dict[str, Any]:
    return {
        "apiVersion": "fleetserve.io/v1alpha1", "kind": "LLMDeployment", "metadata": {"name": name},
        "spec": {"model": {"source": "builtin:smollm2-135m-instruct"},
                 "resources": {"gpus": 0, "memory": "2Gi"}, "scheduling": NOWHERE},
    }


def create(kube: Kube, ns: str, obj: dict[str, Any]) -> None:
    kube.request("POST", f"/apis/fleetserve.io/v1alpha1/namespaces/{ns}/llmdeployments", body=obj,
                 content_type="application/json")


def children_ready(kube: Kube, ns: str, name: str) -> bool:
    names = {"ConfigMap": f"{name}-config"}
    return all(kube.get(kind, ns, names.get(kind, name)) is not None for kind in KINDS)


def reconciled(kube: Kube, ns: str, name: str) -> bool:
    cr = kube.get("LLMDeployment", ns, name) or {}
    status = cr.get("status") or {}
    return bool(status.get("conditions")) and status.get("observedGeneration") == cr["metadata"]["generation"]


def cpu_s(pid: int) -> float:
    """CPU seconds (user + system) the process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def baseline(kube: Kube, ns: str, n: int) -> list[float]:
    """Four server-side applies straight from this client: what creating the children costs at least."""
    from fleetserve_operator.api.spec import spec_from_body
    from fleetserve_operator.reconcile.fit import check_memory_fit
    from fleetserve_operator.resources.network import build_service
    from fleetserve_operator.resources.server import build_config_map, build_deployment

    times = []
    for i in range(n):
        name = f"base-{i}"
        spec = spec_from_body(body(name))
        fit = check_memory_fit(spec)
        objs = [build_config_map(name, ns, spec, fit), build_service(name, ns), build_deployment(name, ns, spec, fit, 1)]
        start = time.perf_counter()
        for obj in objs:
            kube.apply(obj)
        times.append(time.perf_counter() - start)
    return times


def api_counts(path: Path) -> collections.Counter[str]:
    try:
        return collections.Counter(json.loads(path.read_text()))
    except (OSError, ValueError):
        return collections.Counter()


def reconciles(port: int) -> float:
    """Sum of fleetserve_operator_reconciles_total over every trigger and result."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("fleetserve_operator_reconciles_total{"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


WRITES = ("POST", "PUT", "PATCH", "DELETE")


def summarize_calls(delta: collections.Counter[str], per: float) -> dict[str, Any]:
    total = sum(delta.values())
    writes = sum(n for k, n in delta.items() if k.split()[0] in WRITES and not k.endswith(" events"))
    return {"total": round(total / per, 2), "writes_excluding_events": round(writes / per, 2),
            "by_call": {k: round(n / per, 2) for k, n in delta.most_common(8)}}


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sequential", type=int, default=20)
    parser.add_argument("--burst", type=int, default=50)
    parser.add_argument("--idle", type=float, default=75.0,
                        help="seconds to count API calls once every fleet converged (> one 60 s resync)")
    args = parser.parse_args()

    cluster = acquire()
    cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(ROOT / "crds"))
    cluster.kubectl("wait", "--for=condition=Established", "crd/llmdeployments.fleetserve.io")
    kube = Kube(cluster.api_client())
    ns = f"bench-{uuid.uuid4().hex[:8]}"
    cluster.kubectl("create", "namespace", ns)
    count_file = Path(f"/tmp/{ns}-api-calls.json")
    python_path = os.pathsep.join(p for p in (str(ROOT / "benchmarks" / "api_count"), os.environ.get("PYTHONPATH"))
                                  if p)
    env = {**cluster.env, "PYTHONUNBUFFERED": "1", "PYTHONPATH": python_path,
           "FLEETSERVE_BENCH_API_COUNT": str(count_file)}
    log = open(f"/tmp/{ns}-operator.log", "w")
    port = free_port()
    op = subprocess.Popen([sys.executable, "-m", "fleetserve_cli.main", "operator", "-n", ns, "--metrics-port",
                           str(port), "--metrics-host", "127.0.0.1"],
                          env=env, stdout=log, stderr=subprocess.STDOUT)
    results: dict[str, Any] = {}
    try:
        # a warm-up CR: the measured latencies include none of the operator's startup
        create(kube, ns, body("warmup"))
        started = time.perf_counter()
        while not reconciled(kube, ns, "warmup"):
            if time.perf_counter() - started > 600:
                raise SystemExit("operator did not reconcile the warm-up CR in 600 s; see " + log.name)
            time.sleep(0.05)
        results["operator_start_to_first_reconcile_s"] = round(time.perf_counter() - started, 2)
        results["rss_idle_mb"] = round(rss_mb(op.pid), 1)

        latencies = []
        calls_before = api_counts(count_file)
        cpu_before = cpu_s(op.pid)
        for i in range(args.sequential):
            name = f"seq-{i}"
            start = time.perf_counter()
            create(kube, ns, body(name))
            while not children_ready(kube, ns, name):
                time.sleep(0.02)
            latencies.append(time.perf_counter() - start)
        results["operator_cpu_s_per_sequential_cr"] = round((cpu_s(op.pid) - cpu_before) / args.sequential, 3)
        time.sleep(3)  # let the last CR's follow-up events settle before the next phase counts
        results["api_calls_per_cr_sequential"] = summarize_calls(api_counts(count_file) - calls_before,
                                                                 args.sequential)
        results["apply_to_children_p50_s"] = round(statistics.median(latencies), 3)
        results["apply_to_children_p95_s"] = round(pct(latencies, 0.95), 3)
        base = baseline(kube, ns, args.sequential)
        results["baseline_direct_apply_p50_s"] = round(statistics.median(base), 3)
        results["baseline_direct_apply_p95_s"] = round(pct(base, 0.95), 3)

        names = [f"burst-{i}" for i in range(args.burst)]
        calls_before, reconciles_before = api_counts(count_file), reconciles(port)
        cpu_before = cpu_s(op.pid)
        start = time.perf_counter()
        for name in names:
            create(kube, ns, body(name))
        pending = set(names)
        while pending:
            pending = {n for n in pending if not (children_ready(kube, ns, n) and reconciled(kube, ns, n))}
            if time.perf_counter() - start > 600:
                raise SystemExit(f"{len(pending)} CRs not reconciled after 600 s")
            time.sleep(0.1)
        results[f"burst_{args.burst}_all_reconciled_s"] = round(time.perf_counter() - start, 2)
        results["operator_cpu_s_burst"] = round(cpu_s(op.pid) - cpu_before, 2)
        results[f"rss_with_{args.sequential + args.burst + 1}_crs_mb"] = round(rss_mb(op.pid), 1)
        time.sleep(3)
        calls, done = api_counts(count_file) - calls_before, reconciles(port) - reconciles_before
        results["api_calls_per_cr_burst"] = summarize_calls(calls, args.burst)
        results["reconciles_per_cr_burst"] = round(done / args.burst, 2)
        results["api_calls_per_reconcile_burst"] = round(sum(calls.values()) / max(done, 1), 2)

        crs = args.sequential + args.burst + 1
        calls_before, reconciles_before = api_counts(count_file), reconciles(port)
        time.sleep(args.idle)
        calls, done = api_counts(count_file) - calls_before, reconciles(port) - reconciles_before
        per_cr_minute = crs * args.idle / 60
        results["idle_api_calls_per_cr_per_min"] = summarize_calls(calls, per_cr_minute)
        results["idle_reconciles_per_cr_per_min"] = round(done / per_cr_minute, 2)
        results["idle_api_calls_per_reconcile"] = round(sum(calls.values()) / max(done, 1), 2)
    finally:
        op.terminate()
        op.wait(timeout=30)
        log.close()
        cluster.kubectl("delete", "namespace", ns, "--wait=false", check=False)
    results["cpu_count"] = os.cpu_count()
    results["load_average_1m"] = os.getloadavg()[0]
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
