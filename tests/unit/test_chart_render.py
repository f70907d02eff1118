"""The Helm chart, rendered with the provisioned helm: lint, objects, security, RBAC, schema.

No cluster: `helm lint --strict` and `helm template` only (the dev-cluster
checks are in tests/integration/test_helm_*.py). A missing helm is a failure
with the `make install` hint, never a skip.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
import yaml
from fleetserve_devcluster.tools import ToolMissingError, tool_path

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "fleetserve"
EXAMPLE_VALUES = sorted((CHART / "ci").glob("*.yaml"))


def _helm() -> Path:
    try:
        return tool_path("helm")
    except ToolMissingError as exc:
        pytest.fail(str(exc))


def _helm_run(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(_helm()), *map(str, args)], cwd=REPO, capture_output=True, text=True, timeout=120
    )


def render(
    *args: str | Path, release: str = "fs", namespace: str = "fleetserve-system", tests: bool = False
) -> list[dict]:
    """`helm template` output as a list of objects (raises with helm's stderr on failure)."""
    skip = [] if tests else ["--skip-tests"]
    result = _helm_run("template", release, CHART, "--namespace", namespace, *skip, *args)
    if result.returncode != 0:
        raise AssertionError(result.stderr)
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def by_kind(objs: list[dict], kind: str) -> list[dict]:
    return [o for o in objs if o["kind"] == kind]


def one(objs: list[dict], kind: str) -> dict:
    found = by_kind(objs, kind)
    assert len(found) == 1, f"expected one {kind}, got {[o['metadata']['name'] for o in found]}"
    return found[0]


def operator_container(objs: list[dict]) -> dict:
    deployment = one(objs, "Deployment")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return container


@pytest.mark.parametrize("values", [None, *EXAMPLE_VALUES], ids=lambda v: v.name if v else "defaults")
def test_helm_lint_strict(values: Path | None) -> None:
    args = ["-f", values] if values else []
    result = _helm_run("lint", "--strict", CHART, *args)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 chart(s) failed" in result.stdout


def test_chart_metadata() -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["apiVersion"] == "v2"
    assert re.match(r"^>=\s*1\.\d+", chart["kubeVersion"])
    assert chart["appVersion"] and chart["appVersion"] != "latest"


def test_defaults_render_the_operator_and_nothing_optional() -> None:
    objs = render()
    kinds = sorted(o["kind"] for o in objs)
    # Cluster-wide by default: one ClusterRole for kopf's cluster reads, one for the namespaced resources;
    # the leader-election Lease is the release's, so that `helm uninstall` removes it.
    assert kinds == sorted([
        "ServiceAccount", "ClusterRole", "ClusterRole", "ClusterRoleBinding", "ClusterRoleBinding",
        "Service", "Deployment", "PodDisruptionBudget", "Role", "RoleBinding", "Lease",
    ])
    assert not by_kind(objs, "LLMDeployment")
    for kind in ("ServiceMonitor", "PodMonitor", "PrometheusRule", "ConfigMap"):
        assert not by_kind(objs, kind), f"{kind} must only be rendered when enabled"
    for obj in objs:
        if obj["kind"] not in ("ClusterRole", "ClusterRoleBinding"):
            assert obj["metadata"]["namespace"] == "fleetserve-system"


def test_operator_command_image_and_ports() -> None:
    objs = render()
    container = operator_container(objs)
    assert operator_container(render("--set", "operator.logLevel=debug"))["command"][-1] == "--debug"
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert container["image"] == f"ghcr.io/fleetserve/fleetserve-operator:{chart['appVersion']}"
    # The dev cluster's node agent runs containers whose command starts with `fleetserve`.
    assert container["command"][:3] == ["fleetserve", "operator", "--all-namespaces"]
    assert "--metrics-port=8080" in container["command"] and "--metrics-host=$(POD_IP)" in container["command"]
    assert container["ports"] == [{"name": "metrics", "containerPort": 8080, "protocol": "TCP"}]
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    service = one(objs, "Service")
    assert service["spec"]["ports"][0]["port"] == 8080
    assert service["spec"]["selector"] == one(objs, "Deployment")["spec"]["selector"]["matchLabels"]

    tagged = operator_container(render("--set", "image.tag=1.2.3", "--set", "image.repository=reg.local/op"))
    assert tagged["image"] == "reg.local/op:1.2.3"


def test_helm_test_pod_checks_operator_health() -> None:
    objs = render(tests=True)
    pod = one(objs, "Pod")
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    (container,) = pod["spec"]["containers"]
    service = one(objs, "Service")["metadata"]["name"]
    assert container["command"][:2] == ["fleetserve", "healthcheck"]
    assert f"--service={service}" in container["command"] and "--path=/healthz" in container["command"]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    # Its ServiceAccount may only list EndpointSlices, in the release namespace.
    role = one(without_lease_rbac(objs), "Role")
    assert role["metadata"]["namespace"] == "fleetserve-system"
    assert _granted(role["rules"]) == {("discovery.k8s.io", "endpointslices", "list")}
    assert pod["spec"]["serviceAccountName"] == one(without_lease_rbac(objs), "RoleBinding")["subjects"][0]["name"]


def test_latest_tag_is_refused() -> None:
    result = _helm_run("template", "fs", CHART, "--set", "image.tag=latest")
    assert result.returncode != 0
    assert "image" in result.stderr and "latest" in result.stderr


def test_operator_pod_security_is_restricted() -> None:
    objs = render()
    pod = one(objs, "Deployment")["spec"]["template"]["spec"]
    container = operator_container(objs)
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    sc = container["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert "add" not in sc["capabilities"]
    assert container["resources"]["requests"] and container["resources"]["limits"]
    # A read-only root needs a writable /tmp.
    assert {"name": "tmp", "mountPath": "/tmp"} in container["volumeMounts"]


def test_scheduling_values_reach_the_pod() -> None:
    objs = render("-f", CHART / "ci" / "namespaced-values.yaml")
    pod = one(objs, "Deployment")["spec"]["template"]["spec"]
    assert pod["priorityClassName"] == "system-cluster-critical"
    assert pod["nodeSelector"] == {"kubernetes.io/os": "linux"}
    assert pod["tolerations"][0]["key"] == "dedicated"
    affinity = {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
        {"matchExpressions": [{"key": "gpu", "operator": "DoesNotExist"}]}]}}}
    objs = render("--set-json", f"affinity={json.dumps(affinity)}")
    assert one(objs, "Deployment")["spec"]["template"]["spec"]["affinity"] == affinity


