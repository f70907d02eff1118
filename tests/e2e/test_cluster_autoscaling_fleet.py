"""Cluster autoscaling end to end (issue 9), with the test in the Cluster Autoscaler's role.

The real Cluster Autoscaler cannot be built here (the Go module proxy answers 403 for
``k8s.io/autoscaler/cluster-autoscaler``; see the README's "Cluster autoscaling"), so the test does
what its ``kwok`` cloud provider does: it creates a GPU ``Node`` annotated
``kwok.x-k8s.io/node: fake`` for each pod that no node can take, and on scale-down drains
(``kubectl drain``: evictions, which respect the PDB) and deletes the nodes it emptied.
Everything else is real: a second dev cluster of its own (1 static node with 1 GPU, so the
GPU count is exact and no other test's pods compete), its node agent adopting the new nodes after
a provisioning delay, ``fleetserve operator``, ``fleetserve serve`` pods on a tiny Llama, and the
load through the Service's proxy address.

``FLEETSERVE_CA_TIMELINE=path.json`` saves the fleet's timeline (for
benchmarks/cluster_autoscaling_plot.py).
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
from fleetserve_devcluster import tools
from fleetserve_devcluster.testing import (
    DevClusterHandle,
    cluster_env,
    create_namespace,
    free_port_base,
    wait_until,
)

sys.path.insert(0, str(Path(__file__).parent))
from autoscaler_harness import (  # noqa: E402 - the harness sits next to this file
    Fleet,
    Load,
    apply_crds,
    llmd_manifest,
    make_model,
    pod_metric,
    running_operator,
)

pytestmark = pytest.mark.slow

PROVISION_S = 10  # the node agent's provisioning delay here (default 20 s)
SCRAPE_S = 2
DOWN_WINDOW_S = 20
POD_READY_S = 300  # a pod imports torch and loads the model on a shared CPU
STATIC_NODE = "fs-node-0"
DELETION_COST = "controller.kubernetes.io/pod-deletion-cost"


def _fleetserve(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fleetserve_cli.main", *args], capture_output=True, text=True,
                          timeout=300, env=env)


@pytest.fixture(scope="module")
def ca_cluster() -> Iterator[DevClusterHandle]:
    """A dev cluster of its own: 1 node × 1 GPU, adopted nodes Ready after PROVISION_S."""
    missing = tools.missing_tools()
    if missing:
        pytest.fail(f"dev cluster tools not provisioned: {', '.join(missing)}; run `make install`", pytrace=False)
    base = free_port_base(21000, 22000)
    # Not under /tmp: the server pods mount their own emptyDir there and would not see the model.
    from fleetserve_devcluster.controlplane import default_state_dir

    state = default_state_dir().parent / f"ca-e2e-{os.getpid()}"
    env = {**os.environ, "FLEETSERVE_DEV_NODE_PROVISION_SECONDS": str(PROVISION_S)}
    up = _fleetserve("dev-cluster", "up", "--state-dir", str(state), "--port-base", str(base),
                     "--nodes", "1", "--gpus-per-node", "1", env=env)
    try:
        assert up.returncode == 0, f"dev-cluster up failed:\n{up.stdout}\n{up.stderr}"
        yield DevClusterHandle(state, state / "kubeconfig", cluster_env(state), True)
    finally:
        agent_log = state / "logs" / "node-agent.log"
        if agent_log.exists():
            sys.stderr.write(f"--- node agent log (tail) ---\n{agent_log.read_text()[-5000:]}\n")
        _fleetserve("dev-cluster", "down", "--state-dir", str(state))


def kwok_gpu_node(name: str, gpus: int = 1) -> dict[str, Any]:
    """A node as the Cluster Autoscaler's kwok provider creates it from its GPU node template."""
    resources = {"cpu": "32", "memory": "128Gi", "pods": "110", "nvidia.com/gpu": str(gpus)}
    return {"apiVersion": "v1", "kind": "Node", "metadata": {
        "name": name, "annotations": {"kwok.x-k8s.io/node": "fake"},
        "labels": {"kubernetes.io/hostname": name, "kubernetes.io/os": "linux", "kubernetes.io/arch": "amd64",
                   "kwok-nodegroup": "gpu-pool", "nvidia.com/gpu.present": "true",
                   "nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}},
        "spec": {}, "status": {"capacity": resources, "allocatable": resources}}


def node_json(cluster: DevClusterHandle, name: str) -> dict[str, Any] | None:
    proc = cluster.kubectl("get", "node", name, "-o", "json", check=False)
    return json.loads(proc.stdout) if proc.returncode == 0 else None


def node_ready(node: dict[str, Any] | None) -> bool:
    return any(c["type"] == "Ready" and c["status"] == "True" for c in ((node or {}).get("status") or {}).get(
        "conditions") or [])


def ready_after_s(node: dict[str, Any]) -> float:
    """Seconds from the node's creation to its Ready transition (both second-resolution API times)."""
    from datetime import datetime

    def parse(text: str) -> float:
        return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()

    ready = next(c for c in node["status"]["conditions"] if c["type"] == "Ready")
    return parse(ready["lastTransitionTime"]) - parse(node["metadata"]["creationTimestamp"])


def remove_node_as_the_autoscaler_does(cluster: DevClusterHandle, name: str) -> None:
    cluster.kubectl("drain", name, "--ignore-daemonsets", "--delete-emptydir-data", "--timeout=120s", timeout=150)
    cluster.kubectl("delete", "node", name, "--wait=false")


def test_adopted_node_runs_pods_after_the_delay_and_stops_them_gracefully_when_deleted(
        ca_cluster: DevClusterHandle, tmp_path: Path) -> None:
    cluster, name, record = ca_cluster, "ca-echo-0", tmp_path / "events"
    namespace = "adopt-echo"
    create_namespace(cluster, namespace)
    cluster.kubectl("create", "-f", "-", input=json.dumps(kwok_gpu_node(name)))
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "echo"}, "spec": {
        "nodeSelector": {"kubernetes.io/hostname": name}, "terminationGracePeriodSeconds": 5,
        "containers": [{"name": "echo", "image": "fleetserve/echo",
                        "command": ["fleetserve", "dev-cluster", "echo", "--port", "8401", "--record", str(record),
                                    "--drain-seconds", "1"],
                        "resources": {"limits": {"nvidia.com/gpu": "1"}},
                        "readinessProbe": {"httpGet": {"path": "/ready", "port": 8401}, "periodSeconds": 1}}]}}
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(pod))

    adopted = wait_until(lambda: (lambda n: n if n and "fleetserve.io/node-agent" in (
        n["metadata"].get("finalizers") or []) else None)(node_json(cluster, name)), 30, "the agent to adopt the node")
    assert not node_ready(adopted)
    ready = wait_until(lambda: (lambda n: n if node_ready(n) else None)(node_json(cluster, name)),
                       PROVISION_S + 60, "the adopted node to become Ready")
    assert ready_after_s(ready) >= PROVISION_S - 1  # second-resolution timestamps
    assert ready["status"]["capacity"]["nvidia.com/gpu"] == "1"
    assert not any(t["key"] == "node.kubernetes.io/not-ready" for t in ready["spec"].get("taints") or [])

    def pod_ready() -> bool:
        p = json.loads(cluster.kubectl("get", "pod", "echo", "-n", namespace, "-o", "json").stdout)
        return any(c["type"] == "Ready" and c["status"] == "True" for c in p["status"].get("conditions") or [])

    wait_until(pod_ready, 120, "the echo pod on the adopted node to be Ready")
    assert record.read_text().startswith("start")

    cluster.kubectl("delete", "node", name, "--wait=false")  # the autoscaler's scale-down, without a drain
    wait_until(lambda: node_json(cluster, name) is None, 60, "the node to go once its pod stopped")
    events = [" ".join(line.split()[:2]) for line in record.read_text().splitlines()]
    assert "signal SIGTERM" in events and events[-1] == "exit 0", events  # stopped gracefully, not killed
    gone = cluster.kubectl("get", "pod", "echo", "-n", namespace, check=False)
    assert gone.returncode != 0 and "NotFound" in gone.stderr


