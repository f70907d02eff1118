"""Harness for the autoscaler's end-to-end tests and benchmark (benchmarks/autoscaler_bench.py).

Everything here is real: the operator runs as ``fleetserve operator`` in a
subprocess against the dev cluster, the node agent runs ``fleetserve serve``
pods on a tiny random-weight Llama, and the load goes through the Service's
proxy address (``fleetserve.io/proxy-address``) from a bounded async client.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from fleetserve_devcluster.testing import DevClusterHandle, wait_until

REPO = Path(__file__).resolve().parents[2]
PROXY_ANNOTATION = "fleetserve.io/proxy-address"
SERVED_NAME = "tiny"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


RESTRICTED = ("pod-security.kubernetes.io/enforce=restricted", "pod-security.kubernetes.io/enforce-version=latest")


def enforce_restricted(cluster: DevClusterHandle, namespace: str) -> None:
    """Label ``namespace`` to enforce the restricted Pod Security profile (version latest)."""
    cluster.kubectl("label", "--overwrite", "namespace", namespace, *RESTRICTED)


def apply_crds(cluster: DevClusterHandle) -> None:
    cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(REPO / "crds"))
    cluster.kubectl("wait", "--for=condition=established", "--timeout=60s", "crd/llmdeployments.fleetserve.io")


@contextlib.contextmanager
def running_operator(cluster: DevClusterHandle, namespace: str, log_path: Path) -> Iterator[str]:
    """``fleetserve operator --namespace NS`` in a subprocess; yields its /metrics URL."""
    port = free_port()
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "fleetserve_cli.main", "operator", "--namespace", namespace, "--no-leader-election",
             "--metrics-port", str(port), "--metrics-host", "127.0.0.1", "--verbose"],
            env=cluster.env, stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_until(lambda: proc.poll() is not None or _get(f"http://127.0.0.1:{port}/healthz") == 200, 60,
                       "the operator's /healthz")
            if proc.poll() is not None:
                raise AssertionError(f"the operator exited {proc.returncode}:\n{log_path.read_text()[-4000:]}")
            yield f"http://127.0.0.1:{port}/metrics"
        finally:
            if proc.poll() is None:
                # While the operator still runs: its finalizer lets the LLMDeployments go, and their
                # pods (and the addresses they bind) are gone before the next test starts.
                cluster.kubectl("delete", "llmdeployments", "--all", "-n", namespace, "--wait=true",
                                "--timeout=120s", check=False, timeout=150)
                _wait_no_pods(cluster, namespace)
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _wait_no_pods(cluster: DevClusterHandle, namespace: str, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        out = cluster.kubectl("get", "pods", "-n", namespace, "-o", "name", check=False).stdout.strip()
        if not out:
            return
        time.sleep(1)


def _get(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return int(resp.status)
    except OSError:
        return 0


def read_url(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as resp:
        return str(resp.read().decode())


def llmd_manifest(name: str, model_dir: Path, *, autoscaling: dict[str, Any] | None, replicas: int = 1,
                  gpus: int = 0, engine: dict[str, Any] | None = None, memory: str = "2Gi") -> dict[str, Any]:
    resources: dict[str, Any] = {"gpus": gpus, "memory": memory}
    if gpus:
        resources["gpuMemory"] = "8Gi"
    spec: dict[str, Any] = {
        "model": {"source": str(model_dir), "servedName": SERVED_NAME},
        "resources": resources,
        "engine": {"maxModelLen": 512, "maxNumSeqs": 4, "maxBatchTokens": 512, **(engine or {})},
        "replicas": replicas,
    }
    if autoscaling is not None:
        spec["autoscaling"] = autoscaling
    return {"apiVersion": "fleetserve.io/v1alpha1", "kind": "LLMDeployment", "metadata": {"name": name},
            "spec": spec}


class Fleet:
    """Reads one LLMDeployment, its Deployment, pods and Service through the admin client."""

    def __init__(self, cluster: DevClusterHandle, namespace: str, name: str) -> None:
        from kubernetes import client

        api = cluster.api_client()
        self.cluster, self.namespace, self.name = cluster, namespace, name
        self.custom = client.CustomObjectsApi(api)
        self.apps = client.AppsV1Api(api)
        self.core = client.CoreV1Api(api)

    def apply(self, manifest: dict[str, Any]) -> None:
        self.cluster.kubectl("apply", "-n", self.namespace, "-f", "-", input=json.dumps(manifest))

    def cr(self) -> dict[str, Any]:
        return dict(self.custom.get_namespaced_custom_object(
            "fleetserve.io", "v1alpha1", self.namespace, "llmdeployments", self.name))

    def status(self) -> dict[str, Any]:
        return dict(self.cr().get("status") or {})

    def condition(self, type_: str) -> dict[str, Any]:
        for c in self.status().get("conditions") or []:
            if c.get("type") == type_:
                return dict(c)
        return {}

    def deployment_replicas(self) -> int | None:
        from kubernetes.client.exceptions import ApiException

        try:
            return int(self.apps.read_namespaced_deployment(self.name, self.namespace).spec.replicas)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def pods(self) -> list[Any]:
        return list(self.core.list_namespaced_pod(
            self.namespace, label_selector=f"app.kubernetes.io/instance={self.name}").items)

    def ready_pods(self) -> list[Any]:
        return [p for p in self.pods() if p.metadata.deletion_timestamp is None and any(
            c.type == "Ready" and c.status == "True" for c in p.status.conditions or [])]

    def pending_unschedulable(self) -> int:
        return sum(1 for p in self.pods() if any(
            c.type == "PodScheduled" and c.status == "False" and c.reason == "Unschedulable"
            for c in p.status.conditions or []))

    def proxy_address(self) -> str:
        def annotated() -> str | None:
            svc = self.core.read_namespaced_service(self.name, self.namespace)
            return (svc.metadata.annotations or {}).get(PROXY_ANNOTATION)

        return wait_until(annotated, 60, f"the {PROXY_ANNOTATION} annotation on Service {self.name}")

    def events(self, reason: str) -> list[Any]:
        items = self.core.list_namespaced_event(self.namespace).items
        return [e for e in items if e.reason == reason and e.involved_object.name == self.name]


def pod_metric(pod_ip: str, name: str, port: int = 8000) -> float:
    """Sum of one metric's samples on a pod's /metrics (0 when absent)."""
    from prometheus_client.parser import text_string_to_metric_families

    total = 0.0
    for family in text_string_to_metric_families(read_url(f"http://{pod_ip}:{port}/metrics")):
        for sample in family.samples:
            if sample.name == name:
                total += sample.value
    return total


def pod_queue(pod_ip: str) -> float:
    return pod_metric(pod_ip, "fleetserve_requests_waiting") + pod_metric(pod_ip, "fleetserve_requests_running")


@dataclass
class LoadResult:
    """Every request the load sent: how many succeeded completely, and what went wrong with the rest."""

    ok: int = 0
    failures: list[str] = field(default_factory=list)
    # (unix start time, seconds, succeeded) of every request
    requests: list[tuple[float, float, bool]] = field(default_factory=list)
    # (unix time, requests in flight, requests completed so far)
    timeline: list[tuple[float, int, int]] = field(default_factory=list)


class Load:
    """A bounded async client: ``concurrency`` workers, each sending one completion after the other,
    until ``stop()`` or ``max_duration_s``. Success = HTTP 200 and a choice with a finish_reason."""

    def __init__(self, address: str, *, concurrency: int, max_tokens: int,
                 prompt: str | Callable[[], str] = "Tell me a story.",
                 max_duration_s: float = 1200.0, request_timeout_s: float = 600.0) -> None:
        self.url = f"http://{address}/v1/completions"
        self.concurrency, self.max_tokens, self.prompt = concurrency, max_tokens, prompt
        self.max_duration_s, self.request_timeout_s = max_duration_s, request_timeout_s
        self.result = LoadResult()
        self._stop = threading.Event()
        self._in_flight = 0
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)

    def start(self) -> Load:
        self._thread.start()
        return self

    def stop(self) -> LoadResult:
        self._stop.set()
        self._thread.join(self.request_timeout_s + 30)
        assert not self._thread.is_alive(), "the load client did not finish its in-flight requests"
        return self.result

    @property
    def completed(self) -> int:
        return self.result.ok + len(self.result.failures)

    async def _main(self) -> None:
        deadline = time.monotonic() + self.max_duration_s
        limits = httpx.Limits(max_connections=self.concurrency, max_keepalive_connections=0)
        async with httpx.AsyncClient(timeout=self.request_timeout_s, trust_env=False, limits=limits) as client:
            sampler = asyncio.create_task(self._sample())
            await asyncio.gather(*(self._worker(client, deadline) for _ in range(self.concurrency)))
            sampler.cancel()

    async def _sample(self) -> None:
        while True:
            self.result.timeline.append((time.time(), self._in_flight, self.completed))
            await asyncio.sleep(0.5)

    async def _worker(self, client: httpx.AsyncClient, deadline: float) -> None:
        while not self._stop.is_set() and time.monotonic() < deadline:
            prompt = self.prompt() if callable(self.prompt) else self.prompt
            body = {"model": SERVED_NAME, "prompt": prompt, "max_tokens": self.max_tokens, "temperature": 0.8}
            self._in_flight += 1
            started, wall = time.monotonic(), time.time()
            error = await self._one(client, body)
            self._in_flight -= 1
            self.result.requests.append((wall, time.monotonic() - started, error is None))
            if error is None:
                self.result.ok += 1
            else:
                self.result.failures.append(error)

    async def _one(self, client: httpx.AsyncClient, body: dict[str, Any]) -> str | None:
        """None when the request got a 200 and a complete answer, else what went wrong."""
        try:
            response = await client.post(self.url, json=body)
        except httpx.HTTPError as exc:
            return f"{type(exc).__name__}: {exc}"
        if response.status_code != 200:
            return f"HTTP {response.status_code}: {response.text[:200]}"
        try:
            choice = (response.json().get("choices") or [{}])[0]
        except ValueError:
            return f"not JSON: {response.text[:200]}"
        if choice.get("finish_reason") not in ("stop", "length"):
            return f"incomplete answer: {response.text[:200]}"
        return None


@dataclass
class Timeline:
    """Samples of the fleet once a second, for assertions about order and for the benchmark plot."""

    rows: list[dict[str, Any]] = field(default_factory=list)


class Recorder:
    """Samples desired/ready replicas, the observed queue/KV and pending pods in a thread."""

    def __init__(self, fleet: Fleet, load: Load | None = None, period_s: float = 1.0) -> None:
        self.fleet, self.load, self.period_s = fleet, load, period_s
        self.timeline = Timeline()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> Recorder:
        self._thread.start()
        return self

    def stop(self) -> Timeline:
        self._stop.set()
        self._thread.join(30)
        return self.timeline

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                status = self.fleet.status()
                observed = (status.get("autoscaler") or {}).get("observed") or {}
                self.timeline.rows.append({
                    "t": time.time(),
                    "desired": status.get("desiredReplicas"),
                    "ready": status.get("readyReplicas"),
                    "queue_per_replica": observed.get("queueLength"),
                    "kv": observed.get("kvCacheUsage"),
                    "in_flight": self.load._in_flight if self.load else 0,
                    "pending": self.fleet.pending_unschedulable(),
                })
            except Exception as exc:  # noqa: BLE001 - a missed sample must not end the recording
                self.timeline.rows.append({"t": time.time(), "error": str(exc)})
            self._stop.wait(self.period_s)


def make_model(path: Path) -> Path:
    """The tiny random-weight Llama the pods serve (in a subprocess: keeps torch out of pytest)."""
    if not (path / "config.json").exists():
        subprocess.run([sys.executable, "-c",
                        "import sys; from fleetserve_server.testing import make_tiny_llama; "
                        "make_tiny_llama(sys.argv[1])", str(path)], check=True, timeout=300)
    return path
