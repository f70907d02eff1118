"""The chart on real nodes (issue 21, point 3): what a user's cluster does with fleetserve's images.

`helm install` with the images `make images` built (hack/images/build.sh, no registry) → the operator
runs in a container on a real node (kubelet + containerd) and reaches the API server through the
`kubernetes` Service → an LLMDeployment of the builtin model, pinned to the real nodes by nodeSelector,
runs its server in a container in a namespace that enforces the restricted Pod Security profile → a
chat completion through the Service's ClusterIP (kube-proxy's iptables rules, from the host) → a
rolling update (`helm upgrade`) under load with zero failed requests → `helm uninstall` leaves only the
CRD.

One cluster of its own for the module (`--nodes 0 --real-nodes 1`: every pod lands on the real node;
the real nodes' bridges and iptables chains are host-wide, so a cluster per test would only add
start-ups), and the steps in order in one test, each building on the last. The images are imported
into the node once per cluster; their build is cached by content (`make images` before `make e2e`).
Phase times go to stdout (`pytest -s`) and, with FLEETSERVE_REAL_NODE_E2E_REPORT=<file>, to a JSON file.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from autoscaler_harness import enforce_restricted
from fleetserve_devcluster import realnodes, tools
from fleetserve_devcluster.testing import DevClusterHandle, cluster_env, free_port_base, wait_until

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "fleetserve"
NS = "fleetserve-e2e"
RELEASE = "fs"
LLMD = "smollm2"
SERVED = "smollm2-135m-instruct"


@dataclass
class RealCluster:
    handle: DevClusterHandle
    images: dict[str, str]  # operator/server -> image name in the node's containerd
    figures: dict[str, Any] = field(default_factory=dict)


def run(*argv: str | Path, env: dict[str, str] | None = None, timeout: float = 300) -> str:
    done = subprocess.run([str(a) for a in argv], capture_output=True, text=True, env=env, timeout=timeout)
    assert done.returncode == 0, f"{' '.join(map(str, argv))} exited {done.returncode}\n{done.stdout}\n{done.stderr}"
    return done.stdout


def build_images() -> dict[str, Path]:
    """`make images`' archives for the current tree (a content-key hit when `make images` ran)."""
    run(REPO / "hack" / "images" / "build.sh", "operator", "server", timeout=3600)
    out = tools.cache_dir() / "images" / "out"
    return {name: (out / f"{name}.tar").resolve() for name in ("operator", "server")}


@pytest.fixture(scope="module")
def real_cluster() -> Iterator[RealCluster]:
    if tools.missing_tools() or not realnodes.installed():
        pytest.fail("the real nodes' tools are not provisioned; run `make install`", pytrace=False)
    if os.geteuid() != 0:
        pytest.skip("real nodes need root (bridges, mounts, iptables)")
    figures: dict[str, Any] = {}
    t0 = time.monotonic()
    archives = build_images()
    figures["images_build_or_cache_s"] = round(time.monotonic() - t0, 1)
    state = Path(tempfile.mkdtemp(prefix="fsrn-"))  # short: containerd's socket paths live in it
    base = free_port_base(20000, 30000)
    fleetserve = [sys.executable, "-m", "fleetserve_cli.main", "dev-cluster"]
    try:
        t0 = time.monotonic()
        run(*fleetserve, "up", "--state-dir", state, "--port-base", str(base), "--nodes", "0", "--real-nodes", "1")
        figures["cluster_up_s"] = round(time.monotonic() - t0, 1)
        images = {}
        for name, archive in archives.items():
            t0 = time.monotonic()
            [ref] = realnodes.import_archive(state, archive)
            figures[f"import_{name}_s"] = round(time.monotonic() - t0, 1)
            figures[f"archive_{name}_mib"] = archive.stat().st_size // 2**20
            images[name] = ref
            assert realnodes.has_image(state, 0, ref), f"{ref} is not in the node's containerd after the import"
        yield RealCluster(DevClusterHandle(state, state / "kubeconfig", cluster_env(state), True), images, figures)
    finally:
        run(*fleetserve, "down", "--state-dir", state)
        shutil.rmtree(state, ignore_errors=True)


def helm(cluster: DevClusterHandle, *args: str | Path, timeout: float = 600) -> str:
    return run(tools.tool_path("helm"), *args, env=cluster.env, timeout=timeout)


def get(cluster: DevClusterHandle, *args: str) -> Any:
    return json.loads(cluster.kubectl("get", *args, "-o", "json").stdout)


def ready(pod: dict[str, Any]) -> bool:
    return not pod["metadata"].get("deletionTimestamp") and any(
        c["type"] == "Ready" and c["status"] == "True" for c in pod["status"].get("conditions", []))