class Timeline:
    """Samples load, replicas, waiting pods and nodes once a second."""

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
        from kubernetes import client

        core = client.CoreV1Api(self.cluster.api_client())
        while not self._stop.is_set():
            try:
                status = self.fleet.status()
                nodes = core.list_node().items
                pods = self.fleet.pods()
                self.rows.append({
                    "t": time.time(),
                    "in_flight": self.load._in_flight,
                    "completed": self.load.completed,
                    "desired": status.get("desiredReplicas"),
                    "ready": status.get("readyReplicas"),
                    "pods": len([p for p in pods if p.metadata.deletion_timestamp is None]),
                    "waiting": ((status.get("autoscaler") or {}).get("waitingForNodes") or {}).get("pods", 0),
                    "progressing": next((c.get("reason") for c in status.get("conditions") or []
                                         if c.get("type") == "Progressing"), None),
                    "nodes": len(nodes),
                    "ready_nodes": sum(1 for n in nodes if any(
                        c.type == "Ready" and c.status == "True" for c in n.status.conditions or [])),
                })
            except Exception as exc:  # noqa: BLE001 - a missed sample must not end the recording
                self.rows.append({"t": time.time(), "error": str(exc)})
            self._stop.wait(1.0)


def test_fleet_grows_onto_new_gpu_nodes_and_shrinks_off_them_with_zero_failed_requests(
        ca_cluster: DevClusterHandle, tmp_path: Path) -> None:
    cluster, namespace = ca_cluster, "ca-fleet"
    create_namespace(cluster, namespace)
    cluster.kubectl("label", "--overwrite", "namespace", namespace, "pod-security.kubernetes.io/enforce=restricted",
                    "pod-security.kubernetes.io/enforce-version=latest")  # as every e2e namespace (conftest.py)
    apply_crds(cluster)
    model_dir = make_model(cluster.state_dir / "test-models" / "tiny-llama")  # goes with `down`
    log = tmp_path / "operator.log"
    try:
        with running_operator(cluster, namespace, log):
            try:
                run_scenario(cluster, namespace, model_dir)
            except BaseException:
                sys.stderr.write(pods_and_container_logs(cluster))  # before the cleanup deletes the pods
                raise
    finally:
        if log.exists():
            sys.stderr.write(f"--- operator log (tail) ---\n{log.read_text()[-6000:]}\n")


