"""`make demo`'s Karpenter step (hack/demo.sh, demo_karpenter): load an LLMDeployment through its
Service until the fleet grows onto a GPU node Karpenter provisions, stop the load, and watch the
fleet shrink and Karpenter remove the node. It prints each event as it happens, with its time
since the load started (or stopped), and exits 1 with what it waited for when a phase runs past
its deadline.

    python hack/demo_karpenter.py NAME PROXY_ADDRESS [--concurrency 6] [--max-tokens 32]

kubectl comes from PATH and talks to the cluster of $KUBECONFIG; the fleet runs in `default`.
Standard library only.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any

NODEPOOL_LABEL = "karpenter.sh/nodepool"
GROW_DEADLINE_S = 300.0
SHRINK_DEADLINE_S = 300.0


class Load:
    """``concurrency`` threads, each sending one completion after the other to the Service until stop()."""

    def __init__(self, address: str, served_name: str, concurrency: int, max_tokens: int) -> None:
        self.url = f"http://{address}/v1/completions"
        self.body = json.dumps({"model": served_name, "prompt": "Tell me a story.", "max_tokens": max_tokens,
                                "temperature": 0.8}).encode()
        self.ok = 0
        self.failures: list[str] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._worker, daemon=True) for _ in range(concurrency)]

    def start(self) -> None:
        for t in self._threads:
            t.start()

    def stop(self) -> None:
        """Send no new request and wait for those in flight."""
        self._stop.set()
        for t in self._threads:
            t.join(150)

    def _worker(self) -> None:
        while not self._stop.is_set():
            error = self._one()
            with self._lock:
                if error is None:
                    self.ok += 1
                else:
                    self.failures.append(error)

    def _one(self) -> str | None:
        request = urllib.request.Request(self.url, data=self.body, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=120) as resp:
                choice = (json.load(resp).get("choices") or [{}])[0]
        except (OSError, ValueError) as exc:  # HTTPError, URLError and timeouts are OSErrors
            return f"{type(exc).__name__}: {exc}"
        return None if choice.get("finish_reason") in ("stop", "length") else f"incomplete answer: {choice}"


def kubectl(*args: str) -> str:
    return subprocess.run(["kubectl", *args], capture_output=True, text=True, check=True, timeout=60).stdout


def ready(obj: dict[str, Any]) -> bool:
    return any(c.get("type") == "Ready" and c.get("status") == "True"
               for c in (obj.get("status") or {}).get("conditions") or [])


def condition(obj: dict[str, Any], type_: str) -> dict[str, Any]:
    return next((c for c in (obj.get("status") or {}).get("conditions") or [] if c.get("type") == type_), {})


class Cluster:
    """One `kubectl get` a tick: the LLMDeployment, its server pods, Karpenter's NodeClaims and nodes."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.llmd: dict[str, Any] = {}
        self.pods: list[dict[str, Any]] = []
        self.claims: list[dict[str, Any]] = []
        self.nodes: list[dict[str, Any]] = []

    def refresh(self) -> None:
        items = json.loads(kubectl("get", "llmd,nodeclaims,nodes,pods", "-n", "default", "-o", "json"))["items"]
        by_kind: dict[str, list[dict[str, Any]]] = {}
        for item in items:
            by_kind.setdefault(item["kind"], []).append(item)
        self.llmd = next((d for d in by_kind.get("LLMDeployment", []) if d["metadata"]["name"] == self.name), {})
        self.pods = [p for p in by_kind.get("Pod", []) if p["metadata"].get("labels", {}).get(
            "app.kubernetes.io/instance") == self.name and p["metadata"]["labels"].get(
            "app.kubernetes.io/name") == "fleetserve-server"]
        self.claims = by_kind.get("NodeClaim", [])
        self.nodes = [n for n in by_kind.get("Node", []) if NODEPOOL_LABEL in n["metadata"].get("labels", {})]

    @property
    def status(self) -> dict[str, Any]:
        return dict(self.llmd.get("status") or {})

    def decision(self) -> str:
        last = (self.status.get("autoscaler") or {}).get("lastDecision") or {}
        return f"desiredReplicas {last.get('from')} -> {last.get('to')}: {last.get('reason')}"

    def pods_on(self, node: str) -> list[dict[str, Any]]:
        return [p for p in self.pods if p["spec"].get("nodeName") == node]


