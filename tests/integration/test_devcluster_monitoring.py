"""`fleetserve dev-cluster up --monitoring` (issue 18): the Prometheus Operator reads real
ServiceMonitor and PrometheusRule objects, and upstream Prometheus runs the configuration it
generates, discovering targets through the dev cluster's API server (Kubernetes SD).

A plain `fleetserve dev-cluster echo` pod behind a Service stands in for a server: it has no
/metrics (the scrape answers 404), so its target is discovered but not up — discovery, not
scraping, is what this test is about (tests/e2e/test_monitoring_fleet.py scrapes real servers).
The monitoring components are added to the shared dev cluster and left running.
"""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.parse
import urllib.request
from typing import Any

import pytest
from fleetserve_devcluster.testing import DevClusterHandle, wait_until

BUILD_TIMEOUT_S = 1800  # a cold Go build of both binaries takes minutes on a loaded machine


@pytest.fixture(scope="module")
def prometheus_url(dev_cluster: DevClusterHandle) -> str:
    proc = subprocess.run([sys.executable, "-m", "fleetserve_cli.main", "dev-cluster", "up", "--monitoring",
                           "--state-dir", str(dev_cluster.state_dir)],
                          capture_output=True, text=True, timeout=BUILD_TIMEOUT_S)
    assert proc.returncode == 0, f"dev-cluster up --monitoring failed:\n{proc.stdout}\n{proc.stderr}"
    from fleetserve_devcluster import monitoring

    return monitoring.prometheus_url(dev_cluster.state_dir)


def _api(url: str, path: str, **params: str) -> Any:
    query = f"?{urllib.parse.urlencode(params)}" if params else ""
    with urllib.request.urlopen(f"{url}/api/v1/{path}{query}", timeout=30) as resp:
        body = json.load(resp)
    assert body["status"] == "success", body
    return body["data"]


def _objects(namespace: str) -> list[dict[str, Any]]:
    labels = {"app": "echo"}
    return [
        {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "echo", "namespace": namespace, "labels": labels},
         "spec": {"containers": [{"name": "echo", "image": "fleetserve/dev:echo",
                                  "command": ["fleetserve", "dev-cluster", "echo", "--port", "8080"],
                                  "ports": [{"name": "http", "containerPort": 8080}]}]}},
        {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "echo", "namespace": namespace, "labels": labels},
         "spec": {"selector": labels, "ports": [{"name": "http", "port": 8080, "targetPort": "http"}]}},
        {"apiVersion": "monitoring.coreos.com/v1", "kind": "ServiceMonitor",
         "metadata": {"name": "echo", "namespace": namespace},
         "spec": {"selector": {"matchLabels": labels}, "endpoints": [{"port": "http", "interval": "5s"}]}},
        {"apiVersion": "monitoring.coreos.com/v1", "kind": "PrometheusRule",
         "metadata": {"name": "echo", "namespace": namespace},
         "spec": {"groups": [{"name": "echo", "rules": [
             {"alert": "EchoTargetDown", "expr": f'up{{namespace="{namespace}"}} == 0', "for": "1m"}]}]}},
    ]


def test_operator_generated_config_discovers_a_service_monitors_pod(
    dev_cluster: DevClusterHandle, namespace: str, prometheus_url: str
) -> None:
    dev_cluster.kubectl("apply", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List",
                                                              "items": _objects(namespace)}))
    pod = wait_until(lambda: (p := json.loads(dev_cluster.kubectl("get", "pod", "-n", namespace, "echo", "-o",
                                                                  "json").stdout))["status"].get("podIP") and p,
                     120, "the echo pod's IP")

    def target() -> dict[str, Any] | None:
        active = _api(prometheus_url, "targets", state="active")["activeTargets"]
        return next((t for t in active if t["scrapePool"] == f"serviceMonitor/{namespace}/echo/0"), None)

    found = wait_until(target, 120, "the ServiceMonitor's target in Prometheus")
    meta = found["discoveredLabels"]
    assert meta["__meta_kubernetes_namespace"] == namespace
    assert meta["__meta_kubernetes_pod_name"] == "echo"
    assert meta["__meta_kubernetes_service_name"] == "echo"
    assert found["scrapeUrl"] == f"http://{pod['status']['podIP']}:8080/metrics"
    assert found["labels"]["pod"] == "echo" and found["labels"]["service"] == "echo"

    def rule() -> list[str] | None:
        names = [r["name"] for g in _api(prometheus_url, "rules")["groups"] if f"/{namespace}-echo-" in g["file"]
                 for r in g["rules"]]
        return names or None

    assert wait_until(rule, 120, "the PrometheusRule's group in /api/v1/rules") == ["EchoTargetDown"]


def test_one_pin_of_the_prometheus_operator() -> None:
    """The CRDs the tests install and the operator `up --monitoring` runs are one release."""
    from fleetserve_devcluster import monitoring
    from helm_util import PROMETHEUS_OPERATOR_VERSION

    assert monitoring.PROMETHEUS_OPERATOR_VERSION == PROMETHEUS_OPERATOR_VERSION