def test_pdb_never_blocks_a_single_replica_drain() -> None:
    pdb = one(render(), "PodDisruptionBudget")
    assert pdb["spec"]["maxUnavailable"] == 1 and "minAvailable" not in pdb["spec"]
    assert not by_kind(render("--set", "podDisruptionBudget.enabled=false"), "PodDisruptionBudget")


def test_llmdeployments_from_values() -> None:
    objs = render("-f", CHART / "ci" / "smollm2-values.yaml", namespace="ml")
    llmd = one(objs, "LLMDeployment")
    assert llmd["apiVersion"] == "fleetserve.io/v1alpha1"
    assert llmd["metadata"]["name"] == "smollm2" and llmd["metadata"]["namespace"] == "ml"
    assert llmd["spec"]["model"] == {"source": "builtin:smollm2-135m-instruct"}
    assert "name" not in llmd["spec"]


def test_monitoring_objects_when_enabled() -> None:
    objs = render("-f", CHART / "ci" / "namespaced-values.yaml")
    sm = one(objs, "ServiceMonitor")
    endpoint = sm["spec"]["endpoints"][0]
    assert endpoint["port"] == "metrics" and endpoint["honorLabels"] is True
    assert {"targetLabel": "job", "replacement": "fleetserve-operator"} in endpoint["relabelings"]
    assert sm["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    pm = one(objs, "PodMonitor")
    assert pm["spec"]["selector"]["matchLabels"]["app.kubernetes.io/name"] == "fleetserve-server"
    assert pm["spec"]["namespaceSelector"] == {"matchNames": ["ml-serving", "ml-batch"]}
    assert pm["spec"]["podMetricsEndpoints"][0]["port"] == "http"
    rule = one(objs, "PrometheusRule")
    kv = next(r for g in rule["spec"]["groups"] for r in g["rules"] if r["alert"] == "FleetserveKVCacheNearlyFull")
    assert kv["expr"].endswith("> 0.85") and kv["labels"]["severity"] == "critical"
    dashboard = one(objs, "ConfigMap")
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    dashboard_file = CHART / "files" / "dashboards" / "fleetserve.json"
    assert json.loads(dashboard["data"]["fleetserve.json"]) == json.loads(dashboard_file.read_text())


def _rules_of(objs: list[dict], kind: str) -> list[dict]:
    return [rule for obj in by_kind(objs, kind) for rule in obj["rules"]]


def without_lease_rbac(objs: list[dict]) -> list[dict]:
    """The objects, less the leader-election Role and RoleBinding (tested on their own)."""
    return [o for o in objs if not o["metadata"]["name"].endswith("-leader-election")]


def _granted(rules: list[dict]) -> set[tuple[str, str, str]]:
    return {(g, r, v) for rule in rules for g in rule["apiGroups"] for r in rule["resources"] for v in rule["verbs"]}


def test_rbac_is_least_privilege() -> None:
    # The namespaced example uses the chart's PodMonitor, so rbac.monitoringChildren=false there.
    for objs, monitoring_children in ((render(), True),
                                      (render("-f", CHART / "ci" / "namespaced-values.yaml"), False)):
        for kind in ("ClusterRole", "Role"):
            for group, resource, verb in _granted(_rules_of(objs, kind)):
                assert "*" not in (group, resource, verb), f"{kind} grants a wildcard"
                assert resource not in ("secrets", "pods/exec", "clusterroles", "clusterrolebindings"), resource
                # Roles/RoleBindings only for the router's identity (spec.router), and never `escalate` or
                # `bind`: without them the API server refuses any Role that grants more than the operator
                # itself holds (list/watch on EndpointSlices).
                if resource in ("roles", "rolebindings"):
                    assert verb in ("get", "create", "patch", "delete"), f"{resource}: {verb}"
                if resource in ("endpointslices", "customresourcedefinitions", "namespaces", "nodes"):
                    assert verb in ("get", "list", "watch") or (resource, verb) == ("customresourcedefinitions", "patch"), \
                        f"{resource} must be read-only, got {verb}"
        # The one CRD write: the operator's own CRD, by name (operator.applyCRD).
        for rule in _rules_of(objs, "ClusterRole"):
            if "customresourcedefinitions" in rule["resources"] and set(rule["verbs"]) - {"list", "watch"}:
                assert rule["resourceNames"] == ["llmdeployments.fleetserve.io"] and rule["verbs"] == ["get", "patch"]
                if resource == "pods":  # patch: the pod-deletion-cost annotation before a scale-down
                    assert verb in ("get", "list", "watch", "patch"), f"pods: unexpected verb {verb}"
        granted = _granted(_rules_of(objs, "ClusterRole") + _rules_of(objs, "Role"))
        # Exactly the verbs the operator uses (proven from the audit log by test_helm_rbac_audit.py).
        expected = {
            ("fleetserve.io", "llmdeployments"): {"get", "list", "watch", "patch"},
            ("fleetserve.io", "llmdeployments/status"): {"patch"},
            ("apps", "deployments"): {"get", "list", "watch", "create", "patch", "delete"},
            ("", "configmaps"): {"get", "list", "watch", "create", "patch"},
            ("", "services"): {"get", "list", "watch", "create", "patch", "delete"},
            # the router's ServiceAccount, Role and RoleBinding, and what that Role grants it
            ("", "serviceaccounts"): {"get", "create", "patch", "delete"},
            ("rbac.authorization.k8s.io", "roles"): {"get", "create", "patch", "delete"},
            ("rbac.authorization.k8s.io", "rolebindings"): {"get", "create", "patch", "delete"},
            ("discovery.k8s.io", "endpointslices"): {"list", "watch"},
            ("policy", "poddisruptionbudgets"): {"get", "list", "watch", "create", "patch", "delete"},
            ("", "pods"): {"list", "watch", "patch"},
            ("", "nodes"): {"list"},
            ("", "events"): {"create"},
            ("apiextensions.k8s.io", "customresourcedefinitions"): {"list", "watch", "get", "patch"},
            ("", "namespaces"): {"list", "watch"},
            # leader election: the release's one Lease, in the release namespace (no create: the chart makes it)
            ("coordination.k8s.io", "leases"): {"get", "update"},
        }
        # The operator creates them per LLMDeployment whenever their CRDs exist (rbac.monitoringChildren).
        if monitoring_children:
            expected[("monitoring.coreos.com", "servicemonitors")] = {"get", "create", "patch", "delete"}
            expected[("monitoring.coreos.com", "prometheusrules")] = {"get", "create", "patch", "delete"}
        actual: dict[tuple[str, str], set[str]] = {}
        for group, resource, verb in granted:
            actual.setdefault((group, resource), set()).add(verb)
        assert actual == expected


def test_rbac_namespaced_mode_uses_roles_per_namespace() -> None:
    objs = render("-f", CHART / "ci" / "namespaced-values.yaml")
    roles = by_kind(without_lease_rbac(objs), "Role")
    assert sorted(r["metadata"]["namespace"] for r in roles) == ["ml-batch", "ml-serving"]
    cluster = _granted(_rules_of(objs, "ClusterRole"))
    # Cluster-wide the operator may only list/watch CRDs and namespaces, apply its own CRD (by name)
    # and list nodes; everything namespaced is in the Roles.
    assert cluster == {("apiextensions.k8s.io", "customresourcedefinitions", v) for v in ("list", "watch", "get", "patch")} | {
        ("", "nodes", "list"), ("", "namespaces", "list"), ("", "namespaces", "watch")}
    command = operator_container(objs)["command"]
    assert "--namespace=ml-serving" in command and "--namespace=ml-batch" in command
    assert "--all-namespaces" not in command
    bindings = by_kind(objs, "RoleBinding")
    assert all(b["subjects"][0]["namespace"] == "fleetserve-system" for b in bindings)


def test_rbac_grants_the_monitoring_children_with_default_values() -> None:
    """With the defaults (chart monitoring off) the operator still creates a ServiceMonitor and a
    PrometheusRule per LLMDeployment on a cluster with the Prometheus Operator's CRDs: granted."""
    plain = _granted(_rules_of(render(), "ClusterRole"))
    for resource in ("servicemonitors", "prometheusrules"):
        assert {("monitoring.coreos.com", resource, v) for v in ("get", "create", "patch", "delete")} <= plain
    off = _granted(_rules_of(render("--set", "rbac.monitoringChildren=false"), "ClusterRole"))
    assert not any(g == "monitoring.coreos.com" for g, _, _ in off)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--set", "replicaCount=two"], "at '/replicaCount': got string, want integer"),
        (["--set", "replicaCount=-1"], "at '/replicaCount': minimum"),
        (["--set", "operator.leaderElection.leaseDurationSeconds=1"], "/operator/leaderElection/leaseDurationSeconds"),
        (["--set", "replicasCount=2"], "additional properties 'replicasCount' not allowed"),
        (["--set", "image.tga=1.0"], "at '/image': additional properties 'tga' not allowed"),
        (["--set", "alerts.kvCacheNearlyFull.threshold=1.5"], "/alerts/kvCacheNearlyFull/threshold"),
        (["--set", "alerts.queueBacklog.for=ten minutes"], "/alerts/queueBacklog/for"),
        (["--set", "watchNamespaces[0]=Bad_Name"], "/watchNamespaces/0"),
        (["--set", "llmDeployments[0].name=x"], "missing property 'model'"),
    ],
)
def test_schema_rejects_bad_values(args: list[str], message: str) -> None:
    result = _helm_run("template", "fs", CHART, *args)
    assert result.returncode != 0
    assert "values don't meet the specifications of the schema" in result.stderr
    assert message in result.stderr, result.stderr


