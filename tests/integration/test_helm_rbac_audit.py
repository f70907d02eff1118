"""RBAC least privilege proven from what the operator really did (issue 14, point 8).

The dev cluster's API server writes an audit log (Metadata level, ServiceAccounts only; see
fleetserve_devcluster.controlplane.AUDIT_POLICY). The chart is installed with its defaults on a
cluster with the Prometheus Operator's CRDs, its operator runs as a pod under the chart's
ServiceAccount, and a scenario drives every kind of write the operator makes: create and update of
every child, deletion of the optional ones (PodDisruptionBudget, ServiceMonitor, PrometheusRule),
repair of a deleted child, the autoscaler sizing a fleet of pods that never get a node and scaling an
idle fleet of two ready `fleetserve serve` pods (a tiny random Llama) down to one (that scale-down
lists the nodes and patches the pods' pod-deletion-cost first), `helm test`. Then every request of that ServiceAccount in
the log is compared with what the chart grants it:

* a grant never used fails the test (least privilege: the chart gives only what the code needs),
  except what the operator holds only to grant it to the router's Role (HELD_TO_GRANT, printed);
* a use that was denied (403) fails the test (the chart gives what the code needs).

The table (granted / used with request counts / unused / denied per resource) is printed either way.
"""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from collections import Counter, defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from fleetserve_devcluster import controlplane
from fleetserve_devcluster.testing import DevClusterHandle
from helm_util import get_json, helm, prometheus_operator_crds, wait_until

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "fleetserve"
NOWHERE = {"nodeSelector": {"fleetserve.io/test-no-such-node": "true"}}
MODEL = {"source": "builtin:smollm2-135m-instruct"}
CPU = {"gpus": 0, "cpu": "1", "memory": "2Gi"}

DELETION_COST = "controller.kubernetes.io/pod-deletion-cost"
SERVERS_READY_S = 600  # two pods import torch and load a model on a shared, often overloaded CPU

Use = tuple[str, str, str]  # (apiGroup, resource[/subresource], verb)

# Held, never called: the API server lets the operator write the router's Role (list/watch on
# EndpointSlices) only when it holds those permissions itself (RBAC escalation prevention).
HELD_TO_GRANT: set[Use] = {("discovery.k8s.io", "endpointslices", "list"), ("discovery.k8s.io", "endpointslices", "watch")}


@pytest.fixture
def release(dev_cluster: DevClusterHandle, namespace: str) -> Iterator[str]:
    name = f"fs-{uuid.uuid4().hex[:8]}"
    yield name
    helm(dev_cluster, "uninstall", name, "-n", namespace, "--ignore-not-found", "--wait", "--timeout", "120s",
         check=False)


def audit_events(cluster: DevClusterHandle, user: str) -> list[dict[str, Any]]:
    path = controlplane.audit_log_path(Path(cluster.state_dir))
    events = []
    for log in sorted(path.parent.glob("audit*.log")):
        for line in log.read_text().splitlines():
            if f'"{user}"' in line:
                event = json.loads(line)
                # A watch is logged when it starts (ResponseStarted) and only completes when it ends.
                if event.get("user", {}).get("username") == user and event.get("stage") in (
                        "ResponseComplete", "ResponseStarted"):
                    events.append(event)
    return events


def uses_of(events: list[dict[str, Any]]) -> tuple[Counter[Use], set[Use]]:
    """(requests per use, denied). A server-side apply that created its object (201) was authorized
    as create."""
    used: Counter[Use] = Counter()
    denied: set[Use] = set()
    for e in events:
        ref = e.get("objectRef") or {}
        if "resource" not in ref:
            continue  # discovery (/apis, /version): needs no grant
        resource = ref["resource"] + (f"/{ref['subresource']}" if ref.get("subresource") else "")
        code = int((e.get("responseStatus") or {}).get("code") or 0)
        verb = "create" if e["verb"] == "patch" and code == 201 else e["verb"]
        use = (ref.get("apiGroup") or "", resource, verb)
        if code == 403:
            denied.add(use)
        else:
            used[use] += 1
        if verb == "create" and e["verb"] == "patch":
            used[(use[0], use[1], "patch")] += 1  # the same request also needed patch
    return used, denied


def grants_of(cluster: DevClusterHandle, namespace: str, release: str, account: str) -> set[Use]:
    """Every rule of every (Cluster)Role the release binds to the operator's ServiceAccount."""
    docs = [d for d in yaml.safe_load_all(helm(cluster, "get", "manifest", release, "-n", namespace).stdout) if d]
    bound = {(b["roleRef"]["kind"], b["roleRef"]["name"]) for b in docs
             if b["kind"] in ("RoleBinding", "ClusterRoleBinding")
             and any(s.get("kind") == "ServiceAccount" and s["name"] == account for s in b.get("subjects") or [])}
    granted: set[Use] = set()
    for role in docs:
        if (role["kind"], role["metadata"]["name"]) in bound:
            for rule in role["rules"]:
                granted |= {(g, r, v) for g in rule["apiGroups"] for r in rule["resources"] for v in rule["verbs"]}
    assert granted, f"no (Cluster)Role of release {release} is bound to {account}"
    return granted