def requests_served(pod: dict[str, Any]) -> float:
    """fleetserve_requests_total on the pod's /metrics (0 when it cannot be read yet)."""
    try:
        with urllib.request.urlopen(f"http://{pod['status']['podIP']}:8000/metrics", timeout=3) as resp:
            text = resp.read().decode()
    except (OSError, KeyError):
        return 0.0
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("fleetserve_requests_total"))


class Timeline:
    """Prints each event once, with the seconds since ``t0``."""

    def __init__(self, t0: float) -> None:
        self.t0 = t0
        self.seen: set[str] = set()

    def new(self, key: str) -> bool:
        """True the first time ``key`` comes."""
        fresh = key not in self.seen
        self.seen.add(key)
        return fresh

    def say(self, text: str) -> None:
        print(f"  {time.monotonic() - self.t0:7.1f} s  {text}", flush=True)

    def once(self, key: str, text: str) -> None:
        if self.new(key):
            self.say(text)


def watch(cluster: Cluster, timeline: Timeline, deadline_s: float, tick: Callable[[], bool], waiting_for: str) -> None:
    """Run ``tick`` once a second on fresh state until it returns True; exit 1 past the deadline."""
    while True:
        try:
            cluster.refresh()
        except subprocess.CalledProcessError as exc:  # an API server hiccup: the next tick tries again
            print(f"  (kubectl: {exc.stderr.strip()[:200]})", flush=True)
        else:
            if tick():
                return
        if time.monotonic() - timeline.t0 > deadline_s:
            print(f"\nno {waiting_for} after {deadline_s:.0f} s. Now:", file=sys.stderr)
            print(kubectl("get", "llmd,pods,nodeclaims,nodes", "-o", "wide"), file=sys.stderr)
            print("Logs: <state>/logs/karpenter.log, node-agent.log, demo-operator.log "
                  "(<state> = dirname $KUBECONFIG)", file=sys.stderr)
            sys.exit(1)
        time.sleep(1.0)


def grow(cluster: Cluster, timeline: Timeline) -> str:
    """Until a replica on a Karpenter node has served requests; returns that node's name."""
    static = {p["spec"].get("nodeName") for p in cluster.pods}
    served: dict[str, str] = {}

    def tick() -> bool:
        status = cluster.status
        if int(status.get("desiredReplicas") or 0) > 1:
            timeline.once("decision", f"operator: {cluster.decision()}")
        for pod in cluster.pods:
            sched = condition(pod, "PodScheduled")
            if sched.get("reason") == "Unschedulable":
                name = pod["metadata"]["name"]
                timeline.once(f"pending {name}", f"pod {name} Pending: {sched.get('message')}")
        progressing = condition(cluster.llmd, "Progressing")
        if progressing.get("reason") == "WaitingForNodes":
            timeline.once("waiting", f"operator: Progressing/WaitingForNodes: {progressing.get('message')}")
        for claim in cluster.claims:
            name = claim["metadata"]["name"]
            itype = claim["metadata"].get("labels", {}).get("node.kubernetes.io/instance-type", "?")
            timeline.once(f"claim {name}", f"Karpenter: NodeClaim {name} created (instance type {itype})")
        for node in cluster.nodes:
            name = node["metadata"]["name"]
            timeline.once(f"node {name}", f"Karpenter: node {name} registered")
            if ready(node):
                timeline.once(f"ready {name}", f"node agent: node {name} Ready")
            for pod in cluster.pods_on(name):
                pod_name = pod["metadata"]["name"]
                if ready(pod) and pod["spec"]["nodeName"] not in static:
                    timeline.once(f"pod {pod_name}", f"pod {pod_name} Ready on node {name}")
                    if requests_served(pod) > 0:
                        served[name] = pod_name
                        timeline.once(f"served {pod_name}",
                                      f"pod {pod_name} on node {name} answers requests from the Service")
        return bool(served)

    watch(cluster, timeline, GROW_DEADLINE_S, tick, "replica serving on a node Karpenter provisioned")
    return next(iter(served))


