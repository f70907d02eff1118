"""The dev cluster's node agent, in the kubelet's role, for a machine without a container runtime.

It registers `fs-node-0..N-1` as GPU nodes (`nvidia.com/gpu` capacity, GPU
labels, Ready, Lease heartbeats so the node-lifecycle controller never taints
them), watches the pods bound to them (one informer per node, `spec.nodeName=<node>`,
as each kubelet watches its own; see watch.py) and hands each pod to a `PodWorker`
thread that runs its containers as local processes.  It reacts to a pod change as soon
as the watch delivers it; when idle it costs the API server only its heartbeats.
On a real cluster the kubelet does all of this.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from . import locks
from .adopt import DEFAULT_PROVISION_DELAY_S, Adopter, provision_delay
from .kube import Kube, KubeError, ns_path
from .logserver import BASE_PORT as LOG_BASE_PORT
from .logserver import LogServer
from .podnet import add_address, local_addresses, remove_address
from .pods import GPU_RESOURCE, MAX_NODES, NETWORK_BLOCKS, NodeAllocator, default_fleetserve_bin
from .podworker import AgentContext, PodWorker
from .proxy import ServiceProxy
from .status import now_rfc3339
from .watch import Changes, Informer, ObjectCache

JsonObj = dict[str, Any]
log = logging.getLogger("fleetserve.devcluster.agent")
POLL_SECONDS = 0.5  # the loop's timer (heartbeats, adoption delays) when no watch event wakes it sooner
LEASE_SECONDS = 40
LEASE_RENEW_SECONDS = 10
NODE_STATUS_SECONDS = 30
NODE_PREFIX = "fs-node-"


@dataclass(frozen=True)
class NodeConfig:
    """The pretend hardware of every node the agent registers."""

    gpus: int = 2
    cpu: str = "32"
    memory: str = "128Gi"
    gpu_product: str = "NVIDIA-H100-80GB-HBM3"
    gpu_memory_mib: int = 81559
    kubelet_version: str = "v1.36.3"
    kubelet_port: int = 0  # the agent's `kubectl logs` endpoint (logserver.py); 0: none


def node_labels(name: str, cfg: NodeConfig) -> dict[str, str]:
    labels = {
        "kubernetes.io/hostname": name,
        "kubernetes.io/os": "linux",
        "kubernetes.io/arch": "amd64",
        "fleetserve.io/node-agent": "true",
    }
    if cfg.gpus:
        # The labels NVIDIA's GPU feature discovery puts on real GPU nodes.
        labels.update({
            "nvidia.com/gpu.present": "true",
            "nvidia.com/gpu.product": cfg.gpu_product,
            "nvidia.com/gpu.count": str(cfg.gpus),
            "nvidia.com/gpu.memory": str(cfg.gpu_memory_mib),
        })
    return labels


def node_status(name: str, host_ip: str, cfg: NodeConfig, old: JsonObj | None = None) -> JsonObj:
    """The Node status the agent reports: capacity == allocatable, Ready, addresses, nodeInfo."""
    resources = {"cpu": cfg.cpu, "memory": cfg.memory, "pods": "110", "ephemeral-storage": "100Gi",
                 GPU_RESOURCE: str(cfg.gpus)}
    now = now_rfc3339()
    old_conds = {c["type"]: c for c in (old or {}).get("status", {}).get("conditions") or []}

    def cond(kind: str, status: str, reason: str, message: str) -> JsonObj:
        prev = old_conds.get(kind, {})
        since = prev.get("lastTransitionTime") if prev.get("status") == status else now
        return {"type": kind, "status": status, "reason": reason, "message": message,
                "lastHeartbeatTime": now, "lastTransitionTime": since}

    return {
        "capacity": resources,
        "allocatable": resources,
        "conditions": [
            cond("MemoryPressure", "False", "KubeletHasSufficientMemory", "node agent has sufficient memory"),
            cond("DiskPressure", "False", "KubeletHasNoDiskPressure", "node agent has no disk pressure"),
            cond("PIDPressure", "False", "KubeletHasSufficientPID", "node agent has sufficient PID"),
            cond("Ready", "True", "KubeletReady", "fleetserve dev-cluster node agent is posting ready status"),
        ],
        # No Hostname address: the API server would prefer it for `kubectl logs`, and it does not resolve.
        "addresses": [{"type": "InternalIP", "address": host_ip}],
        "daemonEndpoints": {"kubeletEndpoint": {"Port": cfg.kubelet_port}},
        "nodeInfo": {
            "machineID": name, "systemUUID": name, "bootID": str(os.getpid()),
            "kernelVersion": platform.release(), "osImage": "fleetserve dev cluster (local processes)",
            "containerRuntimeVersion": "fleetserve-local://0.1", "kubeletVersion": cfg.kubelet_version,
            "kubeProxyVersion": cfg.kubelet_version, "operatingSystem": "linux", "architecture": "amd64",
        },
    }


def micro_time() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class NodeAgent:
    """Registers the nodes and keeps one PodWorker per pod bound to them.

    Invariant: at most one live worker per pod uid; a uid whose worker finished is
    never run again (its pod is being deleted or is done).
    """

    def __init__(self, ctx: AgentContext, nodes: int, cfg: NodeConfig, net: int = 0,
                 adopt_delay_s: float = DEFAULT_PROVISION_DELAY_S) -> None:
        self.ctx, self.cfg, self.net = ctx, cfg, net
        self.nodes = {f"{NODE_PREFIX}{i}": NodeAllocator(index=i, gpus=cfg.gpus, net=net) for i in range(nodes)}
        # Nodes a cluster autoscaler creates (kwok.x-k8s.io/node: fake) are run too: see adopt.py.
        self.adopter = Adopter(ctx.kube, adopt_delay_s, self.nodes, net, cfg.gpus,
                               lambda name, ip, gpus, old: node_status(name, ip, replace(cfg, gpus=gpus), old))
        # Pods and Nodes come from informers (watch.py): one Node informer (the adopter reads it) and
        # one pod informer per node this agent runs; any change wakes the loop at once.
        self.changes = Changes()
        self.node_informer = Informer(ctx.kube, "/api/v1/nodes", changes=self.changes, name="nodes")
        self.adopter.list_nodes = self.node_informer.items
        self.pod_informers: dict[str, Informer] = {}
        self.workers: dict[str, PodWorker] = {}
        self.finished: set[str] = set()
        self.next_lease = 0.0
        self.next_status = 0.0
        self.logs: LogServer | None = None  # `kubectl logs`, on the nodes' own addresses only

    @property
    def kube(self) -> Kube:
        return self.ctx.kube

    # ------------------------------------------------------------------ nodes
    def remove_stale_addresses(self) -> None:
        """Pod IPs left on `lo` in this agent's block by a killed agent (its pods died with it)."""
        remove_block_addresses(self.net)

    def register_nodes(self) -> None:
        for name, alloc in self.nodes.items():
            body = {"apiVersion": "v1", "kind": "Node",
                    "metadata": {"name": name, "labels": node_labels(name, self.cfg)}, "spec": {}}
            node = self.kube.get_or_none(f"/api/v1/nodes/{name}")
            if node is None:
                node = self.kube.create("/api/v1/nodes", body)
                log.info("registered node %s (%s %s, hostIP %s)", name, self.cfg.gpus, GPU_RESOURCE, alloc.host_ip)
            else:
                self.kube.patch(f"/api/v1/nodes/{name}", {"metadata": {"labels": node_labels(name, self.cfg)}})
            add_address(alloc.host_ip)  # the API server reaches the node's log endpoint there
            self._post_status(name, alloc, node)
        self._renew_leases()

    def _post_status(self, name: str, alloc: NodeAllocator, node: JsonObj | None) -> None:
        add_address(alloc.host_ip)  # idempotent; back if anything on the machine removed it meanwhile
        status = node_status(name, alloc.host_ip, self.cfg, node)
        status["addresses"] = [{"$patch": "replace"}, *status["addresses"]]  # merged by type otherwise
        self.kube.patch(f"/api/v1/nodes/{name}/status", {"status": status}, strategic=True)

    def _renew_leases(self) -> None:
        for name in self.nodes:
            path = ns_path("kube-node-lease", "leases", name, group="coordination.k8s.io/v1")
            spec = {"holderIdentity": name, "leaseDurationSeconds": LEASE_SECONDS, "renewTime": micro_time()}
            try:
                self.kube.patch(path, {"spec": spec})
            except KubeError as exc:
                if exc.status != 404:
                    raise
                node = self.kube.get(f"/api/v1/nodes/{name}")
                owner = {"apiVersion": "v1", "kind": "Node", "name": name, "uid": node["metadata"]["uid"]}
                self.kube.create(ns_path("kube-node-lease", "leases", group="coordination.k8s.io/v1"), {
                    "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                    "metadata": {"name": name, "ownerReferences": [owner]}, "spec": spec})

    def heartbeat(self, now: float) -> None:
        if now >= self.next_lease:
            self.next_lease = now + LEASE_RENEW_SECONDS
            self._renew_leases()
        if now >= self.next_status:
            self.next_status = now + NODE_STATUS_SECONDS
            for name, alloc in self.nodes.items():
                node = self.kube.get_or_none(f"/api/v1/nodes/{name}")
                if node is None:  # someone deleted it: register again, as a restarted kubelet would
                    self.register_nodes()
                    return
                self._post_status(name, alloc, node)

    # ------------------------------------------------------------------ pods
    def watch_pods(self) -> None:
        """A pod informer for every node this agent runs (own and adopted), none for any other."""
        wanted = set(self.nodes) | set(self.adopter.allocators)
        for node in sorted(wanted - set(self.pod_informers)):
            self.pod_informers[node] = Informer(self.kube, "/api/v1/pods", field_selector=f"spec.nodeName={node}",
                                                changes=self.changes, name=f"pods on {node}").start()
        for node in set(self.pod_informers) - wanted:
            self.pod_informers.pop(node).stop(wait=False)

    def sync_pods(self) -> None:
        """Start a worker per new pod, pass every worker its pod's latest version, end the gone ones."""
        pods: list[JsonObj] = []
        unsynced: set[str] = set()  # nodes whose first list has not come yet: their workers are left alone
        for node, informer in self.pod_informers.items():
            if informer.synced.is_set():
                pods.extend(informer.items())
            else:
                unsynced.add(node)
        seen: set[str] = set()
        for pod in pods:
            node = pod.get("spec", {}).get("nodeName")
            alloc = self.nodes.get(node) or self.adopter.allocator(node)
            if alloc is None:
                continue
            uid = pod["metadata"]["uid"]
            seen.add(uid)
            worker = self.workers.get(uid)
            if worker is not None:
                worker.update(pod)
                continue
            if uid in self.finished:
                continue
            terminal = pod.get("status", {}).get("phase") in ("Succeeded", "Failed")
            if terminal and not pod["metadata"].get("deletionTimestamp"):
                continue  # finished before this agent started: nothing to run
            worker = PodWorker(self.ctx, node, alloc, pod)
            self.workers[uid] = worker
            worker.start()
        for uid, worker in list(self.workers.items()):
            if uid not in seen and worker.node not in unsynced:
                worker.gone.set()
            if not worker.is_alive():
                del self.workers[uid]
                self.finished.add(uid)
        self.finished &= seen

    def serve_logs(self) -> None:
        """The log endpoint listens on the address of every node this agent runs (own and adopted)."""
        if self.logs is None:
            return
        wanted = {a.host_ip for a in self.nodes.values()} | {a.host_ip for a in self.adopter.allocators.values()}
        for ip in wanted - set(self.logs.servers):
            add_address(ip)
        self.logs.serve_on(wanted)

    def running_on(self, node: str) -> int:
        """Pods of `node` whose processes this agent still runs (or is stopping)."""
        return sum(1 for w in self.workers.values() if w.node == node and w.is_alive())

    def run(self, stop: threading.Event, on_pass: Callable[[], None] = lambda: None) -> None:
        """Register, then heartbeat and sync pods until `stop` is set; API errors are retried.

        A pass runs as soon as an informer's cache changed, else every POLL_SECONDS (the
        heartbeats and the adoption delays are timed); it reads the caches, so an idle pass
        sends nothing to the API server.
        """
        self.remove_stale_addresses()
        while not stop.is_set():
            try:
                self.register_nodes()
                break
            except (KubeError, OSError) as exc:
                log.warning("registering nodes failed (retrying): %s", exc)
                stop.wait(1.0)
        self.node_informer.start()
        seen = self.changes.count
        while not stop.is_set():
            try:
                self.heartbeat(time.monotonic())
                if self.node_informer.synced.is_set():
                    self.adopter.sync(time.monotonic(), self.running_on)
                self.watch_pods()
                self.serve_logs()
                self.sync_pods()
                on_pass()
            except (KubeError, OSError) as exc:
                log.warning("sync failed (retrying): %s", exc)
            seen = self.changes.wait(seen, POLL_SECONDS)

    def shutdown(self) -> None:
        """Stop every pod's processes (SIGTERM, a short wait, SIGKILL); nothing is written to the API."""
        for informer in [self.node_informer, *self.pod_informers.values()]:
            informer.stop(wait=False)
        if self.ctx.objects is not None:
            self.ctx.objects.close()
        for worker in self.workers.values():
            worker.stop()
        for worker in self.workers.values():
            worker.join(timeout=10)


class RequestLog:
    """Writes the components' request counts (Kube.counts) to a JSON file whenever they changed.

    `{"started": <unix time>, "written": <unix time>, "agent": {"LIST pods": 3, ...}, "proxy": {...}}`:
    a test or a benchmark reads it twice and divides the difference by the time between.
    """

    def __init__(self, path: Path, clients: dict[str, Kube]) -> None:
        self.path, self.clients, self.started = path, clients, time.time()
        self.last: dict[str, dict[str, int]] | None = None

    def write(self) -> None:
        counts = {name: kube.request_counts() for name, kube in self.clients.items()}
        if counts == self.last:
            return
        self.last = counts
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"started": self.started, "written": time.time(), **counts}, indent=1) + "\n")
        tmp.replace(self.path)