def pods_and_container_logs(cluster: DevClusterHandle, lines: int = 15) -> str:
    """`kubectl get pods -A -o wide` and the last lines of every container log the node agent keeps."""
    out = [cluster.kubectl("get", "pods", "-A", "-o", "wide", check=False).stdout]
    for path in sorted((cluster.state_dir / "pods").glob("*/*.log")):
        tail = "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
        out.append(f"--- {path.parent.name}/{path.name} (tail) ---\n{tail}")
    return "\n".join(out) + "\n"


def run_scenario(cluster: DevClusterHandle, namespace: str, model_dir: Path) -> None:
    fleet = Fleet(cluster, namespace, "grow")
    manifest = llmd_manifest("grow", model_dir, gpus=1, autoscaling={
        "enabled": True, "minReplicas": 1, "maxReplicas": 4, "targetQueueLength": 2,
        "targetKVCacheUsage": 0.95, "scaleUpStabilizationSeconds": 0,
        "scaleDownStabilizationSeconds": DOWN_WINDOW_S, "scrapeIntervalSeconds": SCRAPE_S})
    manifest["spec"]["scheduling"] = {"maxNodeProvisionSeconds": 600}
    fleet.apply(manifest)
    wait_until(lambda: len(fleet.ready_pods()) == 1, POD_READY_S, "the first replica Ready")
    [first] = fleet.ready_pods()
    assert first.spec.node_name == STATIC_NODE

    load = Load(fleet.proxy_address(), concurrency=6, max_tokens=32)
    timeline = Timeline(fleet, cluster, load)
    load.start()
    created: list[str] = []
    try:
        # 6 in flight on one replica, target 2 each: the operator asks for 3 (or 2, if its first tick
        # saw the queue still building up — then the Pending pod stops further growth); no GPU is free.
        wait_until(lambda: fleet.pending_unschedulable() >= 1, 180, "a replica Pending for lack of a GPU")
        status = wait_until(lambda: (lambda s: s if ((s.get("autoscaler") or {}).get("waitingForNodes") or {})
                                     .get("pods") else None)(fleet.status()), 60, "status.autoscaler.waitingForNodes")
        held = int(status["desiredReplicas"])
        assert 2 <= held <= 3, status["autoscaler"]
        wait_until(lambda: fleet.condition("Progressing").get("reason") == "WaitingForNodes", 60,
                   "Progressing reason WaitingForNodes")
        assert fleet.condition("Degraded").get("status") != "True", fleet.condition("Degraded")
        # The queue stays at 6 on the one ready replica for several ticks: the waiting pods are the
        # capacity already asked for, so the size neither grows (maxReplicas is 4) nor shrinks.
        deadline = time.monotonic() + 4 * SCRAPE_S
        while time.monotonic() < deadline:
            assert int(fleet.status()["desiredReplicas"]) == held
            time.sleep(0.5)
        assert fleet.pending_unschedulable() == held - 1

        # The Cluster Autoscaler's part: one 1-GPU node per pending pod.
        for i in range(fleet.pending_unschedulable()):
            created.append(f"ca-gpu-{i}")
            cluster.kubectl("create", "-f", "-", input=json.dumps(kwok_gpu_node(created[-1])))
        for name in created:
            node = wait_until(lambda n=name: (lambda x: x if node_ready(x) else None)(node_json(cluster, n)),
                              PROVISION_S + 60, f"node {name} Ready")
            assert ready_after_s(node) >= PROVISION_S - 1
        wait_until(lambda: len(fleet.ready_pods()) == held, POD_READY_S, f"{held} replicas Ready")
        placed = {p.spec.node_name for p in fleet.ready_pods()}
        assert placed == {STATIC_NODE, *created}, placed
        wait_until(lambda: all(pod_metric(p.status.pod_ip, "fleetserve_requests_total") > 0
                               for p in fleet.ready_pods()), 90, "every replica to serve requests")
        wait_until(lambda: not (fleet.status().get("autoscaler") or {}).get("waitingForNodes"), 30,
                   "waitingForNodes to clear once the pods run")
        assert int(fleet.status()["desiredReplicas"]) <= held  # no overshoot once they run either
    finally:
        result = load.stop()

    wait_until(lambda: fleet.status().get("desiredReplicas") == 1, DOWN_WINDOW_S + 10 * SCRAPE_S + 60,
               "desiredReplicas back to 1")
    wait_until(lambda: len(fleet.pods()) == 1 and len(fleet.ready_pods()) == 1, 180, "one replica left")
    [last] = fleet.pods()
    # The pod-deletion-cost sent the adopted (newer) nodes' pods first: the static node keeps serving.
    assert last.spec.node_name == STATIC_NODE, last.spec.node_name
    assert DELETION_COST in (last.metadata.annotations or {})

    for name in created:  # the Cluster Autoscaler removes the emptied nodes
        remove_node_as_the_autoscaler_does(cluster, name)
    for name in created:
        wait_until(lambda n=name: node_json(cluster, n) is None, 90, f"node {name} removed")
    rows = timeline.stop()

    assert result.failures == [], result.failures[:5]
    assert result.ok > 0
    desired = [r["desired"] for r in rows if r.get("desired") is not None]
    assert max(desired) == held and held < 4, desired  # never more than the load asked for
    assert any(r.get("progressing") == "WaitingForNodes" for r in rows)
    out = os.environ.get("FLEETSERVE_CA_TIMELINE")
    if out:
        Path(out).write_text(json.dumps({"provision_s": PROVISION_S, "scrape_s": SCRAPE_S,
                                         "down_window_s": DOWN_WINDOW_S, "ok": result.ok,
                                         "failed": len(result.failures), "rows": rows,
                                         "requests": result.requests}, indent=1))