def server_pods(cluster: DevClusterHandle) -> list[dict[str, Any]]:
    return get(cluster, "pods", "-n", NS, "-l",
               f"app.kubernetes.io/name=fleetserve-server,app.kubernetes.io/instance={LLMD}")["items"]


def condition(obj: dict[str, Any], kind: str) -> dict[str, Any]:
    return next((c for c in obj.get("status", {}).get("conditions", []) if c["type"] == kind), {})


def chat(url: str, content: str, max_tokens: int = 16, timeout: float = 120) -> str | None:
    """None when the request got a 200 with a finished choice, else what went wrong."""
    body = {"model": SERVED, "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens}
    try:
        response = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=timeout, trust_env=False)
    except httpx.HTTPError as exc:
        return f"{type(exc).__name__}: {exc}"
    if response.status_code != 200:
        return f"HTTP {response.status_code}: {response.text[:200]}"
    choice = response.json()["choices"][0]
    return None if choice.get("finish_reason") in ("stop", "length") and choice["message"]["content"] else \
        f"incomplete answer: {choice}"


class Load:
    """`workers` clients sending chat completions one after the other until stop(); new connection each."""

    def __init__(self, url: str, workers: int) -> None:
        self.url, self.ok = url, 0
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._worker, args=(i,), daemon=True) for i in range(workers)]

    def _worker(self, i: int) -> None:
        n = 0
        while not self._stop.is_set():
            error = chat(self.url, f"Client {i}, request {n}: name a colour.")
            n += 1
            if error is None:
                self.ok += 1
            else:
                self.failures.append(error)

    def start(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def stop(self) -> Load:
        self._stop.set()
        for t in self._threads:
            t.join(180)
        return self


def values(cluster: RealCluster, max_num_seqs: int) -> dict[str, Any]:
    repo, tag = cluster.images["operator"].rsplit(":", 1)
    pinned = {realnodes.NODE_LABEL: "true"}
    return {
        "watchNamespaces": [NS],
        "image": {"repository": repo, "tag": tag, "pullPolicy": "Never"},  # no registry: imported only
        "nodeSelector": pinned,
        "llmDeployments": [{
            "name": LLMD,
            "image": cluster.images["server"],
            "model": {"source": "builtin:smollm2-135m-instruct"},
            # A 2-core node holds 2 servers + 1 surge pod + 2 operators only with requests below the limit.
            "resources": {"gpus": 0, "cpu": "1", "memory": "3Gi", "requests": {"cpu": "250m"}},
            "engine": {"maxModelLen": 1024, "maxNumSeqs": max_num_seqs, "maxBatchTokens": 512},
            "replicas": 2,
            "scheduling": {"nodeSelector": pinned},
        }],
    }


def write_values(cluster: RealCluster, max_num_seqs: int) -> Path:
    path = cluster.handle.state_dir / f"values-{max_num_seqs}.yaml"
    path.write_text(yaml.safe_dump(values(cluster, max_num_seqs)))
    return path


def seconds(stamp: str) -> float:
    return time.mktime(time.strptime(stamp, "%Y-%m-%dT%H:%M:%SZ"))


def ready_after_created_s(pod: dict[str, Any]) -> float:
    return seconds(condition(pod, "Ready")["lastTransitionTime"]) - seconds(pod["metadata"]["creationTimestamp"])


def test_helm_chart_on_real_nodes_serves_rolls_under_load_and_uninstalls(real_cluster: RealCluster) -> None:
    c, figures = real_cluster.handle, real_cluster.figures
    started = time.monotonic()
    c.kubectl("create", "namespace", NS)
    enforce_restricted(c, NS)
    wait_until(lambda: c.kubectl("get", "serviceaccount", "default", "-n", NS, check=False).returncode == 0,
               120, "the namespace's default ServiceAccount")

    # 1. helm install: the operator in containers on the real node, reaching the API server.
    t0 = time.monotonic()
    helm(c, "install", RELEASE, CHART, "-n", NS, "-f", write_values(real_cluster, 8), "--wait", "--timeout", "300s")
    figures["helm_install_operator_ready_s"] = round(time.monotonic() - t0, 1)
    operators = get(c, "pods", "-n", NS, "-l", f"app.kubernetes.io/instance={RELEASE},"
                    "app.kubernetes.io/component=operator")["items"]
    assert len(operators) == 2 and all(ready(p) for p in operators)
    for pod in operators:
        assert pod["spec"]["nodeName"] == realnodes.node_name(0)
        assert pod["status"]["containerStatuses"][0]["containerID"].startswith("containerd://")
        assert pod["status"]["containerStatuses"][0]["imageID"], pod["status"]["containerStatuses"]
    holder = wait_until(lambda: c.kubectl("get", "lease", f"{RELEASE}-fleetserve-operator", "-n", NS, "-o",
                                          "jsonpath={.spec.holderIdentity}", check=False).stdout.strip(),
                        60, "a holder of the operator's Lease")
    assert holder.split("_")[0] in {p["metadata"]["name"] for p in operators}

    # 2. The LLMDeployment's servers, in containers on the real node, restricted profile enforced.
    t0 = time.monotonic()
    wait_until(lambda: condition(get(c, "llmd", LLMD, "-n", NS), "Ready").get("status") == "True", 900,
               "LLMDeployment smollm2 Ready=True")
    figures["llmd_ready_s"] = round(time.monotonic() - t0, 1)
    servers = [p for p in server_pods(c) if ready(p)]
    assert len(servers) == 2
    figures["server_pod_ready_after_created_s"] = [ready_after_created_s(p) for p in servers]
    for pod in servers:
        assert pod["spec"]["nodeName"] == realnodes.node_name(0)
        assert pod["spec"]["containers"][0]["image"] == real_cluster.images["server"]
        assert pod["status"]["containerStatuses"][0]["containerID"].startswith("containerd://")

    # 3. A chat completion through the Service's ClusterIP (kube-proxy), from the host.
    cluster_ip = get(c, "service", LLMD, "-n", NS)["spec"]["clusterIP"]
    assert cluster_ip.startswith("198.19.255.")
    url = f"http://{cluster_ip}:8000"
    assert chat(url, "Say hello.") is None

    # 4. helm upgrade (engine.maxNumSeqs) rolls both server pods under load: zero failed requests.
    old = {p["metadata"]["name"] for p in servers}
    load = Load(url, workers=2).start()
    try:
        wait_until(lambda: load.ok >= 4, 120, "the load to get going")
        t0 = time.monotonic()
        helm(c, "upgrade", RELEASE, CHART, "-n", NS, "-f", write_values(real_cluster, 6), "--wait",
             "--timeout", "300s")

        def replaced() -> list[dict[str, Any]] | None:
            pods = server_pods(c)
            new = [p for p in pods if ready(p) and p["metadata"]["name"] not in old]
            return new if len(pods) == 2 and len(new) == 2 else None

        new = wait_until(replaced, 900, "both server pods replaced and Ready")
        figures["roll_s"] = round(time.monotonic() - t0, 1)
        figures["roll_new_pod_ready_after_created_s"] = [ready_after_created_s(p) for p in new]
        before = load.ok
        wait_until(lambda: load.ok >= before + 4, 120, "requests served by the new pods")
    finally:
        load.stop()
    figures["roll_requests_ok"], figures["roll_requests_failed"] = load.ok, len(load.failures)
    assert load.failures == [], load.failures[:5]
    assert load.ok > 0

    # 5. helm uninstall: the pre-delete hook deletes the LLMDeployment (its operator still running),
    # then everything of the release is gone; only the CRD stays (Helm never deletes crds/).
    t0 = time.monotonic()
    helm(c, "uninstall", RELEASE, "-n", NS, "--wait", "--timeout", "300s")
    wait_until(lambda: not get(c, "pods", "-n", NS)["items"], 300, "every pod of the release gone")
    figures["helm_uninstall_s"] = round(time.monotonic() - t0, 1)
    assert not get(c, "llmdeployments", "-n", NS)["items"]
    left = {kind: [o["metadata"]["name"] for o in get(c, kind, "-n", NS)["items"]
                   if o["metadata"]["name"] not in ("default", "kube-root-ca.crt")]
            for kind in ("deployments", "replicasets", "services", "configmaps", "secrets", "serviceaccounts",
                         "roles", "rolebindings", "poddisruptionbudgets", "leases")}
    assert not any(left.values()), left
    for kind in ("clusterroles", "clusterrolebindings"):
        assert not [o["metadata"]["name"] for o in get(c, kind)["items"] if RELEASE + "-" in o["metadata"]["name"]]
    assert c.kubectl("get", "crd", "llmdeployments.fleetserve.io", check=False).returncode == 0

    figures["test_s"] = round(time.monotonic() - started, 1)
    print(f"\nreal-node e2e figures: {json.dumps(figures)}")
    if os.environ.get("FLEETSERVE_REAL_NODE_E2E_REPORT"):
        Path(os.environ["FLEETSERVE_REAL_NODE_E2E_REPORT"]).write_text(json.dumps(figures, indent=1) + "\n")
