"""Cluster autoscaling with Karpenter, no test script in its place (issue 17 point 3).

A dev cluster of its own, ``up --karpenter``: 1 static node with 1 GPU, Karpenter's kwok provider
allowed up to 3 more 1-GPU nodes (NodePool ``gpu``, nodes registering 10 s after their NodeClaim),
the node agent adopting them. The test only applies an LLMDeployment (1 GPU per replica,
``minReplicas: 1, maxReplicas: 4``, short windows), drives load through its Service and watches:
the operator asks for replicas → they are Pending → Karpenter creates NodeClaims and nodes → the
agent makes them Ready → the replicas become Ready and serve; ``WaitingForNodes`` meanwhile and
no overshoot. With the load still on, ``maxReplicas`` goes to 1 (scale-down under traffic), then
the load stops and Karpenter's consolidation removes the emptied nodes. Not one request fails.

``FLEETSERVE_KARPENTER_TIMELINE=path.json`` saves the timeline (load, replicas, NodeClaims, nodes).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fleetserve_devcluster import karpenter, tools
from fleetserve_devcluster.testing import (
    DevClusterHandle,
    cluster_env,
    create_namespace,
    free_port_base,
    wait_until,
)

sys.path.insert(0, str(Path(__file__).parent))
from autoscaler_harness import (  # noqa: E402
    Fleet,
    Load,
    apply_crds,
    llmd_manifest,
    make_model,
    pod_metric,
    running_operator,
)

pytestmark = pytest.mark.slow

PROVISION_S = 10
SCRAPE_S = 2
DOWN_WINDOW_S = 20
POD_READY_S = 300
STATIC_NODE = "fs-node-0"


def _fleetserve(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fleetserve_cli.main", *args], capture_output=True, text=True,
                          timeout=1800)


@pytest.fixture(scope="module")
def karpenter_cluster() -> Iterator[DevClusterHandle]:
    missing = tools.missing_tools()
    if missing:
        pytest.fail(f"dev cluster tools not provisioned: {', '.join(missing)}; run `make install`", pytrace=False)
    base = free_port_base(22000, 23000)
    from fleetserve_devcluster.controlplane import default_state_dir

    state = default_state_dir().parent / f"karpenter-e2e-{os.getpid()}"
    up = _fleetserve("dev-cluster", "up", "--state-dir", str(state), "--port-base", str(base), "--nodes", "1",
                     "--gpus-per-node", "1", "--karpenter", "--max-gpu-nodes", "3",
                     "--node-provision-seconds", str(PROVISION_S))
    try:
        assert up.returncode == 0, f"dev-cluster up --karpenter failed:\n{up.stdout}\n{up.stderr}"
        yield DevClusterHandle(state, state / "kubeconfig", cluster_env(state), True)
    finally:
        for name in ("node-agent", "karpenter"):
            path = state / "logs" / f"{name}.log"
            if path.exists():
                sys.stderr.write(f"--- {name} log (tail) ---\n{path.read_text()[-4000:]}\n")
        _fleetserve("dev-cluster", "down", "--state-dir", str(state))


def karpenter_objects(cluster: DevClusterHandle) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(NodeClaims, Karpenter's nodes), live ones only."""
    claims = json.loads(cluster.kubectl("get", "nodeclaims", "-o", "json").stdout)["items"]
    nodes = json.loads(cluster.kubectl("get", "nodes", "-l", "karpenter.sh/nodepool", "-o", "json").stdout)["items"]
    return claims, nodes


def is_ready(obj: dict[str, Any]) -> bool:
    return any(c["type"] == "Ready" and c["status"] == "True" for c in (obj.get("status") or {}).get(
        "conditions") or [])