def test_a_pod_no_node_can_take_waits_for_nodes_then_degrades_with_a_warning_after_the_limit(
        ca_cluster: DevClusterHandle, tmp_path: Path) -> None:
    """No node has 2 GPUs and none comes: WaitingForNodes first, Degraded/Unschedulable after the limit."""
    cluster, namespace, limit_s = ca_cluster, "ca-overdue", 15
    create_namespace(cluster, namespace)
    apply_crds(cluster)
    model_dir = make_model(cluster.state_dir / "test-models" / "tiny-llama")
    fleet = Fleet(cluster, namespace, "big")
    manifest = llmd_manifest("big", model_dir, gpus=2, autoscaling={
        "enabled": True, "minReplicas": 1, "maxReplicas": 2, "scrapeIntervalSeconds": SCRAPE_S})
    manifest["spec"]["scheduling"] = {"maxNodeProvisionSeconds": limit_s}
    log = tmp_path / "operator.log"
    try:
        with running_operator(cluster, namespace, log):
            fleet.apply(manifest)
            waiting = wait_until(lambda: ((fleet.status().get("autoscaler") or {}).get("waitingForNodes") or {}),
                                 90, "status.autoscaler.waitingForNodes")
            if waiting.get("pods"):  # seen inside the limit (a slow first tick may only see it overdue)
                progressing = fleet.condition("Progressing")
                assert (progressing.get("status"), progressing.get("reason")) == ("True", "WaitingForNodes")
                assert fleet.condition("Degraded").get("status") != "True"
                assert not fleet.events("Unschedulable")
            # Past the limit the autoscaler's tick (not the minute-long resync) turns it into Degraded.
            degraded = wait_until(lambda: (lambda c: c if c.get("status") == "True" else None)(
                fleet.condition("Degraded")), limit_s + 40, "Degraded=True after maxNodeProvisionSeconds")
            assert degraded["reason"] == "Unschedulable" and "Insufficient nvidia.com/gpu" in degraded["message"]
            [event] = wait_until(lambda: fleet.events("Unschedulable"), 30, "an Unschedulable Warning event")
            assert event.type == "Warning"
            overdue = (fleet.status().get("autoscaler") or {}).get("waitingForNodes") or {}
            assert overdue.get("overdue") == 1 and overdue.get("pods") == 0, overdue
            assert int(fleet.status()["desiredReplicas"]) == 1  # nothing piled up behind it
    finally:
        if log.exists():
            sys.stderr.write(f"--- operator log (tail) ---\n{log.read_text()[-3000:]}\n")
