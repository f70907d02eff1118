"""Node agent on a real control plane: GPU nodes, heartbeats, and GPU-aware scheduling of real pods."""

from __future__ import annotations

import json
from datetime import UTC, datetime

from fleetserve_devcluster.testing import DevClusterHandle
from nodeagent_util import container_env, echo_pod, get_json, pod, wait_until


def _config(cluster: DevClusterHandle) -> dict:
    return json.loads((cluster.state_dir / "cluster.json").read_text())


def test_nodes_are_ready_gpu_nodes(dev_cluster: DevClusterHandle) -> None:
    cfg = _config(dev_cluster)
    names = [f"fs-node-{i}" for i in range(cfg["nodes"])]
    out = dev_cluster.kubectl("get", "nodes", "-o",
                              r"custom-columns=NAME:.metadata.name,GPU:.status.capacity.nvidia\.com/gpu").stdout
    rows = {line.split()[0]: line.split()[1] for line in out.splitlines()[1:]}
    assert {n: rows.get(n) for n in names} == {n: str(cfg["gpus_per_node"]) for n in names}, out
    # The node-lifecycle controller lifts the `not-ready` taint asynchronously once a node
    # reports Ready; on a cluster started a moment ago this test would otherwise race it.
    wait_until(lambda: all(not get_json(dev_cluster, "node", n)["spec"].get("taints") for n in names), 60,
               "the node-lifecycle controller to lift the nodes' not-ready taints")
    for name in names:
        node = get_json(dev_cluster, "node", name)
        ready = {c["type"]: c["status"] for c in node["status"]["conditions"]}["Ready"]
        assert ready == "True"
        assert node["status"]["allocatable"]["nvidia.com/gpu"] == str(cfg["gpus_per_node"])
        assert node["metadata"]["labels"]["nvidia.com/gpu.present"] == "true"
        assert node["metadata"]["labels"]["nvidia.com/gpu.product"]
        assert not node["spec"].get("taints"), node["spec"].get("taints")
        lease = get_json(dev_cluster, "lease", name, "-n", "kube-node-lease")
        renewed = datetime.strptime(lease["spec"]["renewTime"], "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)
        assert (datetime.now(UTC) - renewed).total_seconds() < lease["spec"]["leaseDurationSeconds"]


def _gpu_pod(name: str, gpus: int, nodes: int) -> dict:
    """A GPU pod that may run only on the agent's own nodes (not on nodes an autoscaler test adds)."""
    p = echo_pod(name)
    p["spec"]["containers"][0]["resources"] = {"limits": {"nvidia.com/gpu": str(gpus)}}
    own = [f"fs-node-{i}" for i in range(nodes)]
    p["spec"]["affinity"] = {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
        {"matchExpressions": [{"key": "kubernetes.io/hostname", "operator": "In", "values": own}]}]}}}
    return p


def test_gpu_pods_fill_nodes_and_the_excess_stays_pending(dev_cluster: DevClusterHandle, namespace: str) -> None:
    cfg = _config(dev_cluster)
    gpus, nodes = cfg["gpus_per_node"], cfg["nodes"]
    assert gpus >= 1 and nodes >= 1, "the dev cluster needs GPU nodes for this test"
    # Too many GPUs for any node: Pending with the scheduler's reason.
    dev_cluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(_gpu_pod("huge", gpus + 1, nodes)))

    def unschedulable() -> str | None:
        p = pod(dev_cluster, namespace, "huge") or {}
        for c in p.get("status", {}).get("conditions", []):
            if c["type"] == "PodScheduled" and c["status"] == "False" and c.get("reason") == "Unschedulable":
                return str(c.get("message", ""))
        return None

    message = wait_until(unschedulable, 60, "pod 'huge' to be Unschedulable")
    assert "Insufficient nvidia.com/gpu" in message, message
    assert (pod(dev_cluster, namespace, "huge") or {})["status"]["phase"] == "Pending"

    # Whole-node GPU pods: at most one per node, and nodes+1 of them can never all fit.
    names = [f"full-{i}" for i in range(nodes + 1)]
    for name in names:
        dev_cluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(_gpu_pod(name, gpus, nodes)))

    def settled() -> tuple[dict[str, str], list[str]] | None:
        pods = {n: pod(dev_cluster, namespace, n) or {} for n in names}
        bound = {n: p["spec"]["nodeName"] for n, p in pods.items() if p.get("spec", {}).get("nodeName")}
        pending = [n for n, p in pods.items() if any(
            c["type"] == "PodScheduled" and c.get("reason") == "Unschedulable"
            for c in p.get("status", {}).get("conditions", []))]
        running = all(pods[n].get("status", {}).get("phase") == "Running" for n in bound)
        return (bound, pending) if running and len(bound) + len(pending) == len(names) else None

    bound, pending = wait_until(settled, 90, "every GPU pod either running or unschedulable")
    assert len(set(bound.values())) == len(bound), f"two whole-node GPU pods share a node: {bound}"
    assert pending, "more whole-node GPU pods than nodes, yet none is pending"
    # (Other tests may hold GPUs at the same time, so `bound` can be smaller than `nodes`.)
    for name, node in bound.items():
        p = pod(dev_cluster, namespace, name) or {}
        devices = container_env(p).get("NVIDIA_VISIBLE_DEVICES")
        assert devices == ",".join(f"{node}-gpu-{g}" for g in range(gpus))  # the device ids it was given