def remove_block_addresses(net: int) -> None:
    """Every address of pod-network block `net` on `lo` (nodes', own and adopted, and pods')."""
    for index in range(MAX_NODES):
        for ip in local_addresses(NodeAllocator(index=index, gpus=0, net=net).prefix):
            remove_address(ip)


# ---------------------------------------------------------------------- the process
HEARTBEAT_FILE = "node-agent.heartbeat"
REQUESTS_FILE = "node-agent.requests.json"  # API requests sent so far, by component, verb and resource
NETWORK_FILE = "network.json"  # the block the agent holds, so `down` can clean up after a killed agent


def remove_left_addresses(state_dir: Path, lock_dir: Path | None = None) -> None:
    """After the agent stopped: remove its block's addresses that a killed agent left on `lo`.

    Only while no other agent holds that block (it may have claimed it the moment ours died).
    """
    try:
        block = int(json.loads((state_dir / NETWORK_FILE).read_text())["block"])
    except (OSError, ValueError, KeyError, TypeError):
        return
    if locks.held_elsewhere(LEGACY_NET_LOCKS / f"{block}.lock"):
        return
    path = locks.private_dir(lock_dir or locks.lock_dir()) / f"net-{block}.lock"
    fd = locks.acquire(path, blocking=False)
    if fd is None:
        return
    try:
        remove_block_addresses(block)
    finally:
        locks.release(fd, path)


