"""Dev cluster benchmark: API requests per minute of the node agent and the service proxy on an idle cluster.

On a dev cluster of your own (never the shared one: the node agent is restarted for every
run), with a Deployment of `--pods` echo pods (readiness probe every second) and a
Service in front of them, each run restarts the node agent from one source tree
(`--tree NAME=DIR`, DIR holding `fleetserve_devcluster`; the trees are interleaved run
by run), waits until every pod is Ready again plus `--settle` seconds, then reads the
API server's own counter `apiserver_request_total` twice, `--window` seconds apart.
Requests on Services and EndpointSlices are the proxy's; those on the resources the
agent uses are the agent's (kube-controller-manager and kube-scheduler only watch on an
idle cluster; the API server's own lease renewals count as "control plane", and
WATCH requests, counted when they end, as "watch re-opens" of all clients).  Where the agent writes its own counts (`node-agent.requests.json`,
agents since watch.py), they are printed too, as a cross-check.

    S=~/.cache/fleetserve/dev-cluster-w20
    fleetserve dev-cluster up --state-dir $S --port-base 7400
    git archive 2d46971 devcluster | tar -x -C /tmp/before
    .venv/bin/python benchmarks/devcluster_api_requests.py --state-dir $S \\
        --tree before=/tmp/before/devcluster --tree after=devcluster --runs 3
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

NAMESPACE = "bench-api-requests"
PROXY_RESOURCES = ("services", "endpointslices")
AGENT_RESOURCES = ("pods", "nodes", "leases", "configmaps", "secrets", "events", "serviceaccounts",
                   "persistentvolumeclaims", "persistentvolumes")
METRIC = re.compile(r'^apiserver_request_total\{(?P<labels>[^}]*)\} (?P<value>\S+)$')


def kubectl(state: Path, *args: str, input: str | None = None) -> str:
    from fleetserve_devcluster import tools

    env = {**os.environ, "KUBECONFIG": str(state / "kubeconfig")}
    proc = subprocess.run([str(tools.tool_path("kubectl")), *args], input=input, capture_output=True, text=True,
                          env=env, timeout=60)
    if proc.returncode != 0:
        raise SystemExit(f"kubectl {' '.join(args)}: {proc.stderr}")
    return proc.stdout


def request_totals(state: Path) -> Counter[tuple[str, str, str]]:
    """apiserver_request_total summed by (verb, resource[/subresource], scope), resource requests only."""
    totals: Counter[tuple[str, str, str]] = Counter()
    for line in kubectl(state, "get", "--raw", "/metrics").splitlines():
        m = METRIC.match(line)
        if not m:
            continue
        labels = dict(re.findall(r'(\w+)="([^"]*)"', m["labels"]))
        if not labels.get("resource"):
            continue
        resource = labels["resource"] + (f"/{labels['subresource']}" if labels.get("subresource") else "")
        totals[(labels["verb"], resource, labels.get("scope", ""))] += int(float(m["value"]))
    return totals


def owner(verb: str, resource: str, scope: str) -> str:
    """Whose request this is, on an idle cluster: the proxy's, the agent's, or the control plane's.

    WATCH requests are counted by the API server when they end, and every client re-opens its
    watches every 5-10 minutes: they go apart ("watch re-opens", all clients together).
    """
    if verb == "WATCH":
        return "watch re-opens"
    if resource.split("/")[0] in PROXY_RESOURCES:
        return "proxy"
    if resource == "leases" and verb in ("PUT", "UPDATE", "GET"):
        return "control plane"  # the API server's identity lease; the agent PATCHes its nodes' leases
    if resource.split("/")[0] in AGENT_RESOURCES:
        return "agent"
    return "control plane"


def ensure_workload(state: Path, pods: int) -> None:
    if NAMESPACE not in kubectl(state, "get", "namespaces", "-o", "name"):
        kubectl(state, "create", "namespace", NAMESPACE)
    labels = {"app": "echo"}
    port = 8400
    deployment = {
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "echo", "namespace": NAMESPACE},
        "spec": {"replicas": pods, "selector": {"matchLabels": labels}, "template": {
            "metadata": {"labels": labels},
            "spec": {"terminationGracePeriodSeconds": 5, "containers": [{
                "name": "echo", "image": "fleetserve/echo",
                "command": ["fleetserve", "dev-cluster", "echo", "--port", str(port)],
                "ports": [{"name": "http", "containerPort": port}],
                "readinessProbe": {"httpGet": {"path": "/ready", "port": "http"}, "periodSeconds": 1}}]}}},
    }
    service = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "echo", "namespace": NAMESPACE},
               "spec": {"selector": labels, "ports": [{"name": "http", "port": 80, "targetPort": "http"}]}}
    kubectl(state, "apply", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List",
                                                          "items": [deployment, service]}))


def ready_pods(state: Path) -> int:
    pods = json.loads(kubectl(state, "get", "pods", "-n", NAMESPACE, "-o", "json"))["items"]
    return sum(1 for p in pods if not p["metadata"].get("deletionTimestamp") and any(
        c["type"] == "Ready" and c["status"] == "True" for c in (p.get("status") or {}).get("conditions") or []))


def restart_agent(state: Path, tree: Path) -> None:
    pid_file = state / "pids" / "node-agent.pid"
    try:
        pid = int(pid_file.read_text().split()[0])
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and Path(f"/proc/{pid}").exists():
            time.sleep(0.2)
    except (OSError, ValueError):
        pass
    env = {**os.environ, "PYTHONPATH": str(tree.resolve())}
    proc = subprocess.run([sys.executable, "-m", "fleetserve_cli.main", "dev-cluster", "up", "--state-dir", str(state)],
                          capture_output=True, text=True, env=env, timeout=300)
    if proc.returncode != 0:
        raise SystemExit(f"up failed:\n{proc.stdout}\n{proc.stderr}")


def agent_counts(state: Path) -> dict[str, Any] | None:
    try:
        return dict(json.loads((state / "node-agent.requests.json").read_text()))
    except (OSError, ValueError):
        return None


def measure(state: Path, window: float) -> dict[str, Any]:
    before, own0, t0 = request_totals(state), agent_counts(state), time.monotonic()
    time.sleep(window)
    after, own1, t1 = request_totals(state), agent_counts(state), time.monotonic()
    per_min = 60.0 / (t1 - t0)
    delta = {k: (after[k] - before[k]) * per_min for k in after if after[k] != before[k]}
    by_owner: Counter[str] = Counter()
    for (verb, resource, scope), n in delta.items():
        by_owner[owner(verb, resource, scope)] += n
    result: dict[str, Any] = {"per_minute": dict(by_owner),
                              "detail": {f"{v} {r} ({s})": round(n, 1) for (v, r, s), n in sorted(delta.items())}}
    if own0 and own1:
        for comp in ("agent", "proxy"):
            diff = {k: (own1[comp].get(k, 0) - own0[comp].get(k, 0)) * per_min for k in own1[comp]}
            result[f"self_counted_{comp}"] = {k: round(v, 1) for k, v in diff.items() if v}
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--state-dir", type=Path, required=True)
    ap.add_argument("--tree", action="append", required=True, help="NAME=DIR (DIR contains fleetserve_devcluster)")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--pods", type=int, default=5)
    ap.add_argument("--window", type=float, default=60.0)
    ap.add_argument("--settle", type=float, default=15.0)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    state = args.state_dir.expanduser().resolve()
    if state.name == "dev-cluster":
        raise SystemExit("refusing to restart the node agent of the shared dev cluster: use a state dir of your own")
    trees = [(name, Path(d)) for name, d in (t.split("=", 1) for t in args.tree)]
    ensure_workload(state, args.pods)
    results: dict[str, list[dict[str, Any]]] = {name: [] for name, _ in trees}
    for run in range(args.runs):
        for name, tree in trees:
            restart_agent(state, tree)
            deadline = time.monotonic() + 180
            while ready_pods(state) < args.pods:
                if time.monotonic() > deadline:
                    raise SystemExit(f"{name}: pods not Ready after 180 s")
                time.sleep(1)
            time.sleep(args.settle)
            r = measure(state, args.window)
            results[name].append(r)
            print(f"run {run + 1} {name}: " + ", ".join(f"{k} {v:.1f}/min" for k, v in sorted(r["per_minute"].items())),
                  flush=True)
            print("   " + json.dumps(r["detail"]), flush=True)
            for comp in ("agent", "proxy"):
                if f"self_counted_{comp}" in r:
                    print(f"   {comp} self-counted: {json.dumps(r[f'self_counted_{comp}'])}", flush=True)
    print("\nmedian requests per minute (apiserver_request_total):")
    for name, runs in results.items():
        owners = sorted({k for r in runs for k in r["per_minute"]})
        print(f"  {name}: " + ", ".join(
            f"{o} {statistics.median(r['per_minute'].get(o, 0.0) for r in runs):.1f}" for o in owners))
    if args.out:
        args.out.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
