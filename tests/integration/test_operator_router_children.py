"""The router's children on the real API server and node agent (issue 16 point 2): created and
owned, the Service turns to the router pods once one is Ready, edits and deletions are repaired
like every other child (issue 14), and switching the router off removes them and turns the
Service back to the servers. The server pods are never scheduled here; the router pods run."""

from __future__ import annotations

import json
from typing import Any

import pytest
from fleetserve_devcluster.testing import DevClusterHandle
from operator_harness import apply, cheap, condition, events_for, get, install_crds, operator, wait_until

RESYNC_SECONDS = 3.0
CHILDREN = (("deployment", "edge-router"), ("poddisruptionbudget", "edge-router"), ("service", "edge-servers"),
            ("serviceaccount", "edge-router"), ("role", "edge-router"), ("rolebinding", "edge-router"))


@pytest.fixture(scope="module", autouse=True)
def crds(dev_cluster: DevClusterHandle) -> None:
    install_crds(dev_cluster)


def selector_app(cluster: DevClusterHandle, namespace: str) -> str | None:
    svc = get(cluster, namespace, "service", "edge") or {}
    return ((svc.get("spec") or {}).get("selector") or {}).get("app.kubernetes.io/name")


def image_of(dep: dict[str, Any] | None) -> str | None:
    containers = (((dep or {}).get("spec") or {}).get("template") or {}).get("spec", {}).get("containers") or [{}]
    return containers[0].get("image")


def test_router_children_switch_repair_and_removal(dev_cluster: DevClusterHandle, namespace: str) -> None:
    kubectl = dev_cluster.kubectl
    with operator(dev_cluster, namespace, resync_seconds=RESYNC_SECONDS):
        apply(dev_cluster, namespace, cheap("edge", router={"enabled": True, "replicas": 2}))
        for kind, name in CHILDREN:
            wait_until(lambda k=kind, n=name: get(dev_cluster, namespace, k, n), 60, f"{kind} {name}")
        cr = get(dev_cluster, namespace, "llmd", "edge") or {}
        for kind, name in CHILDREN:
            refs = (get(dev_cluster, namespace, kind, name) or {})["metadata"].get("ownerReferences") or []
            assert [r["uid"] for r in refs] == [cr["metadata"]["uid"]], (kind, refs)
        role = get(dev_cluster, namespace, "role", "edge-router") or {}
        assert role["rules"] == [{"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"],
                                  "verbs": ["list", "watch"]}]
        # The router pods run (no GPU, no node selector) and become Ready: the Service turns to them.
        wait_until(lambda: selector_app(dev_cluster, namespace) == "fleetserve-router", 180,
                   "Service edge to select the router pods")
        wait_until(lambda: (condition(get(dev_cluster, namespace, "llmd", "edge"), "RouterReady") or {})
                   .get("status") == "True", 60, "RouterReady=True")
        servers = get(dev_cluster, namespace, "service", "edge-servers") or {}
        assert servers["spec"]["selector"]["app.kubernetes.io/name"] == "fleetserve-server"

        # Drift: an edited router Deployment and a deleted Role are put back, with a Repaired event.
        image = image_of(get(dev_cluster, namespace, "deployment", "edge-router"))
        kubectl("set", "image", "-n", namespace, "deployment/edge-router", "router=other:1")
        kubectl("delete", "-n", namespace, "role", "edge-router")
        wait_until(lambda: image_of(get(dev_cluster, namespace, "deployment", "edge-router")) == image, 30,
                   "the router image restored")
        wait_until(lambda: get(dev_cluster, namespace, "role", "edge-router"), 30, "the Role recreated")
        wait_until(lambda: any("recreated Role edge-router" in e["message"] for e in events_for(
            dev_cluster, namespace, "edge") if e["reason"] == "Repaired"), 30, "a Repaired event naming the Role")

        # Off: the Service selects the servers again and every router child goes.
        kubectl("patch", "llmd", "edge", "-n", namespace, "--type=merge", "-p",
                json.dumps({"spec": {"router": {"enabled": False}}}))
        wait_until(lambda: selector_app(dev_cluster, namespace) == "fleetserve-server", 30,
                   "Service edge back on the server pods")
        for kind, name in CHILDREN:
            wait_until(lambda k=kind, n=name: get(dev_cluster, namespace, k, n) is None, 60, f"{kind} {name} deleted")
        wait_until(lambda: condition(get(dev_cluster, namespace, "llmd", "edge"), "RouterReady") is None, 30,
                   "RouterReady gone from the status")
