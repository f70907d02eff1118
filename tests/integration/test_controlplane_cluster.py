"""The dev cluster's control plane is a real, working Kubernetes: version, health,
namespaces, garbage collection, Deployments, service accounts and the scheduler.

Nodes registered here are plain `Node` objects named `test-*` (no kubelet):
pods bound to them stay Pending, which is all the scheduler test needs.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import pytest
from fleetserve_devcluster import tools
from fleetserve_devcluster.testing import DevClusterHandle

T = TypeVar("T")


def wait_for(probe: Callable[[], T | None], what: str, timeout: float = 90.0) -> T:
    """Poll ``probe`` until it returns something truthy; fail naming ``what`` at the deadline."""
    deadline = time.monotonic() + timeout
    last: T | None = None
    while time.monotonic() < deadline:
        last = probe()
        if last:
            return last
        time.sleep(0.5)
    pytest.fail(f"timed out after {timeout:.0f}s waiting for {what} (last: {last!r})")


def get_json(cluster: DevClusterHandle, *args: str) -> Any:
    return json.loads(cluster.kubectl("get", *args, "-o", "json").stdout)


def test_kubectl_version_reports_the_built_server_version(dev_cluster: DevClusterHandle) -> None:
    info = json.loads(dev_cluster.kubectl("version", "-o", "json").stdout)
    assert info["serverVersion"]["gitVersion"] == tools.K8S_VERSION
    assert info["clientVersion"]["gitVersion"] == tools.K8S_VERSION
    minor = tools.K8S_VERSION.split(".")[1]
    assert (info["serverVersion"]["major"], info["serverVersion"]["minor"]) == ("1", minor)


def test_readyz_is_ok_over_verified_tls(dev_cluster: DevClusterHandle) -> None:
    assert dev_cluster.kubectl("get", "--raw", "/readyz").stdout.strip() == "ok"
    config = json.loads(dev_cluster.kubectl("config", "view", "--raw", "-o", "json").stdout)
    url = config["clusters"][0]["cluster"]["server"]
    assert url.startswith("https://127.0.0.1:")
    assert config["clusters"][0]["cluster"].get("certificate-authority-data")
    assert not config["clusters"][0]["cluster"].get("insecure-skip-tls-verify")


def test_admin_is_cluster_admin_and_rbac_denies_others(dev_cluster: DevClusterHandle) -> None:
    assert dev_cluster.kubectl("auth", "can-i", "*", "*").stdout.strip() == "yes"
    denied = dev_cluster.kubectl("auth", "can-i", "list", "secrets", "--as", "system:serviceaccount:default:default",
                                 check=False)
    assert denied.stdout.strip() == "no"


def test_namespace_is_deleted_and_finishes_terminating(dev_cluster: DevClusterHandle) -> None:
    name = f"test-ns-{uuid.uuid4().hex[:8]}"
    dev_cluster.kubectl("create", "namespace", name)
    dev_cluster.kubectl("-n", name, "create", "configmap", "content", "--from-literal=a=b")
    dev_cluster.kubectl("delete", "namespace", name, "--wait=true", "--timeout=120s", timeout=150)
    gone = dev_cluster.kubectl("get", "namespace", name, check=False)
    assert gone.returncode != 0 and "NotFound" in gone.stderr


def test_deleting_the_owner_garbage_collects_its_children(dev_cluster: DevClusterHandle, namespace: str) -> None:
    from kubernetes import client

    with dev_cluster.api_client() as api:
        core = client.CoreV1Api(api)
        owner = core.create_namespaced_config_map(namespace, client.V1ConfigMap(
            metadata=client.V1ObjectMeta(name="owner")))
        ref = client.V1OwnerReference(api_version="v1", kind="ConfigMap", name="owner", uid=owner.metadata.uid)
        for i in range(2):
            core.create_namespaced_config_map(namespace, client.V1ConfigMap(
                metadata=client.V1ObjectMeta(name=f"child-{i}", owner_references=[ref])))
        core.create_namespaced_config_map(namespace, client.V1ConfigMap(metadata=client.V1ObjectMeta(name="bystander")))
        core.delete_namespaced_config_map("owner", namespace, propagation_policy="Background")

        def children_left() -> bool:
            names = {cm.metadata.name for cm in core.list_namespaced_config_map(namespace).items}
            return not ({"child-0", "child-1"} & names)

        wait_for(children_left, "the garbage collector to delete the owned ConfigMaps")
        names = {cm.metadata.name for cm in core.list_namespaced_config_map(namespace).items}
        assert "bystander" in names


DEPLOYMENT = """
apiVersion: apps/v1
kind: Deployment
metadata: {{name: web}}
spec:
  replicas: 2
  selector: {{matchLabels: {{app: web}}}}
  template:
    metadata: {{labels: {{app: web}}}}
    spec:
      # No node matches: the pods stay Pending, wherever a node agent runs.
      nodeSelector: {{fleetserve.io/test-no-such-node: "{token}"}}
      containers:
      - name: web
        image: registry.invalid/web:1
