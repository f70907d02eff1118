"""CR labels never roll model pods (issue 14, point 2), on the real API server.

`kubectl label llmd x team=a` and a Helm chart version bump (the chart stamps
`helm.sh/chart` on the LLMDeployments it renders) change only the CR's
metadata. Only the selector labels and an explicit `spec.podLabels` may reach
the pod template, so neither may replace a pod: on a real GPU every
replacement reloads the model for minutes.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from fleetserve_devcluster.testing import DevClusterHandle
from operator_harness import apply, cheap, get, install_crds, operator, wait_until

SELECTOR = "app.kubernetes.io/name=fleetserve-server,app.kubernetes.io/instance={}"


@pytest.fixture(scope="module", autouse=True)
def crds(dev_cluster: DevClusterHandle) -> None:
    install_crds(dev_cluster)


def _items(cluster: DevClusterHandle, ns: str, kind: str, name: str) -> list[dict[str, Any]]:
    proc = cluster.kubectl("get", kind, "-n", ns, "-l", SELECTOR.format(name), "-o", "json")
    return [o for o in json.loads(proc.stdout)["items"] if not o["metadata"].get("deletionTimestamp")]


def _uids(objs: list[dict[str, Any]]) -> set[str]:
    return {o["metadata"]["uid"] for o in objs}


def test_relabelling_the_cr_and_a_chart_bump_replace_no_pod(dev_cluster: DevClusterHandle, namespace: str) -> None:
    body = cheap("labelled")
    body["metadata"]["labels"] = {"helm.sh/chart": "fleetserve-0.1.0", "team": "a"}
    with operator(dev_cluster, namespace):
        apply(dev_cluster, namespace, body)
        pods = wait_until(lambda: _items(dev_cluster, namespace, "pods", "labelled"), 60, "the first pod")
        replica_sets = _items(dev_cluster, namespace, "replicasets", "labelled")

        # A relabel and a chart bump, then a spec change that makes the operator reconcile for sure
        # (label changes alone wake it only at the next resync or child event).
        dev_cluster.kubectl("label", "llmd", "labelled", "-n", namespace, "--overwrite",
                            "team=b", "helm.sh/chart=fleetserve-0.2.0", "cost-center=42")
        dev_cluster.kubectl("patch", "llmd", "labelled", "-n", namespace, "--type=merge",
                            "-p", json.dumps({"spec": {"replicas": 2}}))
        wait_until(lambda: (d := get(dev_cluster, namespace, "deployment", "labelled"))
                   and d["spec"]["replicas"] == 2, 30, "the Deployment scaled to 2")
        wait_until(lambda: len(_items(dev_cluster, namespace, "pods", "labelled")) >= 2, 30, "a second pod")

        assert _uids(_items(dev_cluster, namespace, "replicasets", "labelled")) == _uids(replica_sets), \
            "a new ReplicaSet: the pod template changed and the pods are being replaced"
        now = _items(dev_cluster, namespace, "pods", "labelled")
        assert _uids(pods) <= _uids(now), "the original pod was replaced"
        assert len(now) == 2, [p["metadata"]["name"] for p in now]
        dep = get(dev_cluster, namespace, "deployment", "labelled")
        assert dep is not None
        labels = dep["spec"]["template"]["metadata"]["labels"]
        assert not {"team", "helm.sh/chart", "cost-center"} & set(labels), labels