def test_every_value_is_documented() -> None:
    """Each leaf value in values.yaml has a one-line `# -- ` comment right above it."""
    passthrough = {"podSecurityContext", "securityContext", "resources"}  # Kubernetes objects, documented as a whole
    lines = (CHART / "values.yaml").read_text().splitlines()
    stack: list[tuple[int, str]] = []
    undocumented = []
    for i, line in enumerate(lines):
        m = re.match(r"^(\s*)([A-Za-z][\w.-]*):(.*)$", line)
        if not m or line.lstrip().startswith("-"):
            continue
        indent, key, rest = len(m.group(1)), m.group(2), m.group(3).strip()
        while stack and stack[-1][0] >= indent:
            stack.pop()
        parents = [k for _, k in stack]
        stack.append((indent, key))
        if any(p in passthrough for p in parents):
            continue
        is_leaf = rest != "" or key in passthrough or not _has_child(lines, i, indent)
        if is_leaf and not lines[i - 1].strip().startswith("# -- "):
            undocumented.append(".".join([*parents, key]))
    assert not undocumented, f"values without a `# -- ` comment: {undocumented}"


def _has_child(lines: list[str], i: int, indent: int) -> bool:
    for line in lines[i + 1:]:
        if not line.strip() or line.strip().startswith("#"):
            continue
        return len(line) - len(line.lstrip()) > indent
    return False