"""


def test_deployment_creates_replicaset_and_pods(dev_cluster: DevClusterHandle, namespace: str) -> None:
    dev_cluster.kubectl("-n", namespace, "apply", "-f", "-", input=DEPLOYMENT.format(token=uuid.uuid4().hex))
    deploy_uid = get_json(dev_cluster, "-n", namespace, "deployment", "web")["metadata"]["uid"]

    def replicaset() -> dict[str, Any] | None:
        for rs in get_json(dev_cluster, "-n", namespace, "replicasets")["items"]:
            if any(r["uid"] == deploy_uid for r in rs["metadata"].get("ownerReferences", [])):
                return rs
        return None

    rs = wait_for(replicaset, "the deployment controller to create a ReplicaSet")

    def pods() -> list[dict[str, Any]] | None:
        items = get_json(dev_cluster, "-n", namespace, "pods", "-l", "app=web")["items"]
        owned = [p for p in items if any(r["uid"] == rs["metadata"]["uid"] for r in p["metadata"].get("ownerReferences", []))]
        return owned if len(owned) == 2 else None

    created = wait_for(pods, "the replicaset controller to create 2 pods")
    # Service-account admission + token controller: each pod mounts a projected API token.
    for pod in created:
        assert pod["spec"]["serviceAccountName"] == "default"
        projected = [v for v in pod["spec"]["volumes"] if v["name"].startswith("kube-api-access-")]
        assert projected, f"pod {pod['metadata']['name']} has no service-account token volume"
    # The root CA publisher put the cluster CA into the namespace.
    wait_for(lambda: dev_cluster.kubectl("-n", namespace, "get", "configmap", "kube-root-ca.crt", check=False)
             .returncode == 0, "kube-root-ca.crt in the namespace")

    dev_cluster.kubectl("-n", namespace, "scale", "deployment", "web", "--replicas=3")
    wait_for(lambda: len(get_json(dev_cluster, "-n", namespace, "pods", "-l", "app=web")["items"]) == 3,
             "the scale-up to 3 pods")


def test_service_gets_a_cluster_ip_and_endpointslice(dev_cluster: DevClusterHandle, namespace: str) -> None:
    dev_cluster.kubectl("-n", namespace, "create", "service", "clusterip", "api", "--tcp=8000:8000")
    svc = get_json(dev_cluster, "-n", namespace, "service", "api")
    assert svc["spec"]["clusterIP"].startswith("10.0.0.")
    wait_for(lambda: get_json(dev_cluster, "-n", namespace, "endpointslices",
                              "-l", "kubernetes.io/service-name=api")["items"],
             "the endpointslice controller to create the Service's EndpointSlice")


def _node(name: str, run: str, gpus: int) -> dict[str, Any]:
    capacity = {"cpu": "8", "memory": "32Gi", "pods": "110"}
    if gpus:
        capacity["nvidia.com/gpu"] = str(gpus)
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    return {
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": name, "labels": {"fleetserve.io/test-run": run, "kubernetes.io/hostname": name}},
        "status": {
            "capacity": capacity, "allocatable": capacity,
            "conditions": [{"type": "Ready", "status": "True", "reason": "TestNode", "message": "registered by a test",
                            "lastHeartbeatTime": now, "lastTransitionTime": now}],
        },
    }


def _gpu_pod(name: str, run: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": name},
        "spec": {
            "nodeSelector": {"fleetserve.io/test-run": run},
            "containers": [{"name": "main", "image": "registry.invalid/gpu:1",
                            "resources": {"limits": {"nvidia.com/gpu": "1"}}}],
        },
    }


@pytest.fixture
def test_nodes(dev_cluster: DevClusterHandle) -> Iterator[tuple[str, str, str]]:
    """Two plain Nodes of one test run: `test-gpu-*` with one GPU, `test-cpu-*` with none."""
    run = uuid.uuid4().hex[:8]
    gpu, cpu = f"test-gpu-{run}", f"test-cpu-{run}"
    dev_cluster.kubectl("create", "-f", "-", input=json.dumps(
        {"apiVersion": "v1", "kind": "List", "items": [_node(gpu, run, 1), _node(cpu, run, 0)]}))
    try:
        yield run, gpu, cpu
    finally:
        dev_cluster.kubectl("delete", "node", gpu, cpu, "--ignore-not-found", check=False)


def test_scheduler_binds_gpu_pod_only_where_a_gpu_is_free(dev_cluster: DevClusterHandle, namespace: str,
                                                          test_nodes: tuple[str, str, str]) -> None:
    run, gpu_node, _cpu_node = test_nodes
    alloc = get_json(dev_cluster, "node", gpu_node)["status"]["allocatable"]
    assert alloc.get("nvidia.com/gpu") == "1", "the Node's status (GPU capacity) was not stored"
    try:
        dev_cluster.kubectl("-n", namespace, "create", "-f", "-", input=json.dumps(_gpu_pod("first", run)))
        first = wait_for(lambda: get_json(dev_cluster, "-n", namespace, "pod", "first")["spec"].get("nodeName"),
                         "the scheduler to bind the first GPU pod")
        assert first == gpu_node

        # The only GPU is taken: the second pod must stay unschedulable, for want of nvidia.com/gpu.
        dev_cluster.kubectl("-n", namespace, "create", "-f", "-", input=json.dumps(_gpu_pod("second", run)))

        def unschedulable() -> str | None:
            pod = get_json(dev_cluster, "-n", namespace, "pod", "second")
            assert not pod["spec"].get("nodeName"), f"second GPU pod was bound to {pod['spec'].get('nodeName')}"
            for cond in pod.get("status", {}).get("conditions", []):
                if cond["type"] == "PodScheduled" and cond.get("reason") == "Unschedulable":
                    return str(cond.get("message", ""))
            return None

        message = wait_for(unschedulable, "the scheduler to mark the second GPU pod Unschedulable")
        assert "nvidia.com/gpu" in message
    finally:
        # No kubelet will confirm a graceful deletion of a bound pod: force it.
        dev_cluster.kubectl("-n", namespace, "delete", "pods", "--all", "--grace-period=0", "--force",
                            "--ignore-not-found", check=False)


VAP = """
apiVersion: admissionregistration.k8s.io/v1
kind: ValidatingAdmissionPolicy
metadata: {{name: {name}}}
spec:
  failurePolicy: Fail
  matchConstraints:
    resourceRules:
    - apiGroups: [""]
      apiVersions: ["v1"]
      operations: ["CREATE", "UPDATE"]
      resources: ["configmaps"]
  validations:
  - expression: "!has(object.data) || !('forbidden' in object.data)"
    message: "the key 'forbidden' is not allowed"
