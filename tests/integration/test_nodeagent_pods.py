"""Node agent on a real control plane: replicas on their own IPs, env, volumes, service-account tokens."""

from __future__ import annotations

import json
import ssl
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from fleetserve_devcluster.testing import DevClusterHandle
from nodeagent_util import (
    PORT,
    READY_PROBE,
    apply,
    container_env,
    echo_container,
    echo_deployment,
    echo_pod,
    http,
    in_container,
    pod,
    ready_pods,
    wait_until,
)


def test_two_replicas_ready_on_distinct_ips(dev_cluster: DevClusterHandle, namespace: str) -> None:
    apply(dev_cluster, namespace, echo_deployment("web", 2))
    pods = wait_until(lambda: (lambda r: r if len(r) == 2 else None)(ready_pods(dev_cluster, namespace, "app=web")),
                      120, "2/2 web pods Ready")
    ips = {p["status"]["podIP"] for p in pods}
    assert len(ips) == 2
    for p in pods:
        status, body = http("GET", f"http://{p['status']['podIP']}:{PORT}/")
        assert status == 200 and json.loads(body)["pod"] == p["metadata"]["name"]
        cs = p["status"]["containerStatuses"][0]
        assert cs["ready"] and "running" in cs["state"] and cs["restartCount"] == 0
        assert p["status"]["hostIP"].startswith("198.18.")
        # `kubectl logs` goes through the API server to the agent's kubelet log endpoint.
        logs = dev_cluster.kubectl("logs", p["metadata"]["name"], "-n", namespace).stdout
        assert f"echo listening on {p['status']['podIP']}:{PORT}" in logs
    out = dev_cluster.kubectl("get", "deployment", "web", "-n", namespace).stdout
    assert "2/2" in out


def test_env_volumes_and_mount_namespace(dev_cluster: DevClusterHandle, namespace: str) -> None:
    # (Mount points are created on the host as empty directories; their contents never are.)
    assert not Path("/etc/fleetserve-nodeagent-test/server.yaml").exists()
    dev_cluster.kubectl("create", "configmap", "cfg", "-n", namespace, "--from-literal=server.yaml=port: 8000\n",
                        "--from-literal=MODE=fast")
    dev_cluster.kubectl("create", "secret", "generic", "sec", "-n", namespace, "--from-literal=apikey=s3cret")
    container = echo_container(
        readinessProbe=READY_PROBE,
        env=[{"name": "MY_POD", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
             {"name": "MY_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
             {"name": "API_KEY", "valueFrom": {"secretKeyRef": {"name": "sec", "key": "apikey"}}},
             {"name": "DERIVED", "value": "mode-$(MODE)"}],
        envFrom=[{"configMapRef": {"name": "cfg"}}],
        volumeMounts=[{"name": "cfg", "mountPath": "/etc/fleetserve-nodeagent-test"},
                      {"name": "scratch", "mountPath": "/scratch-nodeagent-test"}])
    apply(dev_cluster, namespace, echo_pod("env", container=container, volumes=[
        {"name": "cfg", "configMap": {"name": "cfg"}}, {"name": "scratch", "emptyDir": {}}]))
    p = wait_until(lambda: ready_pods(dev_cluster, namespace, ""), 120, "pod env Ready")[0]
    env = container_env(p)
    assert {k: env.get(k) for k in ("MY_POD", "MY_IP", "API_KEY", "DERIVED", "MODE")} == {
        "MY_POD": "env", "MY_IP": p["status"]["podIP"], "API_KEY": "s3cret", "DERIVED": "mode-fast", "MODE": "fast"}
    config = in_container(p, "/etc/fleetserve-nodeagent-test/server.yaml")
    assert config.read_text() == "port: 8000\n"
    # ConfigMap volumes are read-only; emptyDir is writable; neither is visible outside the pod.
    with pytest.raises(OSError, match="Read-only file system"):
        in_container(p, "/etc/fleetserve-nodeagent-test/x").write_text("x")
    in_container(p, "/scratch-nodeagent-test/x").write_text("hi")
    assert not Path("/etc/fleetserve-nodeagent-test/server.yaml").exists()
    assert not Path("/scratch-nodeagent-test/x").exists()
    # An update of the ConfigMap reaches the running pod's file.
    dev_cluster.kubectl("patch", "configmap", "cfg", "-n", namespace, "-p", '{"data":{"server.yaml":"port: 9000\\n"}}')
    wait_until(lambda: config.read_text() == "port: 9000\n", 30, "the ConfigMap update in the pod's volume")
    # Once the pod is gone, the agent removes the (empty) mount points it created on the host; one
    # that something wrote into on the host would stay (and fail this wait).
    dev_cluster.kubectl("delete", "pod", "env", "-n", namespace, "--wait=true", timeout=120)
    mount_points = ("/etc/fleetserve-nodeagent-test", "/scratch-nodeagent-test")
    wait_until(lambda: not any(Path(m).exists() for m in mount_points), 60,
               "the agent to remove the pod's mount points from the host")


def test_service_account_token_carries_the_pods_rbac(dev_cluster: DevClusterHandle, namespace: str) -> None:
    apply(dev_cluster, namespace, echo_pod("sa", container=echo_container(readinessProbe=READY_PROBE)))
    p = wait_until(lambda: ready_pods(dev_cluster, namespace, ""), 120, "pod sa Ready")[0]
    sa_dir = "/var/run/secrets/kubernetes.io/serviceaccount"
    token = in_container(p, f"{sa_dir}/token").read_text()
    ca = in_container(p, f"{sa_dir}/ca.crt").read_text()
    assert in_container(p, f"{sa_dir}/namespace").read_text() == namespace
    env = container_env(p)
    host, port = env["KUBERNETES_SERVICE_HOST"], env["KUBERNETES_SERVICE_PORT"]
    ctx = ssl.create_default_context(cadata=ca)

    def list_pods() -> int:
        req = urllib.request.Request(f"https://{host}:{port}/api/v1/namespaces/{namespace}/pods",
                                     headers={"Authorization": f"Bearer {token}"})
        try:
            with urllib.request.urlopen(req, context=ctx, timeout=10) as resp:
                return resp.status
        except urllib.error.HTTPError as exc:
            return exc.code

    assert list_pods() == 403  # authenticated as system:serviceaccount:<ns>:default, which may not list pods
    dev_cluster.kubectl("create", "rolebinding", "view", "-n", namespace, "--clusterrole=view",
                        f"--serviceaccount={namespace}:default")
    wait_until(lambda: list_pods() == 200, 30, "the RoleBinding to apply to the pod's token")


def test_other_images_fail_with_a_clear_reason(dev_cluster: DevClusterHandle, namespace: str) -> None:
    apply(dev_cluster, namespace, {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "nginx"},
                                   "spec": {"containers": [{"name": "web", "image": "nginx:1.27"}]}})
    p = wait_until(lambda: (lambda x: x if x and x.get("status", {}).get("phase") == "Failed" else None)(
        pod(dev_cluster, namespace, "nginx")), 60, "pod nginx Failed")
    assert p["status"]["reason"] == "ImageNotRunnableLocally"
    assert "fleetserve" in p["status"]["message"]
