"""Node-aware scaling on a real control plane (issue 17 point 2): what the API server, the scheduler,
the ReplicaSet controller and the node agent really do with what the operator writes.

Adopted (kwok) nodes here carry a test taint that only this file's pods tolerate, so no other
test's pod lands on them, and are deleted at the end of each test.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from fleetserve_devcluster.adopt import Action, Adopter
from fleetserve_devcluster.kube import Kube as DevKube
from fleetserve_devcluster.testing import DevClusterHandle
from fleetserve_operator.autoscaler import controller
from fleetserve_operator.autoscaler.nodes import DELETION_COST_ANNOTATION, DO_NOT_DISRUPT_ANNOTATION
from fleetserve_operator.autoscaler.pods import take_census
from fleetserve_operator.autoscaler.scraper import ScrapeResult
from fleetserve_operator.autoscaler.types import PodMetrics
from fleetserve_operator.kube import Kube
from nodeagent_util import echo_container, echo_pod, get_json, pod, wait_until
from operator_harness import apply, cheap, get, install_crds

TEST_TAINT = {"key": "fleetserve.io/test-adopted-node", "value": "h17", "effect": "NoSchedule"}
TOLERATE = [{"key": TEST_TAINT["key"], "operator": "Exists"}]


def kwok_node(name: str, gpus: int = 1, adoptable: bool = True) -> dict[str, Any]:
    resources = {"cpu": "32", "memory": "128Gi", "pods": "110", "nvidia.com/gpu": str(gpus)}
    return {"apiVersion": "v1", "kind": "Node", "metadata": {
        "name": name, "annotations": {"kwok.x-k8s.io/node": "fake"} if adoptable else {},
        "labels": {"kubernetes.io/hostname": name, "kubernetes.io/os": "linux", "kubernetes.io/arch": "amd64"}},
        "spec": {"taints": [TEST_TAINT]}, "status": {"capacity": resources, "allocatable": resources}}


@pytest.fixture
def new_node(dev_cluster: DevClusterHandle) -> Iterator[str]:
    """An adoptable GPU node, deleted (finalizers dropped) at the end."""
    name = f"kwok-{uuid.uuid4().hex[:8]}"
    dev_cluster.kubectl("create", "-f", "-", input=json.dumps(kwok_node(name)))
    try:
        yield name
    finally:
        dev_cluster.kubectl("delete", "node", name, "--wait=false", "--ignore-not-found", check=False)
        dev_cluster.kubectl("patch", "node", name, "--type=merge", "-p", '{"metadata":{"finalizers":null}}',
                            check=False)


def node_ready(cluster: DevClusterHandle, name: str) -> dict[str, Any] | None:
    node = get_json(cluster, "node", name)
    ready = any(c["type"] == "Ready" and c["status"] == "True" for c in node["status"].get("conditions") or [])
    return node if ready and not any(t["key"] == "node.kubernetes.io/not-ready" for t in node["spec"].get(
        "taints") or []) else None


def running_pod(cluster: DevClusterHandle, namespace: str, name: str) -> dict[str, Any] | None:
    p = pod(cluster, namespace, name)
    ready = p and any(c["type"] == "Ready" and c["status"] == "True" for c in p["status"].get("conditions") or [])
    return p if ready else None


def scheduled_false(cluster: DevClusterHandle, namespace: str, name: str) -> dict[str, Any] | None:
    p = pod(cluster, namespace, name)
    conds = (p or {}).get("status", {}).get("conditions") or []
    return p if any(c["type"] == "PodScheduled" and c["status"] == "False" for c in conds) else None


# --- scheduling.maxNodeProvisionSeconds defaults to 900 ---------------------------------------


def test_the_api_server_defaults_max_node_provision_seconds_to_900(dev_cluster: DevClusterHandle,
                                                                    namespace: str) -> None:
    install_crds(dev_cluster)
    apply(dev_cluster, namespace, cheap("defaulted"))
    cr = get(dev_cluster, namespace, "llmd", "defaulted")
    assert cr is not None and cr["spec"]["scheduling"]["maxNodeProvisionSeconds"] == 900


# --- only capacity shortfalls hold growth -------------------------------------------------------


def test_the_schedulers_words_tell_a_capacity_shortfall_from_a_bad_selector(dev_cluster: DevClusterHandle,
                                                                             namespace: str) -> None:
    container = echo_container(resources={"limits": {"nvidia.com/gpu": "64"}})
    apply(dev_cluster, namespace, echo_pod("too-big", container=container))
    apply(dev_cluster, namespace, echo_pod("no-such-node", nodeSelector={"fleetserve.io/no-such-node": "x"}))
    pods = [wait_until(lambda n=n: scheduled_false(dev_cluster, namespace, n), 60, f"{n} Unschedulable")
            for n in ("too-big", "no-such-node")]
    census = take_census(pods)
    # A node autoscaler can add a node with 64 GPUs; no node will ever match the bad selector.
    assert (census.unschedulable, census.unplaceable) == (1, 1), [
        c["message"] for p in pods for c in p["status"]["conditions"] if c["type"] == "PodScheduled"]


# --- pod-deletion-cost changes which pod the ReplicaSet deletes ---------------------------------


def test_deletion_cost_makes_the_replicaset_empty_the_newest_node(dev_cluster: DevClusterHandle, namespace: str,
                                                                   new_node: str) -> None:
    wait_until(lambda: node_ready(dev_cluster, new_node), 90, f"node {new_node} adopted and Ready")
    labels = {"app": "order"}
    # One pod on the old node, two on the new one, the busy one created last. On its own the
    # ReplicaSet deletes from the node with more of its pods the most recently Ready pod: the busy one.
    for name, node in (("old", "fs-node-0"), ("new-idle", new_node), ("new-busy", new_node)):
        body = echo_pod(name, nodeName=node, tolerations=TOLERATE)
        body["metadata"]["labels"] = labels
        apply(dev_cluster, namespace, body)
        wait_until(lambda n=name: running_pod(dev_cluster, namespace, n), 120, f"pod {name} Ready")
    rs = {"apiVersion": "apps/v1", "kind": "ReplicaSet", "metadata": {"name": "order"},
          "spec": {"replicas": 3, "selector": {"matchLabels": labels}, "template": {
              "metadata": {"labels": labels}, "spec": echo_pod("x", tolerations=TOLERATE)["spec"]}}}
    apply(dev_cluster, namespace, rs)
    names = ("old", "new-idle", "new-busy")
    wait_until(lambda: all((pod(dev_cluster, namespace, n) or {}).get("metadata", {}).get("ownerReferences")
                           for n in names), 30, "the ReplicaSet to adopt the pods")

    kube = Kube(dev_cluster.api_client())
    scrape = ScrapeResult(metrics=(PodMetrics(pod="old", queue_length=1, kv_cache_usage=0.1),
                                   PodMetrics(pod="new-idle", queue_length=0, kv_cache_usage=0.0),
                                   PodMetrics(pod="new-busy", queue_length=5, kv_cache_usage=0.5)), failures=())
    controller._mark_deletion_costs(kube, namespace, kube.list("Pod", namespace, "app=order"), scrape)
    costs = {n: int((pod(dev_cluster, namespace, n) or {})["metadata"]["annotations"][DELETION_COST_ANNOTATION])
             for n in names}
    assert sorted(costs, key=costs.__getitem__) == ["new-idle", "new-busy", "old"], costs

    dev_cluster.kubectl("scale", "-n", namespace, "rs/order", "--replicas=2")
    wait_until(lambda: len([p for p in kube.list("Pod", namespace, "app=order")
                            if not p["metadata"].get("deletionTimestamp")]) == 2, 60, "two pods left")
    left = sorted(p["metadata"]["name"] for p in kube.list("Pod", namespace, "app=order")
                  if not p["metadata"].get("deletionTimestamp"))
    # The idle pod on the newest node went: not the busy one, and not the old node's only pod.
    assert left == ["new-busy", "old"], left


# --- karpenter.sh/do-not-disrupt -------------------------------------------------------------------


def test_do_not_disrupt_is_on_busy_pods_and_off_idle_ones_only_when_the_fleet_shrinks(
        dev_cluster: DevClusterHandle, namespace: str) -> None:
    for name in ("busy", "idle"):
        body = echo_pod(name)
        body["metadata"]["labels"] = {"app": "dnd"}
        apply(dev_cluster, namespace, body)
        wait_until(lambda n=name: running_pod(dev_cluster, namespace, n), 120, f"pod {name} Ready")
    kube = Kube(dev_cluster.api_client())
    scrape = ScrapeResult(metrics=(PodMetrics(pod="busy", queue_length=2, kv_cache_usage=0.2),
                                   PodMetrics(pod="idle", queue_length=0, kv_cache_usage=0.0)), failures=())

    def annotations() -> dict[str, str | None]:
        return {n: ((pod(dev_cluster, namespace, n) or {})["metadata"].get("annotations") or {}).get(
            DO_NOT_DISRUPT_ANNOTATION) for n in ("busy", "idle")}

    controller._mark_do_not_disrupt(kube, namespace, kube.list("Pod", namespace, "app=dnd"), scrape, False)
    assert annotations() == {"busy": "true", "idle": "true"}
    controller._mark_do_not_disrupt(kube, namespace, kube.list("Pod", namespace, "app=dnd"), scrape, True)
    assert annotations() == {"busy": "true", "idle": None}


# --- the node agent's adoption -----------------------------------------------------------------------


def test_a_node_being_deleted_is_cordoned_while_its_pods_stop(dev_cluster: DevClusterHandle, namespace: str,
                                                               new_node: str) -> None:
    wait_until(lambda: node_ready(dev_cluster, new_node), 90, f"node {new_node} adopted and Ready")
    # A pod that takes its grace period to stop (SIGTERM ignored), so the drain lasts a while.
    apply(dev_cluster, namespace, echo_pod("slow", ["--ignore-sigterm"], nodeName=new_node, tolerations=TOLERATE,
                                           terminationGracePeriodSeconds=30))
    wait_until(lambda: (p := pod(dev_cluster, namespace, "slow")) and p["status"].get("phase") == "Running",
               120, "pod slow Running")
    dev_cluster.kubectl("delete", "node", new_node, "--wait=false")
    node = wait_until(lambda: (n := get_json(dev_cluster, "node", new_node))["spec"].get("unschedulable") and n,
                      30, "the agent to cordon the node it drains")
    assert node["metadata"].get("deletionTimestamp")
    # A replacement pod aimed at that node is not bound to it while the node is on its way out.
    apply(dev_cluster, namespace, echo_pod("replacement", tolerations=TOLERATE,
                                           nodeSelector={"kubernetes.io/hostname": new_node}))
    late = wait_until(lambda: scheduled_false(dev_cluster, namespace, "replacement"), 30, "replacement Unschedulable")
    assert not late["spec"].get("nodeName")


def test_adoption_keeps_a_taint_someone_added_after_the_agent_read_the_node(dev_cluster: DevClusterHandle) -> None:
    # Not annotated on the server, so the cluster's own agent leaves it alone; the Adopter under
    # test reads it as adoptable, and another writer adds a taint between its read and its patch.
    name = f"kwok-{uuid.uuid4().hex[:8]}"
    dev_cluster.kubectl("create", "-f", "-", input=json.dumps(kwok_node(name, adoptable=False)))
    try:
        kube = DevKube.from_kubeconfig(dev_cluster.kubeconfig)
        stale = kube.get(f"/api/v1/nodes/{name}")
        stale["metadata"]["annotations"] = {"kwok.x-k8s.io/node": "fake"}
        other = {"key": "example.com/added-meanwhile", "effect": "NoSchedule"}
        dev_cluster.kubectl("patch", "node", name, "--type=json", "-p",
                            json.dumps([{"op": "add", "path": "/spec/taints/-", "value": other}]))
        adopter = Adopter(kube, 5.0, {}, 0, 1, lambda *a: {})
        applied = adopter._act(stale, Action.ADOPT)
        taints = [t["key"] for t in get_json(dev_cluster, "node", name)["spec"].get("taints") or []]
        assert other["key"] in taints, taints
        assert applied is False  # 409: the agent reads the node again on its next pass

        def adopt_fresh() -> bool:  # the next pass (the node-lifecycle controller may write it too)
            fresh = kube.get(f"/api/v1/nodes/{name}")
            fresh["metadata"]["annotations"] = {"kwok.x-k8s.io/node": "fake"}
            return adopter._act(fresh, Action.ADOPT)

        wait_until(adopt_fresh, 30, "the adoption to apply on a fresh read")
        node = get_json(dev_cluster, "node", name)
        # (the not-ready taint it added is the node-lifecycle controller's to keep or lift from here:
        # this node reports no conditions, as no agent heartbeats it)
        assert "example.com/added-meanwhile" in {t["key"] for t in node["spec"]["taints"]}
        assert "fleetserve.io/node-agent" in node["metadata"]["finalizers"]
    finally:
        dev_cluster.kubectl("patch", "node", name, "--type=merge", "-p", '{"metadata":{"finalizers":null}}',
                            check=False)
        dev_cluster.kubectl("delete", "node", name, "--wait=false", "--ignore-not-found", check=False)
