"""CRD upgrades (issue 14, point 9): Helm installs crds/ once and never upgrades it, so the chart's
operator applies its own CRD at start (`--apply-crd`, value operator.applyCRD, on by default).

The cluster starts with an older LLMDeployment CRD: today's, minus one field (`spec.podAnnotations`),
put in place with a PUT as an older release's `helm install` would have left it. The API server then
refuses a CR that uses the field. After `helm install` of this chart (whose crds/ Helm skips: the
CRD exists), the operator — running as the chart's ServiceAccount — has applied the new CRD, and a
CR using the field is admitted and honoured: the annotation reaches the pods' template.

Only `podAnnotations` is taken away, and only for the seconds before the operator starts, so the
other tests sharing the dev cluster (none of which use it) are not disturbed.
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
from helm_util import get_json, helm, wait_until

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "fleetserve"
CRD = "crd/llmdeployments.fleetserve.io"
NOWHERE = {"nodeSelector": {"fleetserve.io/test-no-such-node": "true"}}


@pytest.fixture
def release(dev_cluster: DevClusterHandle, namespace: str) -> Iterator[str]:
    name = f"fs-{uuid.uuid4().hex[:8]}"
    try:
        yield name
    finally:
        helm(dev_cluster, "uninstall", name, "-n", namespace, "--ignore-not-found", "--wait", "--timeout", "120s",
             check=False)
        # Whatever happened, the shared cluster gets the full CRD back.
        dev_cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(REPO / "crds"), check=False)


def older_crd(live: dict[str, Any]) -> dict[str, Any]:
    """Today's CRD without spec.podAnnotations, as a PUT over the live object."""
    crd = yaml.safe_load((REPO / "crds" / "fleetserve.io_llmdeployments.yaml").read_text())
    del crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]["podAnnotations"]
    rules = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["x-kubernetes-validations"]
    rules[:] = [r for r in rules if "podAnnotations" not in r["rule"]]
    crd["metadata"]["resourceVersion"] = live["metadata"]["resourceVersion"]
    return crd


def spec_properties(cluster: DevClusterHandle) -> dict[str, Any]:
    crd = get_json(cluster, CRD)
    return dict(crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"])


def cr(name: str) -> dict[str, Any]:
    return {
        "apiVersion": "fleetserve.io/v1alpha1", "kind": "LLMDeployment", "metadata": {"name": name},
        "spec": {"model": {"source": "builtin:smollm2-135m-instruct"}, "resources": {"gpus": 0, "memory": "2Gi"},
                 "engine": {"maxModelLen": 1024}, "scheduling": NOWHERE,
                 "podAnnotations": {"example.com/new-field": "honoured"}},
    }


def test_helm_upgrade_makes_a_new_crd_field_usable(dev_cluster: DevClusterHandle, namespace: str, release: str) -> None:
    dev_cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(REPO / "crds"))
    dev_cluster.kubectl("wait", "--for=condition=Established", CRD, "--timeout=60s")
    dev_cluster.kubectl("label", "namespace", namespace, "pod-security.kubernetes.io/enforce=restricted")
    dev_cluster.kubectl("replace", "-f", "-", input=json.dumps(older_crd(get_json(dev_cluster, CRD))))
    wait_until(lambda: "podAnnotations" not in spec_properties(dev_cluster), 30, "the older CRD in place")
    refused = dev_cluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(cr("early")), check=False)
    assert refused.returncode != 0 and "podAnnotations" in refused.stderr, (refused.stdout, refused.stderr)

    values = {"watchNamespaces": [namespace], "image": {"repository": "fleetserve/operator", "tag": "dev"}}
    values_file = Path(dev_cluster.state_dir) / f"{release}-values.yaml"
    values_file.write_text(yaml.safe_dump(values))
    try:
        helm(dev_cluster, "install", release, CHART, "-n", namespace, "-f", values_file,
             "--wait", "--timeout", "180s", timeout=200)
    finally:
        values_file.unlink(missing_ok=True)

    wait_until(lambda: "podAnnotations" in spec_properties(dev_cluster), 120,
               "the operator to apply its own CRD with spec.podAnnotations")
    crd = get_json(dev_cluster, CRD, "--show-managed-fields")
    managers = {f["manager"] for f in crd["metadata"]["managedFields"]}
    assert "fleetserve-operator-crd" in managers, managers
    assert crd["metadata"]["annotations"]["fleetserve.io/operator-version"]

    dev_cluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(cr("upgraded")))
    dep = wait_until(lambda: (d := get_json(dev_cluster, "deployments", "-n", namespace, "-l",
                                            "app.kubernetes.io/instance=upgraded")["items"]) and d[0],
                     120, "the Deployment of the CR that uses the new field")
    assert dep["spec"]["template"]["metadata"]["annotations"]["example.com/new-field"] == "honoured"
    dev_cluster.kubectl("delete", "llmd", "upgraded", "-n", namespace, "--wait=true", "--timeout=60s", check=False)