def component_argv(cluster: Any) -> list[str]:
    """How `fleetserve dev-cluster up` starts the agent (a `controlplane.Component`)."""
    return [default_fleetserve_bin(), "dev-cluster", "agent", "--state-dir", str(cluster.state_dir)]


def component_healthy(cluster: Any) -> bool:
    """Healthy while the agent's loop ran within the last 5 s (it touches a file every pass)."""
    try:
        return time.time() - (cluster.state_dir / HEARTBEAT_FILE).stat().st_mtime < 5.0
    except OSError:
        return False


LEGACY_NET_LOCKS = Path(tempfile.gettempdir()) / "fleetserve-devcluster-net"  # agents before the private lock dir


@dataclass
class NetworkBlock:
    """A pod-network block this process holds (an flock, dropped by the kernel if the process dies)."""

    index: int
    fd: int
    path: Path

    def release(self) -> None:
        locks.release(self.fd, self.path)


def claim_network_block(lock_dir: Path | None = None) -> NetworkBlock:
    """The lowest pod-network block no other running agent holds, locked for this process.

    The lock file lives in the dev cluster's private lock directory (locks.py); a block
    an older agent still holds through its lock in the temporary directory counts as taken.
    """
    directory = locks.private_dir(lock_dir or locks.lock_dir())
    for block in range(NETWORK_BLOCKS):
        if locks.held_elsewhere(LEGACY_NET_LOCKS / f"{block}.lock"):
            continue
        path = directory / f"net-{block}.lock"
        fd = locks.acquire(path, blocking=False)
        if fd is not None:
            return NetworkBlock(block, fd, path)
    raise RuntimeError(f"all {NETWORK_BLOCKS} pod-network blocks are held by running dev-cluster node agents "
                       "(run `fleetserve dev-cluster down` on clusters you no longer need)")


