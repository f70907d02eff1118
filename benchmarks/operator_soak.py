"""Operator soak: N minutes of LLMDeployments autoscaling up and down — does the operator's memory stay flat?

    .venv/bin/python benchmarks/operator_soak.py --minutes 30 --crs 50 [--arms after,before]

What is real and what is emulated:

* Real: the operator, run as its own process (``fleetserve operator -n NS``, as
  benchmarks/operator_reconcile.py does, with benchmarks/api_count/ counting every
  request it sends), the dev cluster's API server, etcd, scheduler and
  controller-manager (Deployments, ReplicaSets, EndpointSlices, the node-lifecycle
  controller), and the operator's scraping: it GETs ``http://<podIP>:8000/metrics``
  of every ready pod over TCP, as in production.
* Emulated: the model servers and their kubelet. 50 CRs x up to 3 ``fleetserve serve``
  processes do not fit on a 2-core machine, so this script registers its own nodes
  (``soak-<run>-<i>``, Lease heartbeats like the node agent's) and plays their
  kubelet: every pod scheduled there gets a pod IP from a dev-cluster network block
  (claimed like a node agent's), a TCP listener on ``<podIP>:8000`` that serves
  fleetserve's real ``/metrics`` exposition (``fleetserve_server.metrics.ServerMetrics``
  fed with engine snapshots) and ``/ready``, turns Ready after ``--startup-seconds``,
  and on deletion turns not-ready, stops listening and is removed (grace 0), as
  the kubelet does once a container exited. The servers are metric emitters.
* Load: every CR has the same smooth demand curve (queue = waiting + running over
  the fleet, 0 .. 1.15 x maxReplicas x targetQueueLength, period ``--period-minutes``),
  phase-shifted per CR; each ready pod reports its share of the fleet's queue, so the
  autoscaler really scales 1 -> 3 -> 1 several times per CR during the run.

Arms: ``after`` is this checkout's operator; ``before`` the operator of an older
commit checked out at ``--before-tree`` (``git worktree add /tmp/op-before 4193a92``),
run with this venv and that tree first on PYTHONPATH. Both run at the same time, in
their own namespaces, against the same API server, so they see the same machine load.
That older operator's API model refuses fields the current CRD defaults into every
object (``strategy``, ``modelCache``); ``--compat`` (set for ``before``) drops spec
fields its model does not know before it validates (they hold their defaults here).

Every ``--sample-seconds``: each operator's RSS and CPU (``/proc``), Python's allocated
blocks (``sys.getallocatedblocks``, every sample) and gc object count (every 6th), both
read inside the operator process by a probe thread this script adds (benchmark only),
reconciles (``fleetserve_operator_reconciles_total``), scale events
(``fleetserve_operator_scale_events_total``), API requests (benchmarks/api_count),
and the ready pods. Reports per arm the RSS slope (least squares after
``--warmup-minutes``, MB/min; the issue-23 target is <= 1) and per-window
(``--window-minutes``) rates; writes ``--out`` (JSON) and a PNG beside it.
``--tracemalloc`` starts tracemalloc in the operators and writes the top growth
sites (diagnosis only: it changes what it measures).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import gc
import http.client
import json
import math
import os
import queue
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SRC_DIRS = ("operator", "server", "cli", "router", "devcluster")
PROBE_ENV = "FLEETSERVE_SOAK_PROBE"
TRACE_ENV = "FLEETSERVE_SOAK_TRACEMALLOC"
SOAK_LABEL = "fleetserve.io/operator-soak"
SERVED = "soak"
JsonObj = dict[str, Any]


# --------------------------------------------------------------------------- the operator process
def child(argv: list[str]) -> int:
    """``operator_soak.py --child [--compat] -- ARGS``: ``fleetserve ARGS`` with the soak's probe thread."""
    compat = "--compat" in argv[: argv.index("--")]
    args = argv[argv.index("--") + 1:]
    probe = os.environ.get(PROBE_ENV)
    if os.environ.get(TRACE_ENV):
        import tracemalloc

        tracemalloc.start(int(os.environ[TRACE_ENV]))
    import faulthandler
    import signal

    faulthandler.register(signal.SIGUSR1, all_threads=True)  # `kill -USR1 PID`: every thread's stack to the log
    if probe:
        threading.Thread(target=_probe, args=(probe,), daemon=True, name="soak-probe").start()
    if compat:
        _strip_unknown_spec_fields()
    import fleetserve_operator
    from fleetserve_cli.main import main

    print(f"operator_soak child: fleetserve_operator from {fleetserve_operator.__file__}", flush=True)
    return int(main(args) or 0)