class Timeline:
    """Samples load, replicas, NodeClaims and nodes once a second."""

    def __init__(self, fleet: Fleet, cluster: DevClusterHandle, load: Load) -> None:
        self.fleet, self.cluster, self.load = fleet, cluster, load
        self.rows: list[dict[str, Any]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def stop(self) -> list[dict[str, Any]]:
        self._stop.set()
        self._thread.join(30)
        return self.rows

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                status = self.fleet.status()
                claims, nodes = karpenter_objects(self.cluster)
                self.rows.append({
                    "t": time.time(), "in_flight": self.load._in_flight, "completed": self.load.completed,
                    "desired": status.get("desiredReplicas"), "ready": status.get("readyReplicas"),
                    "waiting": ((status.get("autoscaler") or {}).get("waitingForNodes") or {}).get("pods", 0),
                    "progressing": next((c.get("reason") for c in status.get("conditions") or []
                                         if c.get("type") == "Progressing"), None),
                    "nodeclaims": len(claims), "nodes": len(nodes),
                    "ready_nodes": sum(1 for n in nodes if is_ready(n)),
                })
            except Exception as exc:  # noqa: BLE001 - a missed sample must not end the recording
                self.rows.append({"t": time.time(), "error": str(exc)})
            self._stop.wait(1.0)


def test_karpenter_grows_and_consolidates_the_fleets_gpu_nodes_with_zero_failed_requests(
        karpenter_cluster: DevClusterHandle, tmp_path: Path) -> None:
    cluster, namespace = karpenter_cluster, "karpenter-fleet"
    create_namespace(cluster, namespace)
    cluster.kubectl("label", "--overwrite", "namespace", namespace, "pod-security.kubernetes.io/enforce=restricted",
                    "pod-security.kubernetes.io/enforce-version=latest")
    apply_crds(cluster)
    model_dir = make_model(cluster.state_dir / "test-models" / "tiny-llama")
    log = tmp_path / "operator.log"
    try:
        with running_operator(cluster, namespace, log):
            run_scenario(cluster, namespace, model_dir)
    finally:
        sys.stderr.write(cluster.kubectl("get", "nodeclaims,nodes,pods", "-A", "-o", "wide", check=False).stdout)
        if log.exists():
            sys.stderr.write(f"--- operator log (tail) ---\n{log.read_text()[-6000:]}\n")


def run_scenario(cluster: DevClusterHandle, namespace: str, model_dir: Path) -> None:
    fleet = Fleet(cluster, namespace, "grow")
    autoscaling = {"enabled": True, "minReplicas": 1, "maxReplicas": 4, "targetQueueLength": 2,
                   "targetKVCacheUsage": 0.95, "scaleUpStabilizationSeconds": 0,
                   "scaleDownStabilizationSeconds": DOWN_WINDOW_S, "scrapeIntervalSeconds": SCRAPE_S}
    manifest = llmd_manifest("grow", model_dir, gpus=1, autoscaling=autoscaling)
    fleet.apply(manifest)  # scheduling.maxNodeProvisionSeconds: the default (900 s)
    wait_until(lambda: len(fleet.ready_pods()) == 1, POD_READY_S, "the first replica Ready")
    assert fleet.ready_pods()[0].spec.node_name == STATIC_NODE

    load = Load(fleet.proxy_address(), concurrency=6, max_tokens=32)
    timeline = Timeline(fleet, cluster, load)
    load.start()
    try:
        # 6 in flight, target 2 per replica: the operator asks for 3 (or 2 if its first tick saw less);
        # no GPU is free, the new replicas are Pending and Karpenter makes NodeClaims for them.
        wait_until(lambda: fleet.pending_unschedulable() >= 1, 180, "a replica Pending for lack of a GPU")
        wait_until(lambda: fleet.condition("Progressing").get("reason") == "WaitingForNodes", 60,
                   "Progressing reason WaitingForNodes")
        held = int(fleet.status()["desiredReplicas"])
        assert 2 <= held <= 3, fleet.status().get("autoscaler")
        wait_until(lambda: len(karpenter_objects(cluster)[0]) >= 1, 60, "Karpenter's NodeClaims")
        wait_until(lambda: len(fleet.ready_pods()) == held, POD_READY_S + PROVISION_S + 60,
                   f"{held} replicas Ready on Karpenter's nodes")
        claims, nodes = karpenter_objects(cluster)
        # Karpenter bin-packs: two Pending 1-GPU replicas may get one 4-GPU node or two 1-GPU nodes.
        assert 1 <= len(nodes) <= held - 1 and all(is_ready(n) for n in nodes), [n["metadata"]["name"]
                                                                                for n in nodes]
        nodes_made = len(nodes)
        placed = {p.spec.node_name for p in fleet.ready_pods()}
        assert placed == {STATIC_NODE, *(n["metadata"]["name"] for n in nodes)}, placed
        wait_until(lambda: all(pod_metric(p.status.pod_ip, "fleetserve_requests_total") > 0
                               for p in fleet.ready_pods()), 90, "every replica to serve requests")
        assert int(fleet.status()["desiredReplicas"]) <= held  # no overshoot

        # Scale-down under traffic: maxReplicas 1. The newest (Karpenter's) nodes' pods go first.
        cluster.kubectl("patch", "llmd", "grow", "-n", namespace, "--type=merge",
                        "-p", json.dumps({"spec": {"autoscaling": {"maxReplicas": 1}}}))
        wait_until(lambda: len(fleet.pods()) == 1 and len(fleet.ready_pods()) == 1, 180, "one replica left")
        assert fleet.ready_pods()[0].spec.node_name == STATIC_NODE
        time.sleep(2 * SCRAPE_S)  # requests keep flowing to the one replica
    finally:
        result = load.stop()

    # Karpenter consolidates the emptied nodes (WhenEmptyOrUnderutilized after 30 s).
    wait_until(lambda: karpenter_objects(cluster) == ([], []), 240, "Karpenter to remove its emptied nodes")
    rows = timeline.stop()
    assert result.failures == [], result.failures[:5]
    assert result.ok > 0
    assert any(r.get("progressing") == "WaitingForNodes" for r in rows)
    desired = [r["desired"] for r in rows if r.get("desired") is not None]
    assert max(desired) == held, desired
    assert max(r.get("nodeclaims", 0) for r in rows) == nodes_made  # no node beyond what the replicas needed
    out = os.environ.get("FLEETSERVE_KARPENTER_TIMELINE")
    if out:
        Path(out).write_text(json.dumps({"karpenter": karpenter.KARPENTER_VERSION, "provision_s": PROVISION_S,
                                         "scrape_s": SCRAPE_S, "down_window_s": DOWN_WINDOW_S, "ok": result.ok,
                                         "failed": len(result.failures), "rows": rows,
                                         "requests": result.requests}, indent=1))