---
apiVersion: admissionregistration.k8s.io/v1
kind: ValidatingAdmissionPolicyBinding
metadata: {{name: {name}}}
spec:
  policyName: {name}
  validationActions: [Deny]
  matchResources:
    namespaceSelector:
      matchLabels: {{kubernetes.io/metadata.name: {namespace}}}
"""


def test_validating_admission_policy_with_cel_is_enforced(dev_cluster: DevClusterHandle, namespace: str) -> None:
    name = f"test-vap-{uuid.uuid4().hex[:8]}"
    dev_cluster.kubectl("apply", "-f", "-", input=VAP.format(name=name, namespace=namespace))
    try:
        def denied() -> str | None:
            proc = dev_cluster.kubectl("-n", namespace, "create", "configmap", "bad", "--from-literal=forbidden=1",
                                       check=False)
            if proc.returncode == 0:  # the policy is not loaded yet: undo and retry
                dev_cluster.kubectl("-n", namespace, "delete", "configmap", "bad")
                return None
            return proc.stderr

        message = wait_for(denied, "the ValidatingAdmissionPolicy to deny a ConfigMap", timeout=60)
        assert "the key 'forbidden' is not allowed" in message
        dev_cluster.kubectl("-n", namespace, "create", "configmap", "good", "--from-literal=allowed=1")
    finally:
        dev_cluster.kubectl("delete", "validatingadmissionpolicybinding,validatingadmissionpolicy", name,
                            "--ignore-not-found", check=False)
