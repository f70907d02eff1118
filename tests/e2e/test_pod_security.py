"""The e2e namespaces really enforce the restricted Pod Security profile (issue 14, point 6).

The API server's PodSecurity admission (on by default in kube-apiserver) refuses a privileged
pod in a namespace the e2e `namespace` fixture made, and admits the operator's model-server pod
as it renders it: so the e2e tests, which create their pods there, fail on any violation.
"""

from __future__ import annotations

import json

from fleetserve_devcluster.testing import DevClusterHandle
from fleetserve_operator.api.spec import spec_from_body
from fleetserve_operator.reconcile.fit import check_memory_fit
from fleetserve_operator.resources.server import build_deployment

BUSYBOX = {"name": "c", "image": "fleetserve/echo", "command": ["fleetserve", "dev-cluster", "echo"]}


def pod(name: str, spec: dict[str, object]) -> str:
    return json.dumps({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name}, "spec": spec})


def test_a_privileged_pod_is_refused_in_an_e2e_namespace(dev_cluster: DevClusterHandle, namespace: str) -> None:
    labels = json.loads(dev_cluster.kubectl("get", "namespace", namespace, "-o", "json").stdout)["metadata"]["labels"]
    assert labels["pod-security.kubernetes.io/enforce"] == "restricted"
    privileged = {"containers": [{**BUSYBOX, "securityContext": {"privileged": True}}]}
    refused = dev_cluster.kubectl("create", "-n", namespace, "-f", "-", input=pod("privileged", privileged),
                                  check=False)
    assert refused.returncode != 0
    assert 'violates PodSecurity "restricted:latest"' in refused.stderr and "privileged" in refused.stderr, \
        refused.stderr
    # Not only privileged: a plain pod with no securityContext at all is refused as well.
    plain = dev_cluster.kubectl("create", "-n", namespace, "-f", "-", input=pod("plain", {"containers": [BUSYBOX]}),
                                check=False)
    assert plain.returncode != 0 and "runAsNonRoot" in plain.stderr, plain.stderr
    assert dev_cluster.kubectl("get", "pods", "-n", namespace, "-o", "name").stdout.strip() == ""


def test_the_operators_server_pod_is_admitted_there(dev_cluster: DevClusterHandle, namespace: str) -> None:
    body = {"metadata": {"name": "psa"}, "spec": {
        "model": {"source": "builtin:smollm2-135m-instruct"}, "resources": {"gpus": 0, "memory": "2Gi"},
        "modelCache": {"persistentVolumeClaim": {"claimName": "models"}},
        "scheduling": {"nodeSelector": {"fleetserve.io/test-no-such-node": "true"}}}}
    spec = spec_from_body(body)
    template = build_deployment("psa", namespace, spec, check_memory_fit(spec), 1)["spec"]["template"]
    created = dev_cluster.kubectl("create", "--dry-run=server", "-n", namespace, "-f", "-",
                                  input=pod("psa", template["spec"]), check=False)
    assert created.returncode == 0, created.stderr
