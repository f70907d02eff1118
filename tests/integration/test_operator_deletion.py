"""Deletion never hangs (issue 14, point 7).

The operator puts no finalizer on an LLMDeployment (its background work — resync and the
autoscaler — is one loop per operator, not a kopf daemon per object), so with the operator
stopped an LLMDeployment and its namespace are deleted by the API server alone; the children
go with the namespace or by garbage collection. An LLMDeployment that still carries the
finalizer of an older operator loses it when the operator starts.
"""

from __future__ import annotations

import logging
import time
import uuid

import pytest
from fleetserve_devcluster.testing import DevClusterHandle, create_namespace
from operator_harness import apply, cheap, get, install_crds, operator, wait_until

OLD_FINALIZER = "fleetserve.io/finalizer"
RESTART_WINDOW_SECONDS = 3.0


@pytest.fixture(scope="module", autouse=True)
def crds(dev_cluster: DevClusterHandle) -> None:
    install_crds(dev_cluster)


def namespace_gone(cluster: DevClusterHandle, ns: str) -> bool:
    proc = cluster.kubectl("get", "namespace", ns, "--ignore-not-found", "-o", "name", check=False)
    return proc.returncode == 0 and not proc.stdout.strip()


def test_delete_with_the_operator_stopped_then_restart(
    dev_cluster: DevClusterHandle, caplog: pytest.LogCaptureFixture
) -> None:
    ns = f"test-{uuid.uuid4().hex[:10]}"
    create_namespace(dev_cluster, ns)
    auto = {"enabled": True, "minReplicas": 1, "maxReplicas": 2, "scrapeIntervalSeconds": 1}
    try:
        with operator(dev_cluster, ns, cleanup=False):
            apply(dev_cluster, ns, cheap("plain", replicas=2))
            apply(dev_cluster, ns, cheap("scaled", autoscaling=auto))
            for name in ("plain", "scaled"):
                wait_until(lambda n=name: get(dev_cluster, ns, "deployment", n), 30, f"the Deployment of {name}")
            wait_until(lambda: ((get(dev_cluster, ns, "llmd", "scaled") or {}).get("status") or {})
                       .get("desiredReplicas") == 1, 30, "an autoscaler decision")
            for name in ("plain", "scaled"):
                finalizers = (get(dev_cluster, ns, "llmd", name) or {})["metadata"].get("finalizers") or []
                assert finalizers == [], f"{name} carries finalizers {finalizers}"
        # operator stopped
        dev_cluster.kubectl("delete", "-n", ns, "llmd", "plain", "--wait=true", "--timeout=60s")
        dev_cluster.kubectl("delete", "namespace", ns, "--wait=false")
        wait_until(lambda: namespace_gone(dev_cluster, ns), 60, f"namespace {ns} gone", interval=1.0)

        caplog.set_level(logging.WARNING)
        caplog.clear()
        with operator(dev_cluster, ns, cleanup=False) as runner:
            # Nothing is there to wait for: give the restarted operator a window to stumble in.
            time.sleep(RESTART_WINDOW_SECONDS)
        problems = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
        assert not problems, problems
        assert runner.exception is None, runner.exception
        assert "Traceback" not in runner.output, runner.output[-3000:]
        assert namespace_gone(dev_cluster, ns)
    finally:
        release_finalizers(dev_cluster, ns)
        dev_cluster.kubectl("delete", "namespace", ns, "--wait=false", "--ignore-not-found", check=False)


def release_finalizers(cluster: DevClusterHandle, ns: str) -> None:
    """Leave no namespace stuck on the shared cluster when the test fails (an older operator's finalizer)."""
    names = cluster.kubectl("get", "llmd", "-n", ns, "-o", "name", check=False).stdout.split()
    for name in names:
        cluster.kubectl("patch", "-n", ns, name, "--type=merge", "-p", '{"metadata":{"finalizers":null}}',
                        check=False)


def test_a_finalizer_left_by_an_older_operator_is_removed(dev_cluster: DevClusterHandle, namespace: str) -> None:
    body = cheap("legacy")
    body["metadata"]["finalizers"] = [OLD_FINALIZER]
    apply(dev_cluster, namespace, body)
    with operator(dev_cluster, namespace, cleanup=False):
        wait_until(lambda: get(dev_cluster, namespace, "deployment", "legacy"), 30, "the Deployment")
        wait_until(lambda: not (get(dev_cluster, namespace, "llmd", "legacy") or {})["metadata"].get("finalizers"),
                   30, "the old finalizer removed")
    try:
        dev_cluster.kubectl("delete", "-n", namespace, "llmd", "legacy", "--wait=true", "--timeout=30s")
        assert get(dev_cluster, namespace, "llmd", "legacy") is None
    finally:
        release_finalizers(dev_cluster, namespace)