def _probe(path: str) -> None:
    """Append one JSON line per 10 s: allocated blocks; gc objects every 6th line; tracemalloc tops."""
    n = 0
    first = None
    while True:
        row: JsonObj = {"t": time.time(), "blocks": sys.getallocatedblocks()}
        if n % 6 == 0:
            row["objects"] = len(gc.get_objects())
        if os.environ.get(TRACE_ENV) and n % 30 == 12:  # after 2 min, then every 5 min
            import tracemalloc

            snap = tracemalloc.take_snapshot().filter_traces(
                [tracemalloc.Filter(False, tracemalloc.__file__), tracemalloc.Filter(False, "<frozen *>")])
            if first is None:
                first = snap
            row["traced_mb"] = round(tracemalloc.get_traced_memory()[0] / 1e6, 2)
            row["top_growth"] = [
                {"kb": round(s.size_diff / 1e3, 1), "count": s.count_diff,
                 "where": [f"{f.filename.rsplit('site-packages/', 1)[-1]}:{f.lineno}" for f in s.traceback[:6]]}
                for s in snap.compare_to(first, "traceback")[:15]]
        with open(path, "a") as f:
            f.write(json.dumps(row) + "\n")
        n += 1
        time.sleep(10)


def _strip_unknown_spec_fields() -> None:
    """Let an older operator read objects the current CRD defaulted (fields it does not know)."""
    import fleetserve_operator.api.spec as spec_module
    from pydantic import BaseModel

    def strip(model: type[BaseModel], data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        out = {}
        for key, value in data.items():
            for name, info in model.model_fields.items():
                if key in (info.alias, name):
                    sub = info.annotation
                    out[key] = strip(sub, value) if isinstance(sub, type) and issubclass(sub, BaseModel) else value
                    break
        return out

    original = spec_module.spec_from_body

    def spec_from_body(body: Any) -> Any:
        spec = dict(body.get("spec") or {})
        return original({**body, "spec": strip(spec_module.LLMDeploymentSpec, spec)})

    spec_module.spec_from_body = spec_from_body  # type: ignore[assignment]


# --------------------------------------------------------------------------- load
@dataclass
class Schedule:
    """The fleet's total queue (waiting + running) over time: 0 .. peak, one cosine per period,
    phase-shifted per CR so that scale events spread over the run."""

    names: list[str]
    period_s: float
    peak: float
    start: float = field(default_factory=time.monotonic)

    def total_queue(self, name: str) -> int:
        try:
            phase = self.names.index(name) / len(self.names)
        except ValueError:
            return 0
        x = (time.monotonic() - self.start) / self.period_s + phase
        return int(round(self.peak * 0.5 * (1 - math.cos(2 * math.pi * x))))


# --------------------------------------------------------------------------- emulated pods
@dataclass
class Pod:
    uid: str
    namespace: str
    name: str
    instance: str
    node: str
    ip: str
    started: float
    body: JsonObj
    ready: bool = False
    deleting_since: float | None = None
    metrics: Any = None
    server: Any = None
    tokens: float = 0.0


class Emitter:
    """One asyncio loop (in a thread) serving every emulated pod's /metrics, /ready and /health."""

    def __init__(self, schedule: Schedule, share: Any) -> None:
        self.schedule, self.share = schedule, share
        self.loop = asyncio.new_event_loop()
        self.scrapes: collections.Counter[str] = collections.Counter()
        threading.Thread(target=self.loop.run_forever, daemon=True, name="emitter").start()

    def start(self, pod: Pod) -> None:
        from fleetserve_server.engine.interfaces import EngineStats
        from fleetserve_server.metrics import ServerMetrics

        last = [time.monotonic()]

        def stats() -> EngineStats:
            q = self.share(pod)
            now = time.monotonic()
            pod.tokens += q * 20 * (now - last[0])  # ~20 tokens/s per running sequence
            last[0] = now
            running = min(q, 8)
            total = 4096
            usage = min(0.95, 0.05 + 0.04 * q)
            return EngineStats(requests_waiting=q - running, requests_running=running, kv_blocks_total=total,
                               kv_blocks_free=int(total * (1 - usage)), kv_cache_usage_ratio=round(usage, 3),
                               kv_capacity_tokens=total * 16, prompt_tokens=int(pod.tokens * 4),
                               generation_tokens=int(pod.tokens), steps=int(pod.tokens / 4))

        pod.metrics = ServerMetrics(SERVED, stats)
        pod.metrics.set_model(quantization="none", dtype="float32", max_model_len=2048,
                              weights_bytes=270_000_000, kv_cache_bytes=1_200_000_000)
        pod.server = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(lambda r, w: self._serve(pod, r, w), pod.ip, 8000, reuse_address=True),
            self.loop).result(10)

    def stop(self, pod: Pod) -> None:
        if pod.server is not None:
            server, pod.server = pod.server, None

            async def close() -> None:
                server.close()
                await server.wait_closed()

            asyncio.run_coroutine_threadsafe(close(), self.loop).result(10)

    async def _serve(self, pod: Pod, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            path = head.split(b" ", 2)[1].decode() if head.count(b" ") >= 2 else "/"
            if path.startswith("/metrics"):
                self.scrapes[pod.namespace] += 1
                code, body = 200, pod.metrics.render()
                ctype = b"text/plain; version=0.0.4; charset=utf-8"
            elif path in ("/ready", "/health"):
                code, body, ctype = (200, b"ok", b"text/plain") if pod.deleting_since is None else (
                    503, b"draining", b"text/plain")
            else:
                code, body, ctype = 404, b"not found", b"text/plain"
            writer.write(b"HTTP/1.1 %d X\r\nContent-Type: %s\r\nContent-Length: %d\r\nConnection: close\r\n\r\n"
                         % (code, ctype, len(body)) + body)
            await writer.drain()
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError):
            pass
        finally:
            writer.close()


