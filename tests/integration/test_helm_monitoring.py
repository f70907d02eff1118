"""The chart on a cluster that has the Prometheus Operator's CRDs (as with kube-prometheus-stack),
installed with its default values (issue 14, point 5, the chart's side).

The operator creates a ServiceMonitor and a PrometheusRule per LLMDeployment whenever those CRDs
exist; the chart must grant it that with its defaults, or every LLMDeployment is refused with a 403.
The operator runs as the chart's ServiceAccount (the node agent runs its pod with the real token),
in a namespace that enforces the restricted Pod Security profile.

The CRDs are the Prometheus Operator's own, at a pinned version (hack/prometheus-operator-crds.sh,
from the Go module proxy; `make install` provisions them), never hand-written.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from fleetserve_devcluster.testing import DevClusterHandle
from helm_util import get_json, helm, install_prometheus_operator_crds, wait_until

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "fleetserve"
NOWHERE = {"nodeSelector": {"fleetserve.io/test-no-such-node": "true"}}


@pytest.fixture
def release(dev_cluster: DevClusterHandle, namespace: str) -> Iterator[str]:
    name = f"fs-{uuid.uuid4().hex[:8]}"
    yield name
    helm(dev_cluster, "uninstall", name, "-n", namespace, "--ignore-not-found", "--wait", "--timeout", "120s",
         check=False)


def llmd(cluster: DevClusterHandle, namespace: str, name: str) -> dict[str, Any] | None:
    proc = cluster.kubectl("get", "llmd", name, "-n", namespace, "-o", "json", check=False)
    return json.loads(proc.stdout) if proc.returncode == 0 else None


def condition(obj: dict[str, Any] | None, kind: str) -> dict[str, Any] | None:
    for cond in ((obj or {}).get("status") or {}).get("conditions") or []:
        if cond["type"] == kind:
            return dict(cond)
    return None


def test_default_chart_creates_the_monitoring_children_without_a_403(
    dev_cluster: DevClusterHandle, namespace: str, release: str
) -> None:
    install_prometheus_operator_crds(dev_cluster)
    dev_cluster.kubectl("label", "namespace", namespace, "pod-security.kubernetes.io/enforce=restricted")
    values = {
        "watchNamespaces": [namespace],
        "image": {"repository": "fleetserve/operator", "tag": "dev"},
        "llmDeployments": [{
            "name": "watched",
            "model": {"source": "builtin:smollm2-135m-instruct"},
            "resources": {"gpus": 0, "cpu": "1", "memory": "2Gi"},
            "engine": {"maxModelLen": 1024},
            "scheduling": NOWHERE,  # the server pod never starts: only the operator's writes matter
        }],
    }
    values_file = Path(dev_cluster.state_dir) / f"{release}-values.yaml"
    values_file.write_text(yaml.safe_dump(values))
    try:
        # Nothing but watchNamespaces, the local image and the CR: the chart's monitoring values stay default.
        helm(dev_cluster, "install", release, CHART, "-n", namespace, "-f", values_file,
             "--wait", "--timeout", "180s", timeout=200)
    finally:
        values_file.unlink(missing_ok=True)

    seen: list[Any] = [None]

    def reconciled() -> dict[str, Any] | None:
        obj = llmd(dev_cluster, namespace, "watched")
        seen[0] = (obj or {}).get("status")
        ready = condition(obj, "Ready")
        if obj is None or ready is None or "memory" not in (obj.get("status") or {}):
            return None
        if ready["reason"] == "ApplyRejected":  # fail fast with the operator's own words
            raise AssertionError(f"Ready=False/ApplyRejected: {ready['message']}")
        return obj

    try:
        obj = wait_until(reconciled, 180, "the LLMDeployment reconciled by the operator (status.memory written)")
    except AssertionError as exc:
        raise AssertionError(f"{exc}; status: {seen[0]}") from None
    assert obj["status"]["observedGeneration"] == obj["metadata"]["generation"]
    for kind in ("servicemonitor", "prometheusrule"):
        found = wait_until(lambda k=kind: get_json(dev_cluster, k, "-n", namespace)["items"], 60, f"the {kind}")
        [child] = found
        assert child["metadata"]["name"] == "watched"
        assert child["metadata"]["ownerReferences"][0]["uid"] == obj["metadata"]["uid"]
    events = get_json(dev_cluster, "events", "-n", namespace, "--field-selector", "type=Warning")["items"]
    forbidden = [e["message"] for e in events if "forbidden" in e["message"].lower()]
    assert not forbidden, forbidden
