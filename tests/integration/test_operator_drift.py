"""Level-triggered children (issue 14, point 1): what someone changes or deletes behind the
operator's back is put back, and an event on the LLMDeployment says what was repaired.

The operator runs with its default resync (10 minutes): every child, the PodDisruptionBudget
included, is watched, so each repair follows the change within the tests' 30 s.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from fleetserve_devcluster.testing import DevClusterHandle
from operator_harness import apply, cheap, events_for, get, install_crds, operator, wait_until


@pytest.fixture(scope="module", autouse=True)
def crds(dev_cluster: DevClusterHandle) -> None:
    install_crds(dev_cluster)


def container(dep: dict[str, Any] | None) -> dict[str, Any]:
    return dict(((dep or {}).get("spec") or {}).get("template", {}).get("spec", {}).get("containers", [{}])[0])


def repairs(cluster: DevClusterHandle, ns: str, name: str) -> list[str]:
    return [e["message"] for e in events_for(cluster, ns, name) if e["reason"] == "Repaired" and e["type"] == "Warning"]


def test_edited_children_are_restored_and_the_event_names_the_field(
    dev_cluster: DevClusterHandle, namespace: str
) -> None:
    kubectl = dev_cluster.kubectl
    with operator(dev_cluster, namespace):
        apply(dev_cluster, namespace, cheap("drift", replicas=2))
        wait_until(lambda: get(dev_cluster, namespace, "pdb", "drift") and get(dev_cluster, namespace, "configmap",
                   "drift-config") and get(dev_cluster, namespace, "service", "drift"), 30, "children incl. PDB")
        dep = wait_until(lambda: get(dev_cluster, namespace, "deployment", "drift"), 30, "the Deployment")
        image, probe = container(dep)["image"], container(dep)["readinessProbe"]
        config = (get(dev_cluster, namespace, "configmap", "drift-config") or {})["data"]

        kubectl("set", "image", "-n", namespace, "deployment/drift", "server=other:1")
        kubectl("patch", "-n", namespace, "deployment", "drift", "--type=json", "-p", json.dumps(
            [{"op": "replace", "path": "/spec/template/spec/containers/0/readinessProbe/periodSeconds",
              "value": 30}]))
        kubectl("patch", "-n", namespace, "configmap", "drift-config", "--type=merge",
                "-p", json.dumps({"data": {"server.yaml": "model: hand-edited\n"}}))
        kubectl("patch", "-n", namespace, "service", "drift", "--type=json", "-p", json.dumps(
            [{"op": "replace", "path": "/spec/ports/0/targetPort", "value": 9999}]))
        kubectl("patch", "-n", namespace, "pdb", "drift", "--type=merge", "-p", '{"spec":{"maxUnavailable":2}}')

        wait_until(lambda: container(get(dev_cluster, namespace, "deployment", "drift"))
                   .get("image") == image, 30, f"image {image} back on the Deployment")
        wait_until(lambda: container(get(dev_cluster, namespace, "deployment", "drift"))
                   .get("readinessProbe") == probe, 30, "the readiness probe restored")
        wait_until(lambda: (get(dev_cluster, namespace, "configmap", "drift-config") or {}).get("data") == config,
                   30, "server.yaml restored")
        wait_until(lambda: (get(dev_cluster, namespace, "service", "drift") or {}).get("spec", {})
                   .get("ports", [{}])[0].get("targetPort") == "http", 30, "the Service's targetPort restored")
        wait_until(lambda: (get(dev_cluster, namespace, "pdb", "drift") or {}).get("spec", {})
                   .get("maxUnavailable") == 1, 30, "the PDB's maxUnavailable restored")

        messages = wait_until(lambda: (m := repairs(dev_cluster, namespace, "drift"))
                              and any("image" in x for x in m) and m, 30, "a Repaired event naming the image")
        text = " ".join(messages)
        for fragment in ("Deployment", "ConfigMap", "Service", "PodDisruptionBudget", "other:1"):
            assert fragment in text, f"{fragment!r} not in the Repaired events: {messages}"


def test_deleted_children_are_recreated_with_an_event(dev_cluster: DevClusterHandle, namespace: str) -> None:
    with operator(dev_cluster, namespace):
        apply(dev_cluster, namespace, cheap("gone", replicas=2))
        names = {"deployment": "gone", "service": "gone", "configmap": "gone-config", "pdb": "gone"}
        first = {kind: wait_until(lambda k=kind, n=name: get(dev_cluster, namespace, k, n), 30, f"{kind} {name}")
                 for kind, name in names.items()}
        for kind, name in names.items():
            dev_cluster.kubectl("delete", "-n", namespace, kind, name, "--wait=false")
        for kind, name in names.items():
            uid = first[kind]["metadata"]["uid"]
            wait_until(lambda k=kind, n=name, u=uid: (o := get(dev_cluster, namespace, k, n))
                       and o["metadata"]["uid"] != u, 30, f"a new {kind} {name}")
        text = " ".join(wait_until(lambda: (m := repairs(dev_cluster, namespace, "gone"))
                                   and "PodDisruptionBudget" in " ".join(m) and m, 30, "Repaired events"))
        for kind in ("Deployment", "Service", "ConfigMap", "PodDisruptionBudget"):
            assert f"recreated {kind}" in text, f"no 'recreated {kind}' in the Repaired events: {text}"