def table(granted: set[Use], used: Counter[Use], denied: set[Use]) -> str:
    """One row per resource: the verbs granted, each verb used with its request count, the unused
    grants and the denied uses."""
    rows: dict[tuple[str, str], dict[str, set[str]]] = defaultdict(lambda: defaultdict(set))
    for kind, uses in (("granted", granted), ("used", set(used)), ("denied", denied)):
        for group, resource, verb in uses:
            rows[(group, resource)][kind].add(verb)
    lines = [f"{'resource':<48} {'granted':<36} {'used (requests)':<48} {'UNUSED':<20} DENIED"]
    for (group, resource), cols in sorted(rows.items()):
        name = f"{resource}.{group}" if group else resource
        unused = cols["granted"] - cols["used"]
        counts = ",".join(f"{v}({used[(group, resource, v)]})" for v in sorted(cols["used"]))
        lines.append(f"{name:<48} {','.join(sorted(cols['granted'])):<36} {counts:<48} "
                     f"{','.join(sorted(unused)):<20} {','.join(sorted(cols['denied']))}")
    return "\n".join(lines)


def tiny_model(cluster: DevClusterHandle) -> Path:
    """The tiny random-weight Llama the e2e tests serve (made in a subprocess: keeps torch out of pytest).
    Not under /tmp: the pods mount their own emptyDir there."""
    path = Path(cluster.state_dir) / "test-models" / "tiny-llama"
    if not (path / "config.json").exists():
        subprocess.run([sys.executable, "-c", "import sys; from fleetserve_server.testing import make_tiny_llama; "
                        "make_tiny_llama(sys.argv[1])", str(path)], check=True, timeout=300)
    return path


def llmd(name: str, **spec: Any) -> dict[str, Any]:
    return {"name": name, "model": MODEL, "resources": CPU, "engine": {"maxModelLen": 1024}, "scheduling": NOWHERE,
            **spec}