class EmulatedNodes:
    """The kubelet of ``nodes`` nodes of its own, for the pods of ``namespaces`` (see the module docstring)."""

    def __init__(self, cluster: Any, run: str, namespaces: list[str], nodes: int, startup_s: float,
                 schedule: Schedule, workdir: Path) -> None:
        from fleetserve_devcluster.agent import claim_network_block
        from fleetserve_devcluster.kube import Kube as DevKube
        from fleetserve_devcluster.pods import NodeAllocator

        self.cluster, self.run, self.namespaces, self.startup_s = cluster, run, namespaces, startup_s
        self.kube = DevKube.from_kubeconfig(cluster.kubeconfig, secrets_dir=workdir / "kube")
        self.block = claim_network_block()
        self.allocs = {f"soak-{run}-{i}": NodeAllocator(index=i, gpus=0, net=self.block.index) for i in range(nodes)}
        self.pods: dict[str, Pod] = {}
        self.finished: set[str] = set()  # uids this kubelet ran and removed: never run again
        self.events: queue.Queue[tuple[str, JsonObj]] = queue.Queue()
        self.stats: collections.Counter[str] = collections.Counter()
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.emitter = Emitter(schedule, self.pod_share)
        self.schedule = schedule

    # ---- load per pod
    def pod_share(self, pod: Pod) -> int:
        """This pod's part of its fleet's queue: the fleet's total split over its ready pods."""
        with self.lock:
            peers = sorted(p.uid for p in self.pods.values()
                           if p.namespace == pod.namespace and p.instance == pod.instance and p.ready
                           and p.deleting_since is None)
        total = self.schedule.total_queue(pod.instance)
        if pod.uid not in peers:
            return 0
        base, extra = divmod(total, len(peers))
        return base + (1 if peers.index(pod.uid) < extra else 0)

    def ready_pods(self, namespace: str) -> int:
        with self.lock:
            return sum(1 for p in self.pods.values() if p.namespace == namespace and p.ready)

    # ---- nodes
    def register(self) -> None:
        from fleetserve_devcluster.agent import NodeConfig, node_status

        for name, alloc in self.allocs.items():
            labels = {"kubernetes.io/hostname": name, "kubernetes.io/os": "linux", SOAK_LABEL: self.run}
            node = self.kube.create("/api/v1/nodes", {"apiVersion": "v1", "kind": "Node",
                                                      "metadata": {"name": name, "labels": labels}, "spec": {}})
            status = node_status(name, alloc.host_ip, NodeConfig(gpus=0, cpu="64", memory="1Ti"), node)
            self.kube.patch(f"/api/v1/nodes/{name}/status", {"status": status}, strategic=True)
        self._renew_leases()

    def wait_schedulable(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            taints = [t for n in self.allocs for t in (self.kube.get(f"/api/v1/nodes/{n}").get("spec") or {})
                      .get("taints") or []]
            if not taints:
                return
            time.sleep(1)
        raise SystemExit(f"the soak's nodes still have taints after {timeout:g} s: {taints}")

    def _renew_leases(self) -> None:
        from fleetserve_devcluster.agent import LEASE_SECONDS, micro_time
        from fleetserve_devcluster.kube import KubeError, ns_path

        for name in self.allocs:
            spec = {"holderIdentity": name, "leaseDurationSeconds": LEASE_SECONDS, "renewTime": micro_time()}
            path = ns_path("kube-node-lease", "leases", name, group="coordination.k8s.io/v1")
            try:
                self.kube.patch(path, {"spec": spec})
            except KubeError as exc:
                if exc.status != 404:
                    raise
                self.kube.create(ns_path("kube-node-lease", "leases", group="coordination.k8s.io/v1"), {
                    "apiVersion": "coordination.k8s.io/v1", "kind": "Lease", "metadata": {"name": name},
                    "spec": spec})

    def _post_node_status(self) -> None:
        from fleetserve_devcluster.agent import NodeConfig, node_status

        for name, alloc in self.allocs.items():
            node = self.kube.get(f"/api/v1/nodes/{name}")
            status = node_status(name, alloc.host_ip, NodeConfig(gpus=0, cpu="64", memory="1Ti"), node)
            self.kube.patch(f"/api/v1/nodes/{name}/status", {"status": status}, strategic=True)

    # ---- pods
    def start(self) -> None:
        for ns in self.namespaces:
            threading.Thread(target=self._watch, args=(ns,), daemon=True, name=f"watch-{ns}").start()
        threading.Thread(target=self._loop, daemon=True, name="kubelet").start()
        # Its own thread, as the kubelet's: a backlog of pod work must never delay the Lease (the
        # node-lifecycle controller marks every pod of a node without one not-ready after 50 s).
        threading.Thread(target=self._heartbeat, daemon=True, name="heartbeat").start()

    def _watch(self, namespace: str) -> None:
        from fleetserve_devcluster.kube import KubeError

        path = f"/api/v1/namespaces/{namespace}/pods"
        while not self.stopping.is_set():
            try:
                listed = self.kube.get(path)
                for item in listed.get("items") or []:
                    self.events.put(("LISTED", item))
                rv = listed["metadata"]["resourceVersion"]
                conn = http.client.HTTPSConnection(self.kube.server.host, self.kube.server.port,
                                                   context=self.kube._ctx, timeout=360)
                headers = {"Accept": "application/json"}
                conn.request("GET", f"{path}?watch=true&resourceVersion={rv}&timeoutSeconds=300", headers=headers)
                resp = conn.getresponse()
                for line in resp:
                    if self.stopping.is_set():
                        break
                    event = json.loads(line)
                    if event.get("type") == "ERROR":
                        break
                    self.events.put((event["type"], event["object"]))
                conn.close()
            except (KubeError, OSError, ValueError) as exc:
                print(f"operator_soak: watch {namespace}: {exc}; again", file=sys.stderr, flush=True)
                time.sleep(1)

    def _heartbeat(self) -> None:
        next_status = 0.0
        while not self.stopping.wait(0 if next_status == 0.0 else 10):
            try:
                self._renew_leases()
                if time.monotonic() >= next_status:
                    next_status = time.monotonic() + 30
                    self._post_node_status()
            except Exception as exc:
                print(f"operator_soak: heartbeat: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)

    def _loop(self) -> None:
        while not self.stopping.is_set():
            try:
                while True:
                    try:
                        kind, obj = self.events.get(timeout=0.2)
                    except queue.Empty:
                        break
                    self._on_event(kind, obj)
                self._step(time.monotonic())
            except Exception as exc:  # keep the kubelet alive through API hiccups
                print(f"operator_soak: kubelet: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
                time.sleep(1)

    def _on_event(self, kind: str, obj: JsonObj) -> None:
        meta = obj["metadata"]
        uid = meta["uid"]
        node = (obj.get("spec") or {}).get("nodeName")
        pod = self.pods.get(uid)
        if uid in self.finished:
            return
        if kind == "DELETED":
            if pod is not None:
                self._forget(pod)
            return
        if pod is None:
            if node not in self.allocs or (obj.get("status") or {}).get("phase") in ("Succeeded", "Failed"):
                return
            if meta.get("deletionTimestamp"):  # deleted before it ever ran here
                self._delete(meta["namespace"], meta["name"], uid)
                self.finished.add(uid)
                return
            ip = self.allocs[node].allocate_ip(uid)
            from fleetserve_devcluster.podworker import add_address

            add_address(ip)
            instance = (meta.get("labels") or {}).get("app.kubernetes.io/instance", "")
            pod = Pod(uid, meta["namespace"], meta["name"], instance, node, ip, time.monotonic(), obj)
            self.emitter.start(pod)
            with self.lock:
                self.pods[uid] = pod
            self.stats[f"started {pod.namespace}"] += 1
            self._patch_status(pod)
        pod.body = obj
        observed = {c.get("type"): c.get("status") for c in (obj.get("status") or {}).get("conditions") or []}
        if pod.deleting_since is None and pod.ready and observed.get("Ready") != "True":
            # Someone else wrote Ready=False (the node-lifecycle controller after a late heartbeat):
            # the kubelet's status manager reports the pod's real state again.
            self.stats[f"status re-asserted {pod.namespace}"] += 1
            self._patch_status(pod)
        if meta.get("deletionTimestamp") and pod.deleting_since is None:
            pod.deleting_since = time.monotonic()
            with self.lock:
                pod.ready = False
            self._patch_status(pod)

    def _step(self, now: float) -> None:
        for pod in list(self.pods.values()):
            if pod.deleting_since is None and not pod.ready and now - pod.started >= self.startup_s:
                with self.lock:
                    pod.ready = True
                self._patch_status(pod)
            elif pod.deleting_since is not None and now - pod.deleting_since >= 1.0 and pod.server is not None:
                # the server drained and exited: the kubelet removes the pod for good
                self.emitter.stop(pod)
                self._delete(pod.namespace, pod.name, pod.uid)
                self.stats[f"deleted {pod.namespace}"] += 1
                self._forget(pod)

    def _delete(self, namespace: str, name: str, uid: str) -> None:
        from fleetserve_devcluster.kube import KubeError

        try:
            self.kube.request("DELETE", f"/api/v1/namespaces/{namespace}/pods/{name}",
                              {"gracePeriodSeconds": 0, "preconditions": {"uid": uid}})
        except KubeError as exc:
            if exc.status not in (404, 409):
                raise

    def _forget(self, pod: Pod) -> None:
        from fleetserve_devcluster.podworker import remove_address

        self.emitter.stop(pod)
        with self.lock:
            self.pods.pop(pod.uid, None)
        self.finished.add(pod.uid)
        self.allocs[pod.node].free(pod.uid)
        remove_address(pod.ip)

    def _patch_status(self, pod: Pod) -> None:
        from fleetserve_devcluster.kube import KubeError
        from fleetserve_devcluster.status import ContainerView, PodView, build_status, now_rfc3339

        containers = [ContainerView(name=c["name"], image=c.get("image", ""), running_since=now_rfc3339(),
                                    container_id=f"soak://{pod.uid[:8]}", started=True, ready=pod.ready, waiting=None)
                      for c in (pod.body.get("spec") or {}).get("containers") or []]
        view = PodView(pod_ip=pod.ip, host_ip=self.allocs[pod.node].host_ip, start_time=now_rfc3339(),
                       containers=containers)
        status = build_status(pod.body, view)
        try:
            self.kube.patch(f"/api/v1/namespaces/{pod.namespace}/pods/{pod.name}/status", {"status": status},
                            strategic=True)
        except KubeError as exc:
            if exc.status != 404:
                raise

    def stop(self) -> None:
        from fleetserve_devcluster.agent import remove_block_addresses
        from fleetserve_devcluster.kube import KubeError, ns_path

        self.stopping.set()
        time.sleep(0.5)
        for pod in list(self.pods.values()):
            self._forget(pod)
        for name in self.allocs:
            for path in (f"/api/v1/nodes/{name}",
                         ns_path("kube-node-lease", "leases", name, group="coordination.k8s.io/v1")):
                try:
                    self.kube.delete(path)
                except (KubeError, OSError):
                    pass
        remove_block_addresses(self.block.index)
        self.block.release()


# --------------------------------------------------------------------------- operators
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Arm:
    label: str
    tree: Path
    namespace: str
    workdir: Path
    compat: bool
    port: int = 0
    proc: subprocess.Popen[bytes] | None = None
    rows: list[JsonObj] = field(default_factory=list)

    @property
    def count_file(self) -> Path:
        return self.workdir / f"{self.label}-api-calls.json"

    @property
    def probe_file(self) -> Path:
        return self.workdir / f"{self.label}-probe.jsonl"

    def start(self, cluster: Any, tracemalloc_frames: int) -> None:
        python_path = os.pathsep.join([str(ROOT / "benchmarks" / "api_count"),
                                       *(str(self.tree / d) for d in SRC_DIRS)])
        env = {**cluster.env, "PYTHONUNBUFFERED": "1", "PYTHONPATH": python_path,
               "FLEETSERVE_BENCH_API_COUNT": str(self.count_file), PROBE_ENV: str(self.probe_file)}
        if tracemalloc_frames:
            env[TRACE_ENV] = str(tracemalloc_frames)
        self.port = free_port()
        log = open(self.workdir / f"{self.label}-operator.log", "wb")  # noqa: SIM115 (the child owns it)
        self.proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--child", *(["--compat"] if self.compat else []), "--",
             "operator", "-n", self.namespace, "--metrics-port", str(self.port), "--metrics-host", "127.0.0.1"],
            env=env, stdout=log, stderr=subprocess.STDOUT)
        log.close()

    def metrics_text(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=5) as resp:
            return str(resp.read().decode())

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/healthz", timeout=2) as resp:
                return bool(resp.status == 200)
        except OSError:
            return False

    def sample(self, t: float, nodes: EmulatedNodes) -> JsonObj:
        assert self.proc is not None
        pid = self.proc.pid
        row: JsonObj = {"t": round(t, 1), "rss_mb": rss_mb(pid), "cpu_s": cpu_s(pid), "threads": threads(pid),
                        "ready_pods": nodes.ready_pods(self.namespace),
                        "scrapes_served": nodes.emitter.scrapes[self.namespace]}
        try:
            text = self.metrics_text()
            row["reconciles"] = metric_sum(text, "fleetserve_operator_reconciles_total")
            row["scale_up"] = metric_sum(text, "fleetserve_operator_scale_events_total", 'direction="up"')
            row["scale_down"] = metric_sum(text, "fleetserve_operator_scale_events_total", 'direction="down"')
            row["scrape_errors"] = metric_sum(text, "fleetserve_operator_scrape_errors_total")
            row["desired_replicas"] = metric_sum(text, "fleetserve_operator_desired_replicas")
        except OSError as exc:
            row["metrics_error"] = str(exc)
        calls = api_counts(self.count_file)
        row["api_calls"] = sum(calls.values())
        row["api_writes"] = sum(n for k, n in calls.items() if k.split()[0] in ("POST", "PUT", "PATCH", "DELETE"))
        probe = last_probe(self.probe_file)
        row["blocks"] = probe.get("blocks")
        row["objects"] = probe.get("objects")
        return row

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def control_plane_pids(state_dir: Path) -> dict[str, int]:
    """The dev cluster's own processes (by the state dir in their command line), for their CPU."""
    wanted = ("kube-apiserver", "etcd", "kube-controller-manager", "kube-scheduler")
    found: dict[str, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        name = os.path.basename(argv[0].decode(errors="replace"))
        if name in wanted and f"{state_dir}/".encode() in b" ".join(argv):
            found[name] = int(entry.name)
    found["emulator (this script)"] = os.getpid()
    return found


def _cpu_or_none(pid: int) -> float | None:
    try:
        return cpu_s(pid)
    except OSError:
        return None


def threads(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Threads:"):
            return int(line.split()[1])
    return 0


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return round(int(line.split()[1]) / 1024, 2)
    return float("nan")


def cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return round((int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK"), 2)


def metric_sum(text: str, name: str, must: str = "") -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name + "{") and must in line)


def api_counts(path: Path) -> collections.Counter[str]:
    try:
        return collections.Counter(json.loads(path.read_text()))
    except (OSError, ValueError):
        return collections.Counter()


def last_probe(path: Path) -> JsonObj:
    """The newest probe line, with the newest object count carried forward."""
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return {}
    rows = [json.loads(line) for line in lines[-7:] if line.strip()]
    if not rows:
        return {}
    out = dict(rows[-1])
    out.setdefault("objects", next((r["objects"] for r in reversed(rows) if "objects" in r), None))
    return out


def manifest(name: str, run: str, args: argparse.Namespace) -> JsonObj:
    """Valid for both operators: only fields the older API model knows."""
    return {
        "apiVersion": "fleetserve.io/v1alpha1", "kind": "LLMDeployment", "metadata": {"name": name},
        "spec": {
            "model": {"source": "builtin:smollm2-135m-instruct"},
            "resources": {"gpus": 0, "memory": "2Gi"},
            "autoscaling": {"enabled": True, "minReplicas": 1, "maxReplicas": args.max_replicas,
                            "targetQueueLength": args.target_queue, "scrapeIntervalSeconds": args.scrape_seconds,
                            "scaleUpStabilizationSeconds": 0,
                            "scaleDownStabilizationSeconds": args.scale_down_window},
            "scheduling": {"nodeSelector": {SOAK_LABEL: run}},
        },
    }


# --------------------------------------------------------------------------- analysis
def slope(points: list[tuple[float, float]]) -> float | None:
    """Least-squares slope of (x, y)."""
    if len(points) < 3:
        return None
    mx, my = statistics.fmean(p[0] for p in points), statistics.fmean(p[1] for p in points)
    den = sum((x - mx) ** 2 for x, _ in points)
    return sum((x - mx) * (y - my) for x, y in points) / den if den else None


def rate(rows: list[JsonObj], key: str) -> float | None:
    """Per minute between the first and the last row that have ``key``."""
    have = [r for r in rows if r.get(key) is not None]
    if len(have) < 2 or have[-1]["t"] <= have[0]["t"]:
        return None
    return round((have[-1][key] - have[0][key]) / (have[-1]["t"] - have[0]["t"]) * 60, 2)


def summarize(rows: list[JsonObj], warmup_s: float, window_s: float, crs: int) -> JsonObj:
    after = [r for r in rows if r["t"] >= warmup_s]
    s = slope([(r["t"] / 60, r["rss_mb"] * 1.048576) for r in after])  # MB (10^6 bytes) per minute
    windows = []
    start = warmup_s
    end = rows[-1]["t"] if rows else 0
    while start < end - 1:
        stop = min(start + window_s, end)
        w = [r for r in rows if start <= r["t"] <= stop]
        if len(w) >= 2:
            ws = slope([(r["t"] / 60, r["rss_mb"] * 1.048576) for r in w])
            windows.append({
                "from_min": round(start / 60, 1), "to_min": round(stop / 60, 1),
                "rss_mib_end": w[-1]["rss_mb"], "rss_slope_mb_per_min": None if ws is None else round(ws, 2),
                "reconciles_per_min": rate(w, "reconciles"),
                "scale_events_per_min": _sum_rates(w, "scale_up", "scale_down"),
                "api_requests_per_min": rate(w, "api_calls"), "api_writes_per_min": rate(w, "api_writes"),
                "cpu_percent": cpu_percent(w),
                "scrape_errors_per_min": rate(w, "scrape_errors"),
                "objects_end": w[-1].get("objects"), "blocks_end": w[-1].get("blocks"),
                "ready_pods_mean": round(statistics.fmean(r["ready_pods"] for r in w), 1),
            })
        start = stop
    ups = (after[-1].get("scale_up") or 0) - (after[0].get("scale_up") or 0) if after else 0
    downs = (after[-1].get("scale_down") or 0) - (after[0].get("scale_down") or 0) if after else 0
    settled = slope([(r["t"] / 60, r["rss_mb"] * 1.048576) for r in rows if r["t"] >= warmup_s + window_s])
    served = rate(after, "scrapes_served")
    ready = statistics.fmean(r["ready_pods"] for r in after) if after else 0
    return {
        "rss_slope_mb_per_min": None if s is None else round(s, 3),
        "rss_slope_mb_per_min_after_first_window": None if settled is None else round(settled, 3),
        "meets_target_slope_le_1": None if s is None else s <= 1.0,
        "rss_mib_after_warmup": after[0]["rss_mb"] if after else None,
        "rss_mib_end": rows[-1]["rss_mb"] if rows else None,
        "rss_mib_max": max((r["rss_mb"] for r in rows), default=None),
        "threads_max": max((r["threads"] for r in rows if r.get("threads")), default=None),
        "scale_ups_after_warmup": ups, "scale_downs_after_warmup": downs,
        "scale_events_per_cr_after_warmup": round((ups + downs) / crs, 1),
        "reconciles_per_min": rate(after, "reconciles"),
        "scrape_errors_per_min": rate(after, "scrape_errors"),
        "scrapes_served_per_min": served,
        # how often one ready pod's /metrics was read: scrapeIntervalSeconds when the operator keeps up
        "seconds_between_scrapes_of_a_pod": round(ready * 60 / served, 1) if served else None,
        "api_requests_per_min": rate(after, "api_calls"),
        "cpu_percent": cpu_percent(after),
        "windows": windows,
    }


def cpu_percent(rows: list[JsonObj]) -> float | None:
    per_min = rate(rows, "cpu_s")
    return None if per_min is None else round(per_min / 60 * 100, 1)


def _sum_rates(rows: list[JsonObj], *keys: str) -> float | None:
    rates = [rate(rows, k) for k in keys]
    return None if any(r is None for r in rates) else round(sum(r for r in rates if r is not None), 2)


def plot(path: Path, samples: dict[str, list[JsonObj]], warmup_s: float, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax2) = plt.subplots(2, 1, figsize=(9, 6.5), sharex=True, height_ratios=(2, 1))
    for label, rows in samples.items():
        ax.plot([r["t"] / 60 for r in rows], [r["rss_mb"] for r in rows], label=f"{label}: operator RSS")
        scaled = [r for r in rows if r.get("scale_up") is not None]  # a sample whose /metrics read failed has none
        ax2.plot([r["t"] / 60 for r in scaled], [r["scale_up"] + r["scale_down"] for r in scaled],
                 label=f"{label}: scale events (up + down, cumulative)")
    for a in (ax, ax2):
        a.axvline(warmup_s / 60, color="grey", linestyle=":", label="end of warm-up" if a is ax else None)
        a.legend(loc="upper left", fontsize=8)
    ax.set_ylabel("RSS (MiB)")
    ax2.set_ylabel("scale events")
    ax2.set_xlabel("minutes")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


# --------------------------------------------------------------------------- main
def run(args: argparse.Namespace) -> JsonObj:
    from fleetserve_devcluster.testing import acquire, create_namespace, wait_until

    cluster = acquire()
    cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(ROOT / "crds"))
    cluster.kubectl("wait", "--for=condition=Established", "crd/llmdeployments.fleetserve.io")
    run_id = uuid.uuid4().hex[:6]
    workdir = Path(f"/tmp/operator-soak-{run_id}")
    workdir.mkdir()
    trees = {"after": ROOT, "before": Path(args.before_tree)}
    arms = [Arm(label, trees[label], f"opsoak-{run_id}-{label}", workdir, compat=label == "before")
            for label in args.arms.split(",")]
    names = [f"llm-{i:02d}" for i in range(args.crs)]
    schedule = Schedule(names, args.period_minutes * 60, 1.15 * args.max_replicas * args.target_queue)
    for arm in arms:
        create_namespace(cluster, arm.namespace)
    pods_max = len(arms) * args.crs * (args.max_replicas + 1)
    nodes = EmulatedNodes(cluster, run_id, [a.namespace for a in arms], math.ceil(pods_max / 100), args.startup_seconds,
                          schedule, workdir)
    result: JsonObj = {"run": run_id, "workdir": str(workdir)}
    try:
        nodes.register()
        nodes.start()
        nodes.wait_schedulable()
        for arm in arms:  # the code each operator runs: HEAD of its tree now, and what differs from it
            result.setdefault("arms", {})[arm.label] = {
                "tree": str(arm.tree), "commit": git_head(arm.tree), "namespace": arm.namespace,
                "uncommitted_operator_files": git_dirty(arm.tree, "operator")}
            arm.start(cluster, args.tracemalloc)
        for arm in arms:
            wait_until(lambda arm=arm: arm.healthy() or (arm.proc and arm.proc.poll() is not None), 120,
                       f"{arm.label} operator /healthz")
            if arm.proc is None or arm.proc.poll() is not None:
                raise SystemExit(f"{arm.label} operator exited; see {workdir}/{arm.label}-operator.log")
        schedule.start = time.monotonic()
        for name in names:  # interleaved, so both arms get their CRs at the same time
            for arm in arms:
                nodes.kube.create(f"/apis/fleetserve.io/v1alpha1/namespaces/{arm.namespace}/llmdeployments",
                                  manifest(name, run_id, args))
        started = time.monotonic()
        result["started_utc"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        total_s = (args.warmup_minutes + args.minutes) * 60
        load: list[float] = []
        machine: list[JsonObj] = []
        processes = control_plane_pids(cluster.state_dir)
        while (t := time.monotonic() - started) < total_s:
            for arm in arms:
                if arm.proc is not None and arm.proc.poll() is not None:
                    raise SystemExit(f"{arm.label} operator exited {arm.proc.returncode}; see its log in {workdir}")
                arm.rows.append(arm.sample(t, nodes))
            load.append(os.getloadavg()[0])
            machine.append({"t": round(t, 1), "load1": load[-1], **{n: _cpu_or_none(p) for n, p in processes.items()}})
            if len(arms[0].rows) % 6 == 1:
                print(" | ".join(f"{a.label} t={a.rows[-1]['t']:.0f}s rss={a.rows[-1]['rss_mb']}MiB "
                                 f"pods={a.rows[-1]['ready_pods']} scrapes={a.rows[-1]['scrapes_served']} "
                                 f"errors={a.rows[-1].get('scrape_errors')} up/down={a.rows[-1].get('scale_up')}/"
                                 f"{a.rows[-1].get('scale_down')}" for a in arms), flush=True)
            time.sleep(max(0.0, args.sample_seconds - (time.monotonic() - started - t)))
        result["ended_utc"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        result["load_average_1m_median"] = round(statistics.median(load), 2)
        after_warmup = [m for m in machine if m["t"] >= args.warmup_minutes * 60] or machine
        result["cpu_percent_after_warmup"] = {
            n: cpu_percent([{"t": m["t"], "cpu_s": m[n]} for m in after_warmup if m[n] is not None])
            for n in processes}
        result["scrapes_served"] = dict(nodes.emitter.scrapes)
        result["pods"] = dict(nodes.stats)
    finally:
        for arm in arms:  # while the operators run: the older one's finalizers let the CRs go
            cluster.kubectl("delete", "llmdeployments", "--all", "-n", arm.namespace, "--wait=true", "--timeout=180s",
                            check=False, timeout=200)
        deadline = time.monotonic() + 120
        while nodes.pods and time.monotonic() < deadline:
            time.sleep(1)
        for arm in arms:
            arm.stop()
        nodes.stop()
        for arm in arms:
            cluster.kubectl("delete", "namespace", arm.namespace, "--wait=false", check=False)
    result["settings"] = {k: v for k, v in vars(args).items() if k != "out"}
    result["cpu_count"] = os.cpu_count()
    result["samples"] = {arm.label: arm.rows for arm in arms}
    tracemalloc_tops = {arm.label: [json.loads(x) for x in arm.probe_file.read_text().splitlines() if "top_growth" in x]
                        for arm in arms if arm.probe_file.exists()}
    if any(tracemalloc_tops.values()):
        result["tracemalloc"] = tracemalloc_tops
    return report(result, args)


def report(result: JsonObj, args: argparse.Namespace) -> JsonObj:
    """Summaries per arm from ``result["samples"]``, written to ``args.out`` (JSON) and a PNG beside it."""
    warmup_s, window_s = args.warmup_minutes * 60, args.window_minutes * 60
    for label, rows in result["samples"].items():
        result["arms"][label].update(summarize(rows, warmup_s, window_s, args.crs))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    title = (f"operator soak: {args.crs} LLMDeployments autoscaling per operator, {len(result['samples'])} operators "
             f"at once, {args.minutes:g} min after {args.warmup_minutes:g} min warm-up\nRSS slope after warm-up: " +
             ", ".join(f"{a} {result['arms'][a]['rss_slope_mb_per_min']} MB/min" for a in result["arms"]))
    plot(out.with_suffix(".png"), result["samples"], warmup_s, title)
    return result


def git_head(tree: Path) -> str:
    done = subprocess.run(["git", "-C", str(tree), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return done.stdout.strip()


def git_dirty(tree: Path, path: str) -> list[str]:
    done = subprocess.run(["git", "-C", str(tree), "status", "--porcelain", "--", path], capture_output=True, text=True)
    return [line[3:] for line in done.stdout.splitlines()]


def main() -> int:
    if "--child" in sys.argv[1:2]:
        return child(sys.argv[2:])
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=30.0, help="measured minutes after the warm-up")
    parser.add_argument("--warmup-minutes", type=float, default=2.0)
    parser.add_argument("--crs", type=int, default=50, help="LLMDeployments per operator")
    parser.add_argument("--arms", default="after,before", help="after (this checkout), before (--before-tree)")
    parser.add_argument("--before-tree", default="/tmp/op-before")
    parser.add_argument("--max-replicas", type=int, default=3)
    parser.add_argument("--target-queue", type=float, default=4.0)
    parser.add_argument("--scrape-seconds", type=int, default=5)
    parser.add_argument("--scale-down-window", type=int, default=30)
    parser.add_argument("--period-minutes", type=float, default=6.0, help="period of each CR's load curve")
    parser.add_argument("--startup-seconds", type=float, default=5.0, help="pod start to Ready")
    parser.add_argument("--sample-seconds", type=float, default=10.0)
    parser.add_argument("--window-minutes", type=float, default=5.0)
    parser.add_argument("--tracemalloc", type=int, default=0, metavar="FRAMES", help="diagnosis only")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "operator_soak.json"))
    parser.add_argument("--reanalyze", action="store_true",
                        help="recompute the summaries and the plot of --out from its samples (no cluster)")
    args = parser.parse_args()
    if args.reanalyze:
        result = json.loads(Path(args.out).read_text())
        args = argparse.Namespace(**{**result["settings"], "out": args.out})
        result = report(result, args)
    else:
        result = run(args)
    print(json.dumps({k: v for k, v in result.items() if k not in ("samples", "tracemalloc")}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
