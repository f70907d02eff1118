"""One owner of the Deployment's replicas (issue 14, point 3).

Only the reconcile writes ``spec.replicas`` of the Deployment, as field manager ``fleetserve``
(server-side apply); the autoscaler decides the size in the LLMDeployment and never writes the
Deployment itself. A ``kubectl scale deployment`` by hand is reverted, with a Warning that says
to scale the LLMDeployment instead. Every version of the Deployment is watched, so a write by a
second manager that is undone a moment later is still caught.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from fleetserve_devcluster.testing import DevClusterHandle
from operator_harness import apply, cheap, events_for, get, install_crds, operator, wait_until


@pytest.fixture(scope="module", autouse=True)
def crds(dev_cluster: DevClusterHandle) -> None:
    install_crds(dev_cluster)


class DeploymentVersions:
    """Every version of one Deployment, from a real watch: (resourceVersion, replicas, replica owners)."""

    def __init__(self, cluster: DevClusterHandle, namespace: str, name: str) -> None:
        from kubernetes import client, watch

        self.api = client.AppsV1Api(cluster.api_client())
        self.watch = watch.Watch()
        self.namespace, self.name = namespace, name
        self.versions: list[tuple[str, int, list[str]]] = []
        self.error: Exception | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        try:
            for event in self.watch.stream(self.api.list_namespaced_deployment, self.namespace,
                                           field_selector=f"metadata.name={self.name}", timeout_seconds=300):
                obj = event["object"]
                owners = [m.manager for m in obj.metadata.managed_fields or []
                          if "f:replicas" in ((m.fields_v1 or {}).get("f:spec") or {})]
                self.versions.append((obj.metadata.resource_version, int(obj.spec.replicas), owners))
        except Exception as exc:  # the stream ends when the test stops it; anything earlier is a failure
            self.error = exc

    def owners(self) -> set[str]:
        return {o for _, _, owners in self.versions for o in owners}

    def replicas(self) -> list[int]:
        return [r for _, r, _ in self.versions]


@pytest.fixture
def versions(dev_cluster: DevClusterHandle, namespace: str) -> Iterator[Any]:
    def start(name: str) -> DeploymentVersions:
        watcher = DeploymentVersions(dev_cluster, namespace, name)
        watcher.thread.start()
        started.append(watcher)
        return watcher

    started: list[DeploymentVersions] = []
    yield start
    for watcher in started:
        watcher.watch.stop()


def warnings(cluster: DevClusterHandle, ns: str, name: str, reason: str) -> list[str]:
    return [e["message"] for e in events_for(cluster, ns, name) if e["reason"] == reason and e["type"] == "Warning"]


def test_hand_scaled_deployment_is_reverted_with_a_warning(
    dev_cluster: DevClusterHandle, namespace: str, versions: Any
) -> None:
    with operator(dev_cluster, namespace):
        watcher = versions("hand")
        apply(dev_cluster, namespace, cheap("hand", replicas=1))
        wait_until(lambda: get(dev_cluster, namespace, "deployment", "hand"), 30, "the Deployment")
        dev_cluster.kubectl("scale", "-n", namespace, "deployment/hand", "--replicas=3")
        wait_until(lambda: 3 in watcher.replicas(), 15, "the hand scale to 3 seen by the watch")
        wait_until(lambda: (get(dev_cluster, namespace, "deployment", "hand") or {}).get("spec", {})
                   .get("replicas") == 1, 30, "spec.replicas reverted to the LLMDeployment's 1")
        [message, *_] = wait_until(lambda: warnings(dev_cluster, namespace, "hand", "ScaledOutsideOperator"),
                                   30, "a ScaledOutsideOperator Warning")
        assert "kubectl scale llmd/hand" in message and "3" in message, message
        final = json.loads(dev_cluster.kubectl("get", "-n", namespace, "deployment", "hand", "-o", "json",
                                               "--show-managed-fields").stdout)
        owners = [m["manager"] for m in final["metadata"]["managedFields"]
                  if "f:replicas" in (m.get("fieldsV1") or {}).get("f:spec", {})]
        assert owners == ["fleetserve"], owners


def test_the_autoscaler_never_writes_the_deployment(
    dev_cluster: DevClusterHandle, namespace: str, versions: Any
) -> None:
    """Autoscaling on, the Deployment scaled by hand above maxReplicas: the size comes back to
    what the LLMDeployment decides, and no manager but ``fleetserve`` ever owned the replicas."""
    auto = {"enabled": True, "minReplicas": 1, "maxReplicas": 2, "scrapeIntervalSeconds": 1}
    with operator(dev_cluster, namespace):
        watcher = versions("auto")
        apply(dev_cluster, namespace, cheap("auto", autoscaling=auto))
        wait_until(lambda: get(dev_cluster, namespace, "deployment", "auto"), 30, "the Deployment")
        wait_until(lambda: ((get(dev_cluster, namespace, "llmd", "auto") or {}).get("status") or {})
                   .get("desiredReplicas") == 1, 30, "the autoscaler's first decision")
        dev_cluster.kubectl("scale", "-n", namespace, "deployment/auto", "--replicas=5")
        wait_until(lambda: 5 in watcher.replicas(), 15, "the hand scale to 5 seen by the watch")
        wait_until(lambda: (get(dev_cluster, namespace, "deployment", "auto") or {}).get("spec", {})
                   .get("replicas") == 1, 30, "spec.replicas back at the autoscaler's 1")
        wait_until(lambda: warnings(dev_cluster, namespace, "auto", "ScaledOutsideOperator"), 30,
                   "a ScaledOutsideOperator Warning")
    assert watcher.error is None, watcher.error
    assert watcher.owners() <= {"fleetserve", "kubectl", "kubectl-scale"}, watcher.versions