def test_schema_knows_every_value() -> None:
    """values.schema.json and values.yaml describe the same keys (no stale or missing entries)."""
    schema = json.loads((CHART / "values.schema.json").read_text())
    values = yaml.safe_load((CHART / "values.yaml").read_text())

    def walk(node: dict, sch: dict, path: str) -> None:
        props = sch.get("properties")
        if props is None:
            return
        for key, value in node.items():
            assert key in props, f"{path}{key} is in values.yaml but not in values.schema.json"
            if isinstance(value, dict):
                walk(value, props[key], f"{path}{key}.")
        if sch.get("additionalProperties") is False:
            for key in props:
                assert key in node or key == "global", f"{path}{key} is in the schema but not in values.yaml"

    walk(values, schema, "")


def test_chart_crds_are_byte_identical_to_repo_crds() -> None:
    repo_crds = {p.name: p.read_bytes() for p in sorted((REPO / "crds").glob("*.yaml"))}
    chart_crds = {p.name: p.read_bytes() for p in sorted((CHART / "crds").glob("*.yaml"))}
    assert repo_crds, "crds/ holds no CRD (generated by `fleetserve crds`)"
    assert chart_crds == repo_crds, "charts/fleetserve/crds/ differs from crds/: run `cp crds/*.yaml charts/fleetserve/crds/`"