def test_operator_service_account_uses_exactly_what_the_chart_grants(
    dev_cluster: DevClusterHandle, namespace: str, release: str
) -> None:
    if not controlplane.audit_log_path(Path(dev_cluster.state_dir)).exists():
        pytest.fail("this dev cluster runs without the API server's audit log (started by an older fleetserve): "
                    "restart it with `fleetserve dev-cluster down && fleetserve dev-cluster up`", pytrace=False)
    crds = prometheus_operator_crds()
    for name in ("servicemonitors", "prometheusrules", "podmonitors"):
        dev_cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f",
                            str(crds / f"monitoring.coreos.com_{name}.yaml"))
    dev_cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(REPO / "crds"))
    dev_cluster.kubectl("wait", "--for=condition=Established", "--timeout=60s", "crd/servicemonitors.monitoring.coreos.com",
                        "crd/prometheusrules.monitoring.coreos.com", "crd/llmdeployments.fleetserve.io")
    dev_cluster.kubectl("label", "namespace", namespace, "pod-security.kubernetes.io/enforce=restricted")
    values = {
        "watchNamespaces": [namespace],
        "image": {"repository": "fleetserve/operator", "tag": "dev"},
        "llmDeployments": [
            llmd("fixed", replicas=2),  # two replicas: a PodDisruptionBudget
            llmd("scaled", replicas=3, autoscaling={"enabled": True, "minReplicas": 1, "maxReplicas": 3,
                                                    "scaleDownStabilizationSeconds": 0, "scrapeIntervalSeconds": 1}),
            llmd("routed", router={"enabled": True, "replicas": 2}),  # the router's children, then their deletion
            # Two real servers (autoscaling pinned at 2 until they are ready, then minReplicas 1): the
            # idle fleet is scaled down, and before that the operator lists the nodes and sets each
            # pod's pod-deletion-cost.
            {"name": "served", "model": {"source": str(tiny_model(dev_cluster)), "servedName": "tiny"},
             "resources": {"gpus": 0, "memory": "2Gi"},
             "engine": {"maxModelLen": 512, "maxNumSeqs": 4, "maxBatchTokens": 512}, "replicas": 2,
             "autoscaling": {"enabled": True, "minReplicas": 2, "maxReplicas": 2, "scrapeIntervalSeconds": 1,
                             "scaleDownStabilizationSeconds": 0,
                             "scaleDownPolicy": {"percent": 100, "periodSeconds": 60}}},
        ],
    }
    values_file = Path(dev_cluster.state_dir) / f"{release}-values.yaml"
    values_file.write_text(yaml.safe_dump(values))
    try:
        helm(dev_cluster, "install", release, CHART, "-n", namespace, "-f", values_file,
             "--wait", "--timeout", "180s", timeout=200)
    finally:
        values_file.unlink(missing_ok=True)

    def exists(kind: str, name: str) -> bool:
        return dev_cluster.kubectl("get", kind, name, "-n", namespace, check=False).returncode == 0

    for kind in ("configmap/fixed-config", "service/fixed", "deployment/fixed", "poddisruptionbudget/fixed",
                 "servicemonitor/fixed", "prometheusrule/fixed"):
        wait_until(lambda k=kind: exists(*k.split("/")), 120, f"the operator to create {kind}")
    # Deletions of the optional children, and a repair.
    dev_cluster.kubectl("patch", "llmd", "fixed", "-n", namespace, "--type=merge", "-p", json.dumps(
        {"spec": {"replicas": 1, "monitoring": {"serviceMonitor": False, "prometheusRule": False}}}))
    for kind in ("poddisruptionbudget/fixed", "servicemonitor/fixed", "prometheusrule/fixed"):
        wait_until(lambda k=kind: not exists(*k.split("/")), 60, f"the operator to delete {kind}")
    dev_cluster.kubectl("delete", "service", "fixed", "-n", namespace)
    wait_until(lambda: exists("service", "fixed"), 90, "the operator to put the deleted Service back")
    router_children = ("deployment/routed-router", "poddisruptionbudget/routed-router", "service/routed-servers",
                       "serviceaccount/routed-router", "role/routed-router", "rolebinding/routed-router")
    for kind in router_children:
        wait_until(lambda k=kind: exists(*k.split("/")), 120, f"the operator to create {kind}")
    dev_cluster.kubectl("patch", "llmd", "routed", "-n", namespace, "--type=merge", "-p",
                        json.dumps({"spec": {"router": {"enabled": False}}}))
    for kind in router_children:
        wait_until(lambda k=kind: not exists(*k.split("/")), 60, f"the operator to delete {kind}")
    # The autoscaler starts the fleet at its minimum.
    wait_until(lambda: (get_json(dev_cluster, "deployment", "scaled", "-n", namespace)["spec"]["replicas"] == 1),
               120, "the autoscaler to scale `scaled` down to 1")
    # A fleet of ready servers, idle, allowed down to 1: scaled down, the scale-down order set on its pods first.
    def served_ready() -> bool:
        pods = get_json(dev_cluster, "pods", "-n", namespace, "-l", "app.kubernetes.io/instance=served")["items"]
        return sum(any(c["type"] == "Ready" and c["status"] == "True" for c in p["status"].get("conditions") or [])
                   for p in pods) == 2

    wait_until(served_ready, SERVERS_READY_S, "2 ready server pods of `served`")
    dev_cluster.kubectl("patch", "llmd", "served", "-n", namespace, "--type=merge", "-p",
                        json.dumps({"spec": {"autoscaling": {"minReplicas": 1}}}))
    wait_until(lambda: (get_json(dev_cluster, "deployment", "served", "-n", namespace)["spec"]["replicas"] == 1),
               120, "the autoscaler to scale the idle `served` fleet down to 1")
    kept = get_json(dev_cluster, "pods", "-n", namespace, "-l", "app.kubernetes.io/instance=served")["items"]
    assert any(DELETION_COST in (p["metadata"].get("annotations") or {}) for p in kept), \
        [p["metadata"].get("annotations") for p in kept]
    tested = helm(dev_cluster, "test", release, "-n", namespace, "--timeout", "180s", timeout=200)
    assert "Phase:          Succeeded" in tested.stdout, tested.stdout

    account = f"{release}-fleetserve-operator"
    user = f"system:serviceaccount:{namespace}:{account}"
    events = audit_events(dev_cluster, user)
    used, denied = uses_of(events)
    # Issue 19: the API server sends the operator only fleetserve's children (server-side label
    # selectors): no list or watch of every Pod, Service, ConfigMap, Deployment or PDB of a namespace.
    unselected = sorted({e["requestURI"] for e in events if e.get("verb") in ("list", "watch")
                         and (e.get("objectRef") or {}).get("resource") in ("pods", "services", "configmaps",
                                                                          "deployments", "poddisruptionbudgets")
                         and "labelSelector=" not in e["requestURI"]})
    assert not unselected, f"lists/watches without a label selector: {unselected}"
    granted = grants_of(dev_cluster, namespace, release, account)
    print(f"\nRBAC of {user} (audit log, Metadata level):\n{table(granted, used, denied)}")
    assert used, "no request of the operator's ServiceAccount in the audit log"
    unused = sorted(granted - set(used) - HELD_TO_GRANT)
    print(f"held only to grant them to the router's Role: {sorted(HELD_TO_GRANT)}")
    assert not HELD_TO_GRANT & set(used), f"the operator called what it only holds for the router: {HELD_TO_GRANT & set(used)}"
    assert not denied, f"requests the chart's RBAC denied: {sorted(denied)}"
    assert not unused, f"granted but never used (least privilege): {unused}"
