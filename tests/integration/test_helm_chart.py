"""The Helm chart on the dev cluster's real API server: server-side validation, schema errors at
install time, least-privilege RBAC by impersonation, and a full install → model Ready → `helm test`
→ uninstall.

Every release is namespaced to the test's throwaway namespace (`watchNamespaces: [ns]`), so its
operator never touches another test's objects. The node agent runs the operator and server pods
as local `fleetserve ...` processes with their ServiceAccount's real token.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from fleetserve_devcluster.testing import DevClusterHandle
from helm_util import get_json, helm, install_prometheus_operator_crds, wait_until

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "fleetserve"
def can_i(cluster: DevClusterHandle, subject: str, verb: str, resource: str, namespace: str | None) -> bool:
    ns = ["-n", namespace] if namespace else ["--all-namespaces"]
    proc = cluster.kubectl("auth", "can-i", verb, resource, *ns, f"--as={subject}", check=False)
    answer = proc.stdout.strip()
    assert answer in ("yes", "no"), f"kubectl auth can-i {verb} {resource}: {proc.stdout} {proc.stderr}"
    return answer == "yes"


@pytest.fixture(autouse=True)
def restricted(dev_cluster: DevClusterHandle, namespace: str) -> None:
    """Every release lands in a namespace that enforces the restricted Pod Security profile: the API
    server's PodSecurity admission refuses any pod of the chart (operator, hooks, model servers)
    that violates it."""
    dev_cluster.kubectl("label", "namespace", namespace, "pod-security.kubernetes.io/enforce=restricted",
                        "pod-security.kubernetes.io/enforce-version=latest")


@pytest.fixture
def crds(dev_cluster: DevClusterHandle) -> None:
    """The repo's CRDs, as `helm install` would create them from the chart's crds/."""
    dev_cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(REPO / "crds"))
    dev_cluster.kubectl("wait", "--for=condition=Established", "crd/llmdeployments.fleetserve.io", "--timeout=60s")


@pytest.fixture
def release(dev_cluster: DevClusterHandle, namespace: str) -> Iterator[str]:
    """A unique release name; whatever is installed under it is uninstalled afterwards."""
    name = f"fs-{uuid.uuid4().hex[:8]}"
    yield name
    helm(dev_cluster, "uninstall", name, "-n", namespace, "--ignore-not-found", "--wait", "--timeout", "120s",
         check=False)


@pytest.mark.parametrize(
    "values", [None, "smollm2-values.yaml", "namespaced-values.yaml"], ids=["defaults", "smollm2", "namespaced"]
)
def test_rendered_chart_passes_server_side_dry_run(
    dev_cluster: DevClusterHandle, namespace: str, crds: None, values: str | None
) -> None:
    args: list[str | Path] = ["template", "fs-dry", CHART, "--namespace", namespace]
    if values:
        args += ["-f", CHART / "ci" / values]
    if values == "namespaced-values.yaml":
        # Its watched namespaces must exist; the Prometheus operator's CRDs are not in the dev
        # cluster, so its monitoring objects are validated by the unit tests and promtool instead.
        args += ["--set", f"watchNamespaces={{{namespace}}}", "--set", "priorityClassName=",
                 "--set", "monitoring.serviceMonitor.enabled=false", "--set", "monitoring.podMonitor.enabled=false",
                 "--set", "monitoring.prometheusRule.enabled=false"]
    rendered = helm(dev_cluster, *args).stdout
    docs = [d for d in yaml.safe_load_all(rendered) if d]
    assert docs
    # A Pod (the test and uninstall hooks) is only admitted when its ServiceAccount exists for
    # real, so the ServiceAccounts are created first; everything is then validated by dry-run.
    accounts = [d for d in docs if d["kind"] == "ServiceAccount"]
    dev_cluster.kubectl("apply", "-n", namespace, "-f", "-", input=yaml.safe_dump_all(accounts))
    proc = dev_cluster.kubectl("apply", "--dry-run=server", "-n", namespace, "-f", "-", input=rendered, check=False)
    assert proc.returncode == 0, proc.stderr
    # One line per object, each validated (and defaulted) by the API server.
    assert proc.stdout.count("(server dry run)") == len(docs), proc.stdout


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("replicaCount=two", "at '/replicaCount': got string, want integer"),
        ("replicasCount=1", "additional properties 'replicasCount' not allowed"),
    ],
)
def test_helm_install_rejects_bad_values_with_the_schema_message(
    dev_cluster: DevClusterHandle, namespace: str, release: str, value: str, message: str
) -> None:
    # --skip-crds: the values check alone (the CRD is cluster-wide and shared with other tests).
    proc = helm(dev_cluster, "install", release, CHART, "-n", namespace, "--skip-crds", "--set", value, check=False)
    assert proc.returncode != 0
    assert "values don't meet the specifications of the schema" in proc.stderr and message in proc.stderr
    assert not get_json(dev_cluster, "deployments", "-n", namespace)["items"], "nothing may be installed"


def test_operator_service_account_has_least_privilege(
    dev_cluster: DevClusterHandle, namespace: str, crds: None, release: str
) -> None:
    # The monitoring grants are checked as on a cluster with kube-prometheus-stack: `kubectl auth can-i`
    # answers no for a resource type the API server does not know, whatever the Role says.
    install_prometheus_operator_crds(dev_cluster)
    # replicaCount 0: only the RBAC objects matter here, no operator needs to run.
    helm(dev_cluster, "install", release, CHART, "-n", namespace, "--set", f"watchNamespaces={{{namespace}}}",
         "--set", "replicaCount=0", "--wait", "--timeout", "120s")
    sa = f"system:serviceaccount:{namespace}:{release}-fleetserve-operator"
    allowed = [
        ("watch", "llmdeployments.fleetserve.io"), ("patch", "llmdeployments.fleetserve.io"),
        ("patch", "llmdeployments.fleetserve.io/status"),
        ("patch", "deployments.apps"), ("watch", "deployments.apps"),
        ("patch", "services"), ("patch", "configmaps"), ("patch", "poddisruptionbudgets.policy"),
        # Server-side apply of a new child is authorized as create.
        ("create", "deployments.apps"), ("create", "services"), ("create", "configmaps"),
        ("create", "poddisruptionbudgets.policy"),
        # With the defaults: the operator creates these whenever the Prometheus Operator's CRDs exist.
        ("create", "servicemonitors.monitoring.coreos.com"), ("patch", "prometheusrules.monitoring.coreos.com"),
        ("list", "pods"), ("watch", "pods"), ("create", "events"),
        # spec.router: its ServiceAccount and Role are children too, and switching the router off deletes
        # the router's Deployment, Service and RBAC objects (test_operator_router_children.py).
        ("delete", "deployments.apps"), ("delete", "services"), ("create", "roles.rbac.authorization.k8s.io"),
        ("delete", "roles.rbac.authorization.k8s.io"), ("create", "serviceaccounts"),
    ]
    for verb, resource in allowed:
        assert can_i(dev_cluster, sa, verb, resource, namespace), f"the operator must be able to {verb} {resource}"
    denied = [
        ("get", "secrets", namespace), ("list", "secrets", namespace),
        # Never used (the API server's audit log: test_helm_rbac_audit.py): other children are removed by
        # the garbage collector, kopf posts core events.
        ("delete", "configmaps", namespace), ("create", "events.events.k8s.io", namespace),
        ("delete", "pods", namespace), ("create", "pods/exec", namespace),
        ("delete", "llmdeployments.fleetserve.io", namespace), ("update", "llmdeployments.fleetserve.io/scale", namespace),
        ("escalate", "roles.rbac.authorization.k8s.io", namespace),
        ("bind", "roles.rbac.authorization.k8s.io", namespace),
        # Namespaced mode: nothing in other namespaces.
        ("list", "llmdeployments.fleetserve.io", "default"), ("patch", "deployments.apps", "default"),
        ("list", "pods", "kube-system"),
        # Cluster-scoped: no CRD writes, no node access, no namespace changes.
        ("create", "customresourcedefinitions.apiextensions.k8s.io", None), ("patch", "nodes", None),
        ("delete", "namespaces", None),
    ]
    for verb, resource, ns in denied:
        assert not can_i(dev_cluster, sa, verb, resource, ns), f"the operator must not {verb} {resource} in {ns}"
    assert can_i(dev_cluster, sa, "watch", "customresourcedefinitions.apiextensions.k8s.io", None)


def _llmd(cluster: DevClusterHandle, namespace: str, name: str) -> dict | None:
    proc = cluster.kubectl("get", "llmd", name, "-n", namespace, "-o", "json", check=False)
    return json.loads(proc.stdout) if proc.returncode == 0 else None


def _condition(obj: dict | None, kind: str) -> dict | None:
    for cond in ((obj or {}).get("status") or {}).get("conditions") or []:
        if cond["type"] == kind:
            return cond
    return None


def test_helm_install_brings_up_a_model_then_test_and_uninstall(
    dev_cluster: DevClusterHandle, namespace: str, crds: None, release: str
) -> None:
    values = {
        "watchNamespaces": [namespace],
        "image": {"repository": "fleetserve/operator", "tag": "dev"},
        "llmDeployments": [{
            "name": "smollm2",
            "model": {"source": "builtin:smollm2-135m-instruct"},
            "resources": {"gpus": 0, "cpu": "2", "memory": "2Gi"},
            "engine": {"maxModelLen": 1024, "maxNumSeqs": 8, "maxBatchTokens": 512},
            "replicas": 1,
        }],
    }
    values_file = Path(dev_cluster.state_dir) / f"{release}-values.yaml"
    values_file.write_text(yaml.safe_dump(values))
    try:
        installed = helm(dev_cluster, "install", release, CHART, "-n", namespace, "-f", values_file,
                         "--wait", "--timeout", "300s", timeout=330)
    finally:
        values_file.unlink(missing_ok=True)
    assert "kubectl get llmd" in installed.stdout, "NOTES.txt must say what to run next"

    operator = f"{release}-fleetserve-operator"
    deployment = get_json(dev_cluster, "deployment", operator, "-n", namespace)
    # Two replicas (the chart's default), both Ready: the leader and an idle standby.
    assert deployment["status"].get("readyReplicas") == 2
    pods = get_json(dev_cluster, "pods", "-n", namespace, "-l", f"app.kubernetes.io/instance={release},"
                    "app.kubernetes.io/component=operator")["items"]
    assert all(p["spec"]["serviceAccountName"] == operator for p in pods)
    # One of them holds the release's Lease (leader election under the chart's RBAC).
    holder = wait_until(lambda: dev_cluster.kubectl("get", "lease", operator, "-n", namespace, "-o",
                                                    "jsonpath={.spec.holderIdentity}", check=False).stdout.strip(),
                        60, "a holder of the operator's Lease")
    assert holder.split("_")[0] in {p["metadata"]["name"] for p in pods}

    # The operator (as its ServiceAccount) reconciles the chart's LLMDeployment into Ready server pods.
    ready = wait_until(
        lambda: (lambda c: c if c and c["status"] == "True" else None)(
            _condition(_llmd(dev_cluster, namespace, "smollm2"), "Ready")),
        600, "LLMDeployment smollm2 Ready=True")
    assert ready["status"] == "True"
    llmd = _llmd(dev_cluster, namespace, "smollm2")
    assert llmd and llmd["status"]["readyReplicas"] == 1
    assert _condition(llmd, "MemoryFits")["status"] == "True"
    servers = get_json(dev_cluster, "pods", "-n", namespace, "-l",
                       "app.kubernetes.io/name=fleetserve-server,app.kubernetes.io/instance=smollm2")["items"]
    assert servers and all(
        any(c["type"] == "Ready" and c["status"] == "True" for c in p["status"].get("conditions", []))
        for p in servers if not p["metadata"].get("deletionTimestamp"))

    tested = helm(dev_cluster, "test", release, "-n", namespace, "--timeout", "180s", timeout=200)
    assert "Phase:          Succeeded" in tested.stdout, tested.stdout

    helm(dev_cluster, "uninstall", release, "-n", namespace, "--wait", "--timeout", "180s", timeout=200)
    # Everything the release created is gone (children of the LLMDeployment by garbage collection) ...
    wait_until(lambda: not get_json(dev_cluster, "llmdeployments", "-n", namespace)["items"], 60,
               "the LLMDeployment deleted")
    wait_until(lambda: not get_json(dev_cluster, "deployments", "-n", namespace)["items"], 120,
               "the operator and server Deployments deleted")
    for kind in ("serviceaccount", "service", "configmap", "role", "rolebinding"):
        leftover = [o["metadata"]["name"] for o in get_json(dev_cluster, kind, "-n", namespace)["items"]
                    if release in o["metadata"]["name"] or o["metadata"]["name"] == "smollm2"]
        assert not leftover, f"{kind} left behind: {leftover}"
    cluster_roles = [o["metadata"]["name"] for o in get_json(dev_cluster, "clusterroles")["items"]]
    assert not [n for n in cluster_roles if n.startswith(release)]
    # The operators' leader-election Lease too: the release makes it (a Lease the operator created
    # itself stayed behind after uninstall).
    assert not [o["metadata"]["name"] for o in get_json(dev_cluster, "leases", "-n", namespace)["items"]]
    # ... but the CRD stays: Helm never deletes CRDs it installed from crds/.
    assert dev_cluster.kubectl("get", "crd", "llmdeployments.fleetserve.io", check=False).returncode == 0