def test_uninstall_hook_deletes_the_release_llmdeployments_first() -> None:
    objs = render("-f", CHART / "ci" / "smollm2-values.yaml", namespace="ml")
    llmd = one(objs, "LLMDeployment")
    pod = one(objs, "Pod")
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "pre-delete"
    command = pod["spec"]["containers"][0]["command"]
    assert command[:2] == ["fleetserve", "delete-llmdeployments"] and "--namespace=ml" in command
    selector = next(a for a in command if a.startswith("--selector="))[len("--selector="):]
    # The selector picks exactly the release's LLMDeployments.
    for term in selector.split(","):
        key, value = term.split("=")
        assert llmd["metadata"]["labels"][key] == value
    role = one(without_lease_rbac(objs), "Role")
    assert role["metadata"]["namespace"] == "ml"
    assert _granted(role["rules"]) == {("fleetserve.io", "llmdeployments", v) for v in ("list", "delete")}
    assert not by_kind(render(), "Pod"), "no hook without llmDeployments"


def test_operator_applies_its_own_crd_by_default_and_only_when_asked() -> None:
    """Helm never upgrades crds/: by default the operator applies its CRD at start (--apply-crd) and
    may patch exactly that CRD; with operator.applyCRD=false neither the flag nor the grant."""
    objs = render()
    assert "--apply-crd" in operator_container(objs)["command"]
    named = [r for r in _rules_of(objs, "ClusterRole") if r.get("resourceNames")]
    assert named == [{"apiGroups": ["apiextensions.k8s.io"], "resources": ["customresourcedefinitions"],
                      "resourceNames": ["llmdeployments.fleetserve.io"], "verbs": ["get", "patch"]}]
    off = render("--set", "operator.applyCRD=false")
    assert "--apply-crd" not in operator_container(off)["command"]
    assert not [r for r in _rules_of(off, "ClusterRole") if r.get("resourceNames")]


def test_two_replicas_elect_a_leader_with_a_lease_of_their_own() -> None:
    """Issue 19: two replicas by default, one Lease named after the release in its namespace, a Role
    that grants exactly that Lease, a PDB that keeps one replica through a drain."""
    objs = render()
    deployment = one(objs, "Deployment")
    assert deployment["spec"]["replicas"] == 2
    assert deployment["spec"]["strategy"]["type"] == "RollingUpdate"
    command = operator_container(objs)["command"]
    name = deployment["metadata"]["name"]
    assert f"--leader-election-id={name}" in command and "--lease-duration=15" in command
    assert "--no-leader-election" not in command
    role = next(o for o in by_kind(objs, "Role") if o["metadata"]["name"] == f"{name}-leader-election")
    assert role["metadata"]["namespace"] == "fleetserve-system"
    # get/update of that one Lease only: the release makes it (so `helm uninstall` removes it), the
    # operator never creates one.
    assert _granted(role["rules"]) == {("coordination.k8s.io", "leases", v) for v in ("get", "update")}
    assert all(r["resourceNames"] == [name] for r in role["rules"])
    lease = one(objs, "Lease")
    assert (lease["metadata"]["name"], lease["metadata"]["namespace"]) == (name, "fleetserve-system")
    assert one(objs, "PodDisruptionBudget")["spec"]["maxUnavailable"] == 1

    failed = _helm_run("template", "fs", CHART, "--set", "operator.leaderElection.enabled=false")
    assert failed.returncode != 0 and "replicaCount > 1 needs operator.leaderElection.enabled" in failed.stderr
    single = render("--set", "replicaCount=1", "--set", "operator.leaderElection.enabled=false")
    assert "--no-leader-election" in operator_container(single)["command"]
    assert one(single, "Deployment")["spec"]["strategy"]["type"] == "Recreate"
    assert not [o for o in by_kind(single, "Role") if o["metadata"]["name"].endswith("-leader-election")]
    assert not by_kind(single, "Lease")
