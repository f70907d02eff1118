"""`fleetserve dev-cluster up --real-nodes 1` (issue 21): a real kubelet with its own containerd and a
kube-proxy register a Ready node against the dev cluster's control plane, run a pod with the restricted
securityContext from an OCI image built here (no registry) to completion, let that pod reach the API
server through the `kubernetes` Service as an in-cluster client does, serve a Service's ClusterIP
through kube-proxy's iptables rules, and `down` leaves nothing on the machine (processes, mounts,
interfaces, addresses, iptables chains, host paths, cgroups).

A cluster of its own (temporary state dir, free ports): the real nodes' bridges and iptables chains are
host-wide, and `down` is part of what is tested.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fleetserve_devcluster import realnodes, tools
from fleetserve_devcluster.testing import cluster_env, free_port_base

PROBE_IMAGE = "fleetserve.local/probe:1"
NS = "restricted"
RESTRICTED_POD = {"runAsNonRoot": True, "runAsUser": 1000, "runAsGroup": 1000, "fsGroup": 1000,
                  "seccompProfile": {"type": "RuntimeDefault"}}
RESTRICTED_CONTAINER = {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                        "capabilities": {"drop": ["ALL"]}}


def fleetserve(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fleetserve_cli.main", *args], capture_output=True, text=True,
                          timeout=300)


def kubectl(state: Path, *args: str, stdin: str | None = None, check: bool = True) -> str:
    done = subprocess.run([str(tools.tool_path("kubectl")), *args], input=stdin, capture_output=True, text=True,
                          env=cluster_env(state), timeout=60)
    if check:
        assert done.returncode == 0, f"kubectl {' '.join(args)}: {done.stderr}"
    return done.stdout


def get(state: Path, *args: str) -> Any:
    return json.loads(kubectl(state, "get", *args, "-o", "json"))


def wait_for(what: str, fn: Any, timeout: float = 120.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = fn()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.5)


@pytest.fixture(name="real_cluster")
def real_cluster_fixture() -> Iterator[tuple[Path, set[str]]]:
    if tools.missing_tools() or not realnodes.installed():
        pytest.fail("the real nodes' tools are not provisioned; run `make install`", pytrace=False)
    if os.geteuid() != 0:
        pytest.skip("real nodes need root (bridges, mounts, iptables)")
    # A short path: containerd's sockets live in the state dir (unix socket paths are at most 107 bytes).
    state = Path(tempfile.mkdtemp(prefix="fsrn-"))
    before = realnodes.host_traces(state)
    base = free_port_base(20000, 30000)
    try:
        result = fleetserve("dev-cluster", "up", "--state-dir", str(state), "--port-base", str(base),
                            "--nodes", "0", "--real-nodes", "1")
        assert result.returncode == 0, f"up failed:\n{result.stdout}\n{result.stderr}"
        yield state, before
    finally:
        fleetserve("dev-cluster", "down", "--state-dir", str(state))
        shutil.rmtree(state, ignore_errors=True)


def restricted_pod(name: str, args: list[str], restart: str, labels: dict[str, str] | None = None) -> dict[str, Any]:
    return {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": NS, "labels": labels or {}},
        "spec": {
            "restartPolicy": restart,
            "nodeSelector": {realnodes.NODE_LABEL: "true"},
            "securityContext": RESTRICTED_POD,
            "containers": [{
                "name": name, "image": PROBE_IMAGE, "imagePullPolicy": "Never", "args": args,
                "resources": {"limits": {"nvidia.com/gpu": "1"}},
                "securityContext": RESTRICTED_CONTAINER,
                "volumeMounts": [{"name": "data", "mountPath": "/data"}],
            }],
            "volumes": [{"name": "data", "emptyDir": {}}],
        },
    }


def test_real_node_runs_a_restricted_pod_serves_a_cluster_ip_and_down_leaves_nothing(
        real_cluster: tuple[Path, set[str]]) -> None:
    state, before = real_cluster
    node = get(state, "node", realnodes.node_name(0))
    ready = {c["type"]: c["status"] for c in node["status"]["conditions"]}["Ready"]
    assert ready == "True"
    assert node["status"]["nodeInfo"]["containerRuntimeVersion"].startswith("containerd://")
    assert node["status"]["capacity"]["nvidia.com/gpu"] == "2"  # patched into the node's status
    assert {"type": "InternalIP", "address": realnodes.node_ip(0)} in node["status"]["addresses"]
    assert get(state, "service", "kubernetes")["spec"]["clusterIP"] == "198.19.255.1"

    probe = realnodes.runtime_dir() / "images" / "probe"
    realnodes.import_image(state, 0, realnodes.binary_image(PROBE_IMAGE, probe), PROBE_IMAGE)
    kubectl(state, "create", "namespace", NS)
    kubectl(state, "label", "namespace", NS, "pod-security.kubernetes.io/enforce=restricted")
    # The service-account controller adds `default` asynchronously: a pod created before it is refused
    # ("serviceaccount \"default\" not found"; seen in a clean-clone run on a just-started cluster).
    wait_for("the namespace's default ServiceAccount",
             lambda: kubectl(state, "get", "serviceaccount", "default", "-n", NS, check=False) != "")

    # 1. To completion, as uid 1000 on a read-only root filesystem, writing only to its volume.
    kubectl(state, "apply", "-f", "-", stdin=json.dumps(restricted_pod("check", ["/data"], "Never")))
    phase = wait_for("pod check to finish", lambda: get(state, "pod", "-n", NS, "check")["status"].get("phase")
                     in ("Succeeded", "Failed") and get(state, "pod", "-n", NS, "check")["status"]["phase"])
    logs = kubectl(state, "logs", "-n", NS, "check")
    assert phase == "Succeeded", logs
    assert "probe: uid=1000 gid=1000" in logs and "root filesystem is read-only" in logs and "probe: ok" in logs
    assert get(state, "pod", "-n", NS, "check")["spec"]["nodeName"] == realnodes.node_name(0)

    # 2. The API server from a pod, as the operator in its container reaches it: the `kubernetes`
    # Service (KUBERNETES_SERVICE_HOST/PORT), DNATed by kube-proxy to the API server's address on the
    # host, TLS verified against the service account's CA, its token. (IPv4 forwarding stays off.)
    endpoints = get(state, "endpointslices", "-n", "default", "-l", "kubernetes.io/service-name=kubernetes")
    addresses = [a for s in endpoints["items"] for e in s.get("endpoints", []) for a in e["addresses"]]
    assert addresses == [realnodes.API_ADDRESS], endpoints
    kubectl(state, "apply", "-f", "-", stdin=json.dumps(restricted_pod("api", ["apiserver"], "Never")))
    phase = wait_for("pod api to finish", lambda: get(state, "pod", "-n", NS, "api")["status"].get("phase")
                     in ("Succeeded", "Failed") and get(state, "pod", "-n", NS, "api")["status"]["phase"])
    logs = kubectl(state, "logs", "-n", NS, "api")
    assert phase == "Succeeded", logs
    assert f"probe: apiserver {tools.K8S_VERSION} at https://{realnodes.KUBERNETES_SERVICE_IP}:443/version" in logs, logs

    # 3. A Service's ClusterIP, through kube-proxy's iptables rules, from the host.
    kubectl(state, "apply", "-f", "-", stdin=json.dumps(
        restricted_pod("web", ["serve", ":8080"], "Always", labels={"app": "web"})))
    kubectl(state, "apply", "-f", "-", stdin=json.dumps({
        "apiVersion": "v1", "kind": "Service", "metadata": {"name": "web", "namespace": NS},
        "spec": {"selector": {"app": "web"}, "ports": [{"port": 80, "targetPort": 8080}]}}))
    wait_for("pod web to be ready", lambda: any(
        c["type"] == "Ready" and c["status"] == "True"
        for c in get(state, "pod", "-n", NS, "web")["status"].get("conditions", [])))
    cluster_ip = get(state, "service", "-n", NS, "web")["spec"]["clusterIP"]
    assert cluster_ip.startswith("198.19.255.")

    def answer() -> str:
        try:
            with urllib.request.urlopen(f"http://{cluster_ip}/", timeout=3) as resp:
                return str(resp.read().decode())
        except OSError:
            return ""
    assert wait_for("the ClusterIP to answer", answer, timeout=60).startswith("probe ok web")

    status = fleetserve("dev-cluster", "status", "--state-dir", str(state))
    assert status.returncode == 0, status.stdout + status.stderr
    for name in ("containerd-real-0", "kubelet-real-0", "kube-proxy"):
        assert name in status.stdout
    assert realnodes.host_traces(state) - before, "a running real node leaves traces host_traces() sees"

    # 4. down: nothing of the real nodes is left on the machine.
    result = fleetserve("dev-cluster", "down", "--state-dir", str(state))
    assert result.returncode == 0, result.stderr
    assert not state.exists()
    assert realnodes.host_traces(state) == before
