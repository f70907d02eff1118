"""Service proxy on a real control plane: ready endpoints only, round-robin, following scale; and `down`."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

from fleetserve_devcluster.controlplane import ClusterConfig
from fleetserve_devcluster.testing import DevClusterHandle, cluster_env
from nodeagent_util import PORT, apply, echo_deployment, get_json, http, ready_pods, records, wait_until

ANNOTATION = "fleetserve.io/proxy-address"


def _proxy_address(cluster: DevClusterHandle, namespace: str, service: str) -> str:
    def annotated() -> str | None:
        svc = get_json(cluster, "service", service, "-n", namespace)
        return (svc["metadata"].get("annotations") or {}).get(ANNOTATION)

    return wait_until(annotated, 30, f"the {ANNOTATION} annotation on service {service}")


def _answering_pods(address: str, requests: int = 12) -> Counter[str]:
    seen: Counter[str] = Counter()
    for _ in range(requests):
        status, body = http("GET", f"http://{address}/")
        if status == 200:
            seen[json.loads(body)["pod"]] += 1
    return seen


def _ready_names(cluster: DevClusterHandle, namespace: str) -> set[str]:
    return {p["metadata"]["name"] for p in ready_pods(cluster, namespace, "app=web")}


def _wait_ready_count(cluster: DevClusterHandle, namespace: str, n: int) -> set[str]:
    return wait_until(lambda: (lambda s: s if len(s) == n else None)(_ready_names(cluster, namespace)), 90,
                      f"{n} web pods Ready")


def _slice_ready(cluster: DevClusterHandle, namespace: str) -> set[str]:
    slices = get_json(cluster, "endpointslices", "-n", namespace, "-l", "kubernetes.io/service-name=web")["items"]
    return {ep["targetRef"]["name"] for s in slices for ep in s.get("endpoints") or []
            if (ep.get("conditions") or {}).get("ready") is not False and ep.get("targetRef")}


def _follows(cluster: DevClusterHandle, namespace: str, address: str, what: str) -> set[str]:
    """Once the EndpointSlice shows the new ready set, the proxy must match it within a second."""
    want = wait_until(lambda: (lambda s: s if s == _ready_names(cluster, namespace) else None)(
        _slice_ready(cluster, namespace)), 30, f"the EndpointSlice to show {what}")
    time.sleep(1.0)
    assert set(_answering_pods(address)) == want, what
    return want


def test_proxy_balances_ready_endpoints_and_follows_scale(dev_cluster: DevClusterHandle, namespace: str) -> None:
    apply(dev_cluster, namespace, echo_deployment("web", 2))
    _wait_ready_count(dev_cluster, namespace, 2)
    dev_cluster.kubectl("expose", "deployment", "web", "-n", namespace, "--port", "80", "--target-port", str(PORT),
                        "--name", "web")
    address = _proxy_address(dev_cluster, namespace, "web")
    assert address.startswith("127.0.0.1:")
    both = _follows(dev_cluster, namespace, address, "2 ready pods")
    assert len(both) == 2 and all(n == 6 for n in _answering_pods(address).values())  # round-robin

    # One pod turns unready: it keeps running but gets no traffic.
    unready = sorted(both)[0]
    ip = get_json(dev_cluster, "pod", unready, "-n", namespace)["status"]["podIP"]
    assert http("POST", f"http://{ip}:{PORT}/control/ready?value=false")[0] == 200
    _wait_ready_count(dev_cluster, namespace, 1)
    assert unready not in _follows(dev_cluster, namespace, address, "1 ready pod")
    assert http("POST", f"http://{ip}:{PORT}/control/ready?value=true")[0] == 200
    _wait_ready_count(dev_cluster, namespace, 2)

    dev_cluster.kubectl("scale", "deployment", "web", "-n", namespace, "--replicas=3")
    _wait_ready_count(dev_cluster, namespace, 3)
    assert len(_follows(dev_cluster, namespace, address, "3 ready pods")) == 3
    dev_cluster.kubectl("scale", "deployment", "web", "-n", namespace, "--replicas=1")
    _wait_ready_count(dev_cluster, namespace, 1)
    assert len(_follows(dev_cluster, namespace, address, "1 ready pod after scale-down")) == 1

    status = subprocess.run([sys.executable, "-m", "fleetserve_cli.main", "dev-cluster", "status", "--state-dir",
                             str(dev_cluster.state_dir)], capture_output=True, text=True, timeout=60)
    assert f"{namespace}/web/80" in status.stdout and address in status.stdout, status.stdout


def _free_port_base() -> int:
    """A port base whose ports are all free: other dev clusters may run on this machine."""
    for base in range(30000, 40000, 100):
        free = True
        for port in ClusterConfig(port_base=base).ports.values():
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", port))
                except OSError:
                    free = False
        if free:
            return base
    raise AssertionError("no free block of loopback ports for a second dev cluster")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return not Path(f"/proc/{pid}/stat").read_text().split(") ")[1].startswith("Z")


def test_down_leaves_no_process(tmp_path: Path) -> None:
    """A separate one-node cluster: `down` stops the agent and its pods too."""
    state = tmp_path / "cluster"
    record = tmp_path / "events"

    def fleetserve(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "fleetserve_cli.main", "dev-cluster", *args, "--state-dir",
                               str(state)], capture_output=True, text=True, timeout=300)

    up = fleetserve("up", "--nodes", "1", "--gpus-per-node", "1", "--port-base", str(_free_port_base()))
    assert up.returncode == 0, up.stdout + up.stderr
    try:
        handle = DevClusterHandle(state, state / "kubeconfig", cluster_env(state), True)
        deployment = echo_deployment("web", 1)
        deployment["spec"]["template"]["spec"]["containers"][0]["command"] += ["--record", str(record)]
        apply(handle, "default", deployment)
        _wait_ready_count(handle, "default", 1)
        pids = [int(p.read_text()) for p in (state / "pids").glob("*.pid")]
        pod_pid = int(next(e for e, _ in records(record) if e.startswith("start")).split()[1])
        assert _alive(pod_pid)
    finally:
        down = fleetserve("down")
    assert down.returncode == 0, down.stdout + down.stderr
    left = [pid for pid in [*pids, pod_pid] if _alive(pid)]
    assert not left, f"processes left after down: {left}"
    assert not state.exists()


def _slice(name: str, ip: str, port: int, **conditions: bool) -> dict[str, object]:
    return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "addressType": "IPv4",
            "metadata": {"name": name, "labels": {"kubernetes.io/service-name": "manual"}},
            "ports": [{"name": "http", "port": port, "protocol": "TCP"}],
            "endpoints": [{"addresses": [ip], "conditions": conditions}]}


def test_one_backend_per_connection_like_kube_proxy(dev_cluster: DevClusterHandle, namespace: str) -> None:
    """A ready endpoint that refuses fails the connections sent to it (no retry on another backend);
    serving terminating endpoints get traffic only while no endpoint is ready."""
    apply(dev_cluster, namespace, echo_deployment("web", 1))
    [ready] = [get_json(dev_cluster, "pod", n, "-n", namespace) for n in _wait_ready_count(dev_cluster, namespace, 1)]
    ip = ready["status"]["podIP"]
    apply(dev_cluster, namespace, {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "manual"},
                                   "spec": {"ports": [{"name": "http", "port": 80}]}})
    apply(dev_cluster, namespace, _slice("manual-alive", ip, PORT, ready=True))
    apply(dev_cluster, namespace, _slice("manual-refusing", ip, PORT + 99, ready=True))  # nothing listens there
    address = _proxy_address(dev_cluster, namespace, "manual")

    def outcomes() -> Counter[int]:
        return Counter(http("GET", f"http://{address}/")[0] for _ in range(8))

    # Both slices known to the proxy (it may see the alive one a sync before the refusing one).
    wait_until(lambda: (lambda c: c[200] > 0 and c[0] > 0)(outcomes()), 30,
               "the proxy to use both manual EndpointSlices")
    seen = outcomes()
    assert seen[200] == 4 and seen[0] == 4, seen  # round-robin over both; every other connection fails

    # Only terminating endpoints left: the serving one takes the traffic (kube-proxy's fallback) ...
    dev_cluster.kubectl("delete", "endpointslice", "manual-refusing", "-n", namespace)
    apply(dev_cluster, namespace, _slice("manual-alive", ip, PORT, ready=False, serving=True, terminating=True))
    wait_until(lambda: outcomes() == Counter({200: 8}), 30, "the serving terminating endpoint to get traffic")
    # ... but not once it stops serving.
    apply(dev_cluster, namespace, _slice("manual-alive", ip, PORT, ready=False, serving=False, terminating=True))
    wait_until(lambda: outcomes() == Counter({0: 8}), 30, "no traffic to a terminating endpoint that stopped serving")