def run_agent(state_dir: Path, nodes: int, gpus_per_node: int, host_path_allow: tuple[str, ...] = (),
              proxy_retry_next_backend: bool = False) -> int:
    """The node agent and the service proxy in one process, until SIGTERM/SIGINT."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    kube = Kube.from_kubeconfig(state_dir / "kubeconfig", secrets_dir=state_dir / "node-agent")
    ctx = AgentContext(kube=kube, fleetserve_bin=default_fleetserve_bin(), api_host=kube.server.host,
                       api_port=kube.server.port, state_dir=state_dir, host_path_allow=host_path_allow,
                       objects=ObjectCache(kube))
    held = claim_network_block()  # until this process exits
    block = held.index
    (state_dir / NETWORK_FILE).write_text(json.dumps({"block": block}) + "\n")
    logs: LogServer | None = None
    try:
        logs = LogServer(state_dir, LOG_BASE_PORT + block, client_ca=state_dir / "pki" / "ca.crt")
    except (OSError, subprocess.CalledProcessError) as exc:
        log.warning("no `kubectl logs` endpoint (port %d): %s", LOG_BASE_PORT + block, exc)
    cfg = NodeConfig(gpus=gpus_per_node, kubelet_port=logs.port if logs else 0)
    agent = NodeAgent(ctx, nodes, cfg, net=block,
                      adopt_delay_s=provision_delay(state_dir))
    agent.logs = logs
    # The proxy has a client of its own, so that each one's requests are counted apart (REQUESTS_FILE).
    proxy = ServiceProxy(Kube(kube.server), state_dir, retry_next_backend=proxy_retry_next_backend)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    proxy.start()
    threading.Thread(target=proxy.run, args=(stop,), name="proxy-sync", daemon=True).start()
    heartbeat = state_dir / HEARTBEAT_FILE
    log.info("node agent: %d node(s) x %d %s, api %s:%d", nodes, gpus_per_node, GPU_RESOURCE,
             ctx.api_host, ctx.api_port)
    requests = RequestLog(state_dir / REQUESTS_FILE, {"agent": kube, "proxy": proxy.kube})

    def on_pass() -> None:
        heartbeat.touch()
        requests.write()

    agent.run(stop, on_pass=on_pass)
    log.info("node agent: stopping %d pod(s)", len(agent.workers))
    agent.shutdown()
    agent.remove_stale_addresses()  # the nodes' own addresses; the pods' went with their workers
    if logs is not None:
        logs.close()
    proxy.close()
    heartbeat.unlink(missing_ok=True)
    (state_dir / REQUESTS_FILE).unlink(missing_ok=True)
    held.release()
    return 0