def shrink(cluster: Cluster, timeline: Timeline, node: str) -> None:
    """Until the fleet is back to one replica and Karpenter's NodeClaims and nodes are gone."""
    claim_names = {c["metadata"]["name"] for c in cluster.claims}

    def tick() -> bool:
        if int(cluster.status.get("desiredReplicas") or 0) == 1:
            timeline.once("decision", f"operator: {cluster.decision()}")
        if not cluster.pods_on(node):
            timeline.once("pod gone", f"the replica on node {node} stopped (the newest node's pod goes first)")
        for claim in cluster.claims:
            if claim["metadata"].get("deletionTimestamp"):
                name = claim["metadata"]["name"]
                if timeline.new(f"disrupt {name}"):
                    timeline.say(f"Karpenter: NodeClaim {name} deleted ({disruption(name)})")
        live_claims = {c["metadata"]["name"] for c in cluster.claims}
        for name in claim_names - live_claims:
            timeline.once(f"gone {name}", f"Karpenter: NodeClaim {name} gone")
        if not any(n["metadata"]["name"] == node for n in cluster.nodes):
            timeline.once("node gone", f"node {node} gone")
        return not cluster.claims and not cluster.nodes and len(cluster.pods) == 1

    watch(cluster, timeline, SHRINK_DEADLINE_S, tick, "shrink to one replica with Karpenter's nodes removed")


def disruption(claim: str) -> str:
    """Karpenter's own words for why it removes a NodeClaim (its DisruptionTerminating event)."""
    try:
        events = json.loads(kubectl("get", "events", "-A", "--field-selector", f"involvedObject.name={claim}",
                                    "-o", "json"))["items"]
    except subprocess.CalledProcessError:
        return "consolidation"
    words = [e.get("message", "") for e in events if str(e.get("reason", "")).startswith("Disruption")]
    return words[-1] if words else "consolidation"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("name")
    parser.add_argument("address", help="host:port of the Service (its fleetserve.io/proxy-address)")
    parser.add_argument("--served-name", default="tiny")
    parser.add_argument("--concurrency", type=int, default=6)
    parser.add_argument("--max-tokens", type=int, default=32)
    args = parser.parse_args()

    cluster = Cluster(args.name)
    cluster.refresh()
    target = ((cluster.llmd.get("spec") or {}).get("autoscaling") or {}).get("targetQueueLength")
    load = Load(args.address, args.served_name, args.concurrency, args.max_tokens)
    print(f"load: {args.concurrency} requests in flight through Service {args.name} ({args.address}), "
          f"{target} per replica wanted, 1 GPU per replica, no GPU free:")
    grown = Timeline(time.monotonic())
    load.start()
    grown.once("load", "load starts")
    node = ""
    try:
        node = grow(cluster, grown)
    finally:
        if not node:
            load.stop()
    print(kubectl("get", "nodeclaims,nodes", "-o", "wide"))
    print(kubectl("get", "pods", "-l", f"app.kubernetes.io/instance={args.name}", "-o", "wide"))
    print(f"the operator's reason: {cluster.decision()}")

    print("\nstop the load: the fleet shrinks after its scale-down window, then Karpenter consolidates the empty node:")
    shrunk = Timeline(time.monotonic())
    load.stop()
    shrunk.once("stopped", f"load stopped: {load.ok} requests answered, {len(load.failures)} failed"
                + (f" (first: {load.failures[0]})" if load.failures else ""))
    shrink(cluster, shrunk, node)
    print("no NodeClaim left; the nodes:")
    print(kubectl("get", "nodes", "-o", "wide"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
