"""The dev cluster's real control plane on loopback: etcd, kube-apiserver,
kube-controller-manager and kube-scheduler, as detached local processes.

State dir layout (default ``~/.cache/fleetserve/dev-cluster``):

    cluster.json      ClusterConfig: ports, --nodes, --gpus-per-node (the node agent reads it)
    kubeconfig        admin (system:masters) kubeconfig, certs embedded
    pki/              CAs, serving/client certs, service-account keys
    etcd/             etcd's data dir
    kubeconfigs/      the controller-manager's and the scheduler's own identities
    pids/<name>.pid   one per long-running process (see processes.py)
    logs/<name>.log
    audit/            the API server's audit policy and log (service accounts, Metadata level):
                      which verbs on which resources each ServiceAccount really used

`up()` walks `COMPONENTS` in order and starts each one that is not running,
then waits for its health probe; anything further (the node agent, the
service proxy) is one more `Component` appended to that list.

Invariant: every process `up()` starts has a pid file before `up()` returns
or raises, so `down()` can always stop it.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import shutil
import socket
import ssl
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from . import locks, pki, processes, tools

DEFAULT_PORT_BASE = 16000


class DevClusterError(RuntimeError):
    """Something the user must fix; the message says what and how."""


def default_state_dir() -> Path:
    return tools.cache_dir() / "dev-cluster"


@dataclass(frozen=True)
class ClusterConfig:
    """What ``up`` was asked for; stored as ``<state>/cluster.json``."""

    nodes: int = 2
    gpus_per_node: int = 2
    port_base: int = DEFAULT_PORT_BASE
    k8s_version: str = tools.K8S_VERSION
    ports: dict[str, int] = field(default_factory=dict)
    # Host directories pods may mount as hostPath volumes (`up --allow-host-path`); none by default.
    host_path_allow: tuple[str, ...] = ()
    # The service proxy retries a refused connect on the next backend (`up --proxy-retry-next-backend`);
    # off by default, as kube-proxy cannot do it.
    proxy_retry_next_backend: bool = False
    # etcd serves TLS and requires a client certificate of its own CA (pki.ETCD_CA), as with kubeadm.
    etcd_tls: bool = True
    # `up --karpenter`: Karpenter's kwok provider as a component (karpenter.py), its NodePool `gpu`
    # limited to `max_gpu_nodes` nodes that register `node_provision_seconds` after their NodeClaim.
    karpenter: bool = False
    max_gpu_nodes: int = 3
    node_provision_seconds: float = 20.0
    # The node agent's own provisioning delay for adopted nodes (adopt.py; None: its default). With
    # Karpenter it is 0: the KWOKNodeClass's nodeRegistrationDelay already stands in for the boot.
    node_provision_delay_s: float | None = None
    # `up --real-nodes N`: N kubelets with containerd and a kube-proxy beside the agent's nodes (realnodes.py).
    real_nodes: int = 0

    def __post_init__(self) -> None:
        if self.nodes < 0:
            raise DevClusterError(f"--nodes must be >= 0, got {self.nodes}")
        if self.gpus_per_node < 0:
            raise DevClusterError(f"--gpus-per-node must be >= 0, got {self.gpus_per_node}")
        if not 1024 <= self.port_base <= 65000:
            raise DevClusterError(f"--port-base must be in 1024..65000, got {self.port_base}")
        allowed = tuple(self.host_path_allow)
        for path in allowed:
            if not path.startswith("/") or path.rstrip("/") == "":
                raise DevClusterError(f"--allow-host-path must be an absolute directory other than /, got {path!r}")
        object.__setattr__(self, "host_path_allow", allowed)
        if not self.ports:
            b = self.port_base
            object.__setattr__(self, "ports", {
                "apiserver": b + 443, "etcd": b + 379, "etcd-peer": b + 380,
                "controller-manager": b + 257, "scheduler": b + 259,
                "karpenter-metrics": b + 180, "karpenter-health": b + 181,
            })
        if not 0 <= self.real_nodes <= 4:
            raise DevClusterError(f"--real-nodes must be in 0..4, got {self.real_nodes}")
        if self.max_gpu_nodes < 0 or self.node_provision_seconds < 0:
            raise DevClusterError("--max-gpu-nodes and --node-provision-seconds must be >= 0")

    @classmethod
    def load(cls, state_dir: Path) -> ClusterConfig:
        try:
            data = json.loads((state_dir / "cluster.json").read_text())
        except FileNotFoundError:
            raise DevClusterError(f"no dev cluster in {state_dir}: run `fleetserve dev-cluster up`") from None
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        known.setdefault("etcd_tls", False)  # a cluster created before etcd had TLS keeps plain etcd
        return cls(**known)

    def save(self, state_dir: Path) -> None:
        tmp = state_dir / "cluster.json.tmp"
        tmp.write_text(json.dumps(asdict(self), indent=2) + "\n")
        tmp.replace(state_dir / "cluster.json")


@dataclass(frozen=True)
class Cluster:
    """A state dir plus its config: everything a component needs to build its command line."""

    state_dir: Path
    config: ClusterConfig

    @property
    def kubeconfig(self) -> Path:
        return self.state_dir / "kubeconfig"

    @property
    def pki(self) -> pki.PKIPaths:
        return pki.PKIPaths(self.state_dir / "pki")

    @property
    def api_address(self) -> str:
        """Where the API server listens: loopback, or with real nodes an address their pods reach
        (realnodes.API_ADDRESS: a local address of the host, so kube-proxy's DNAT of the `kubernetes`
        Service delivers locally and needs no IPv4 forwarding)."""
        from .realnodes import api_address

        return api_address(self.config)

    @property
    def server_url(self) -> str:
        return f"https://{self.api_address}:{self.config.ports['apiserver']}"

    def port(self, name: str) -> int:
        return self.config.ports[name]

    def component_kubeconfig(self, identity: str) -> Path:
        return self.state_dir / "kubeconfigs" / f"{identity}.kubeconfig"


@dataclass(frozen=True)
class Component:
    """A long-running process of the dev cluster.

    ``argv`` builds the command line (it may raise ToolMissingError); ``healthy``
    is the readiness probe polled after start, for up to ``timeout_s``;
    ``port`` (a key of ClusterConfig.ports) is checked to be free before start.
    """

    name: str
    argv: Callable[[Cluster], list[str]]
    healthy: Callable[[Cluster], bool]
    timeout_s: float = 60.0
    port: str | None = None
    env: Callable[[Cluster], dict[str, str]] | None = None
    # None: always part of the cluster; else only where it returns True (e.g. `up --karpenter`).
    enabled: Callable[[Cluster], bool] | None = None


# ---------------------------------------------------------------- probes


def _https_get(cluster: Cluster, port: int, path: str, client_cert: bool, verify: bool,
               host: str = "127.0.0.1") -> tuple[int, str]:
    ctx = ssl.create_default_context(cafile=str(cluster.pki.ca_crt)) if verify else ssl._create_unverified_context()
    if client_cert:
        ctx.load_cert_chain(str(cluster.pki.crt("admin")), str(cluster.pki.key("admin")))
    conn = http.client.HTTPSConnection(host, port, timeout=3, context=ctx)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read().decode(errors="replace")
    finally:
        conn.close()


def _probe(fn: Callable[[], bool]) -> bool:
    try:
        return fn()
    except (OSError, http.client.HTTPException, ssl.SSLError):
        return False


def etcd_healthy(cluster: Cluster) -> bool:
    def go() -> bool:
        conn: http.client.HTTPConnection
        if cluster.config.etcd_tls:
            p = cluster.pki
            ctx = ssl.create_default_context(cafile=str(p.crt(pki.ETCD_CA)))
            ctx.load_cert_chain(str(p.crt("etcd-healthcheck-client")), str(p.key("etcd-healthcheck-client")))
            conn = http.client.HTTPSConnection("127.0.0.1", cluster.port("etcd"), timeout=3, context=ctx)
        else:
            conn = http.client.HTTPConnection("127.0.0.1", cluster.port("etcd"), timeout=3)
        try:
            conn.request("GET", "/health")
            resp = conn.getresponse()
            return resp.status == 200 and json.loads(resp.read()).get("health") == "true"
        finally:
            conn.close()
    return _probe(go)


def apiserver_readyz(cluster: Cluster) -> tuple[int, str]:
    """``GET /readyz`` as the admin, TLS verified against the cluster CA."""
    return _https_get(cluster, cluster.port("apiserver"), "/readyz", client_cert=True, verify=True,
                      host=cluster.api_address)


def apiserver_healthy(cluster: Cluster) -> bool:
    return _probe(lambda: apiserver_readyz(cluster) == (200, "ok"))


def _healthz(port_name: str) -> Callable[[Cluster], bool]:
    # Their serving certs are self-signed at startup; /healthz is anonymous by default.
    return lambda c: _probe(lambda: _https_get(c, c.port(port_name), "/healthz", False, False)[0] == 200)


# ---------------------------------------------------------------- command lines


def _etcd_url(c: Cluster, port: str) -> str:
    return f"{'https' if c.config.etcd_tls else 'http'}://127.0.0.1:{c.port(port)}"


def etcd_argv(c: Cluster) -> list[str]:
    peer, client = _etcd_url(c, "etcd-peer"), _etcd_url(c, "etcd")
    p = c.pki
    tls = [
        f"--cert-file={p.crt('etcd-server')}", f"--key-file={p.key('etcd-server')}",
        f"--trusted-ca-file={p.crt(pki.ETCD_CA)}", "--client-cert-auth=true",
        f"--peer-cert-file={p.crt('etcd-peer')}", f"--peer-key-file={p.key('etcd-peer')}",
        f"--peer-trusted-ca-file={p.crt(pki.ETCD_CA)}", "--peer-client-cert-auth=true",
    ] if c.config.etcd_tls else []
    return [
        str(tools.tool_path("etcd")), "--name=fleetserve-dev", f"--data-dir={c.state_dir / 'etcd'}",
        f"--listen-client-urls={client}", f"--advertise-client-urls={client}",
        f"--listen-peer-urls={peer}", f"--initial-advertise-peer-urls={peer}",
        f"--initial-cluster=fleetserve-dev={peer}", "--initial-cluster-state=new",
        # A throwaway dev store on a shared machine: durability is not worth the fsync latency.
        "--unsafe-no-fsync", "--log-level=warn", "--quota-backend-bytes=2147483648", *tls,
    ]


# Metadata level (who, verb, resource, response code; never bodies) for ServiceAccounts only: the
# RBAC least-privilege test reads what the operator's account really did, and the components'
# own chatter (node agent, controllers) stays out of the log.
AUDIT_POLICY = {
    "apiVersion": "audit.k8s.io/v1",
    "kind": "Policy",
    "omitStages": ["RequestReceived"],
    "rules": [{"level": "Metadata", "userGroups": ["system:serviceaccounts"]}, {"level": "None"}],
}


def audit_log_path(state_dir: Path) -> Path:
    """JSON lines, one audit.k8s.io/v1 Event per line (rotated at 100 MB, one backup)."""
    return state_dir / "audit" / "audit.log"


def apiserver_argv(c: Cluster) -> list[str]:
    p = c.pki
    audit = audit_log_path(c.state_dir).parent
    return [
        str(tools.tool_path("kube-apiserver")),
        f"--etcd-servers={_etcd_url(c, 'etcd')}",
        *([f"--etcd-cafile={c.pki.crt(pki.ETCD_CA)}", f"--etcd-certfile={c.pki.crt('apiserver-etcd-client')}",
           f"--etcd-keyfile={c.pki.key('apiserver-etcd-client')}"] if c.config.etcd_tls else []),
        f"--bind-address={c.api_address}", f"--advertise-address={c.api_address}",
        f"--secure-port={c.port('apiserver')}",
        f"--tls-cert-file={p.crt('apiserver')}", f"--tls-private-key-file={p.key('apiserver')}",
        f"--client-ca-file={p.ca_crt}",
        "--authorization-mode=Node,RBAC",
        f"--service-account-issuer={pki.SERVICE_ACCOUNT_ISSUER}",
        f"--service-account-key-file={p.sa_pub}", f"--service-account-signing-key-file={p.sa_key}",
        f"--service-cluster-ip-range={_service_cidr(c)}",
        "--allow-privileged=true",
        # Aggregation layer (e.g. a metrics adapter) via the front-proxy identity.
        f"--requestheader-client-ca-file={p.crt('front-proxy-ca')}",
        "--requestheader-allowed-names=front-proxy-client",
        "--requestheader-username-headers=X-Remote-User", "--requestheader-group-headers=X-Remote-Group",
        "--requestheader-extra-headers-prefix=X-Remote-Extra-",
        f"--proxy-client-cert-file={p.crt('front-proxy-client')}",
        f"--proxy-client-key-file={p.key('front-proxy-client')}",
        f"--kubelet-client-certificate={p.crt('apiserver-kubelet-client')}",
        f"--kubelet-client-key={p.key('apiserver-kubelet-client')}",
        # ExtendedResourceToleration (with Karpenter): pods that request nvidia.com/gpu tolerate the
        # nvidia.com/gpu:NoSchedule taint of the GPU NodePool, as on GKE and AKS.
        "--enable-admission-plugins=NodeRestriction" + (",ExtendedResourceToleration" if c.config.karpenter else ""),
        # Endpoints may not point at loopback, so the `kubernetes` Service cannot get
        # 127.0.0.1 as its endpoint; processes in the agent's "pods" reach the API server through
        # the kubeconfig's URL instead (KUBERNETES_SERVICE_HOST/PORT = 127.0.0.1/<port>). With real
        # nodes the API server's address is one their pods reach: the Service gets it as its
        # endpoint (the default lease reconciler) and kube-proxy serves 198.19.255.1:443.
        *([] if c.config.real_nodes else ["--endpoint-reconciler-type=none"]),
        # Real nodes (realnodes.py) report their name as a Hostname address too: reach them by IP, no DNS.
        *(["--kubelet-preferred-address-types=InternalIP"] if c.config.real_nodes else []),
        f"--audit-policy-file={audit / 'policy.json'}", f"--audit-log-path={audit_log_path(c.state_dir)}",
        "--audit-log-format=json", "--audit-log-maxsize=100", "--audit-log-maxbackup=1",
        "--profiling=false", "--v=1",
    ]


def _service_cidr(c: Cluster) -> str:
    from .realnodes import service_cidr  # 10.0.0.0/24 unless the cluster has real nodes

    return service_cidr(c.config)


def _component_common(c: Cluster, identity: str, port_name: str) -> list[str]:
    kc = str(c.component_kubeconfig(identity))
    return [
        f"--kubeconfig={kc}", f"--authentication-kubeconfig={kc}", f"--authorization-kubeconfig={kc}",
        "--bind-address=127.0.0.1", f"--secure-port={c.port(port_name)}",
        # One replica each: leader election would only delay a restart by a lease period.
        "--leader-elect=false", "--profiling=false", "--v=1",
    ]


def controller_manager_argv(c: Cluster) -> list[str]:
    p = c.pki
    return [
        str(tools.tool_path("kube-controller-manager")),
        *_component_common(c, "controller-manager", "controller-manager"),
        f"--service-account-private-key-file={p.sa_key}", f"--root-ca-file={p.ca_crt}",
        "--use-service-account-credentials=true",
        f"--cluster-signing-cert-file={p.ca_crt}", f"--cluster-signing-key-file={p.ca_key}",
        f"--service-cluster-ip-range={_service_cidr(c)}",
        # Every default controller (GC, namespace, deployment, replicaset, endpointslice, ...).
        "--controllers=*",
    ]


def scheduler_argv(c: Cluster) -> list[str]:
    return [str(tools.tool_path("kube-scheduler")), *_component_common(c, "scheduler", "scheduler")]


def _agent():  # type: ignore[no-untyped-def]
    from . import agent  # lazy: the agent pulls in the pod runtime, which `env`/`status` never need

    return agent


# The order is the start order; `down` stops in reverse.  The node agent and the
# service proxy append their Component here (or via `register()`).
COMPONENTS: list[Component] = [
    Component("etcd", etcd_argv, etcd_healthy, timeout_s=30, port="etcd"),
    Component("kube-apiserver", apiserver_argv, apiserver_healthy, timeout_s=120, port="apiserver"),
    Component("kube-controller-manager", controller_manager_argv, _healthz("controller-manager"),
              timeout_s=60, port="controller-manager"),
    Component("kube-scheduler", scheduler_argv, _healthz("scheduler"), timeout_s=60, port="scheduler"),
    # The node agent + service proxy (agent.py), in the kubelet's and kube-proxy's roles: one process.
    Component("node-agent", lambda c: _agent().component_argv(c), lambda c: _agent().component_healthy(c),
              timeout_s=60),
]


def _karpenter_argv(c: Cluster) -> list[str]:
    from . import karpenter

    if not karpenter.installed():
        raise tools.ToolMissingError(f"Karpenter {karpenter.KARPENTER_VERSION} is not built ({karpenter.binary_path()}); "
                                     "run hack/karpenter/build.sh (`up --karpenter` runs it)")
    return [sys.executable, "-m", "fleetserve_devcluster.karpenter", "start", str(c.state_dir),
            str(c.config.max_gpu_nodes), f"{c.config.node_provision_seconds:g}",
            str(c.port("karpenter-metrics")), str(c.port("karpenter-health"))]


def _karpenter_healthy(c: Cluster) -> bool:
    from . import karpenter

    return karpenter.healthy(c.port("karpenter-health"))


COMPONENTS.append(Component("karpenter", _karpenter_argv, _karpenter_healthy, timeout_s=180,
                            port="karpenter-health", enabled=lambda c: c.config.karpenter))


def active(cluster: Cluster) -> list[Component]:
    """The components this cluster runs (those enabled for its config), in start order."""
    return [comp for comp in COMPONENTS if comp.enabled is None or comp.enabled(cluster)]


def register(component: Component) -> None:
    """Add a component after the control plane (idempotent by name)."""
    if all(c.name != component.name for c in COMPONENTS):
        COMPONENTS.append(component)


# ---------------------------------------------------------------- lifecycle


def port_free(port: int) -> bool:
    """True when nothing listens on 127.0.0.1:`port` (a port in TIME_WAIT counts as free, as for the servers)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _prepare(cluster: Cluster) -> None:
    if cluster.config.real_nodes:
        realnodes.prepare_host(cluster.state_dir)  # the API server's address exists before it starts
    paths = pki.ensure_pki(cluster.state_dir / "pki", realnodes.apiserver_sans(cluster.config))
    pki.write_kubeconfig(cluster.kubeconfig, cluster.server_url, paths, "admin")
    (cluster.state_dir / "kubeconfigs").mkdir(exist_ok=True)
    for identity in ("controller-manager", "scheduler"):
        pki.write_kubeconfig(cluster.component_kubeconfig(identity), cluster.server_url, paths, identity)
    audit_log_path(cluster.state_dir).parent.mkdir(mode=0o700, exist_ok=True)
    (audit_log_path(cluster.state_dir).parent / "policy.json").write_text(json.dumps(AUDIT_POLICY))


def _wait_healthy(cluster: Cluster, comp: Component, proc_pid: int, log: Callable[[str], None]) -> None:
    deadline = time.monotonic() + comp.timeout_s
    while time.monotonic() < deadline:
        if comp.healthy(cluster):
            return
        if not processes.is_running(cluster.state_dir, comp.name):
            raise DevClusterError(
                f"{comp.name} (pid {proc_pid}) exited during startup. Last lines of "
                f"{processes.log_file(cluster.state_dir, comp.name)}:\n"
                f"{processes.log_tail(cluster.state_dir, comp.name)}"
            )
        time.sleep(0.25)
    raise DevClusterError(
        f"{comp.name} did not become healthy within {comp.timeout_s:.0f}s. Last lines of "
        f"{processes.log_file(cluster.state_dir, comp.name)}:\n{processes.log_tail(cluster.state_dir, comp.name)}"
    )


@contextlib.contextmanager
def _locked(state_dir: Path) -> Iterator[None]:
    """Serialize `up`/`down` on one state dir across processes (parallel test sessions).

    The lock file is in the dev cluster's private lock directory (locks.py), never next to a state
    dir that may sit in a world-writable directory such as /tmp; it is removed on release.
    """
    try:
        path = locks.state_lock_path(state_dir)
        fd = locks.acquire(path)
    except locks.LockDirError as exc:
        raise DevClusterError(str(exc)) from None
    assert fd is not None
    try:
        yield
    finally:
        locks.release(fd, path)


def _private_state_dir(state_dir: Path) -> None:
    """The state dir holds keys, tokens and pod volumes: ours alone, 0700."""
    state_dir.mkdir(parents=True, exist_ok=True)
    st = state_dir.lstat()
    if st.st_uid != os.geteuid():
        raise DevClusterError(f"state dir {state_dir} belongs to uid {st.st_uid}, not to this user "
                              f"({os.geteuid()}): pick another with --state-dir")
    state_dir.chmod(0o700)


def up(state_dir: Path, config: ClusterConfig, log: Callable[[str], None] = print) -> Cluster:
    """Start every component that is not running and wait until each is healthy.

    A running cluster keeps its stored config (a differing request is reported);
    a half-running one (a component died) gets the missing components restarted.
    """
    state_dir = state_dir.expanduser().resolve()
    with _locked(state_dir):
        return _up(state_dir, config, log)


def _up(state_dir: Path, config: ClusterConfig, log: Callable[[str], None]) -> Cluster:
    if (state_dir / "cluster.json").exists():
        stored = ClusterConfig.load(state_dir)
        if (stored.nodes, stored.gpus_per_node, stored.port_base, stored.host_path_allow, stored.karpenter) != (
                config.nodes, config.gpus_per_node, config.port_base, config.host_path_allow, config.karpenter):
            log(f"note: the dev cluster in {state_dir} was created with --nodes {stored.nodes} "
                f"--gpus-per-node {stored.gpus_per_node} --port-base {stored.port_base} "
                f"--allow-host-path {list(stored.host_path_allow)}"
                f"{' --karpenter' if stored.karpenter else ' (no --karpenter)'}; keeping that "
                "(run `fleetserve dev-cluster down` first to change it)")
        config = stored
    cluster = Cluster(state_dir, config)
    components = active(cluster)
    running = {c.name for c in components if processes.is_running(state_dir, c.name)}
    if len(running) == len(components) and all(c.healthy(cluster) for c in components):
        log(f"dev cluster already running in {state_dir} ({cluster.server_url})")
        return cluster
    # Resolve every binary and check every port before starting anything, so a
    # missing tool or a busy port leaves no half-started cluster behind.
    argvs: dict[str, list[str]] = {}
    for comp in components:
        if comp.name in running:
            continue
        try:
            argvs[comp.name] = comp.argv(cluster)
        except tools.ToolMissingError as exc:
            raise DevClusterError(str(exc)) from None
        if comp.port is not None and not port_free(cluster.port(comp.port)):
            raise DevClusterError(
                f"port {cluster.port(comp.port)} on 127.0.0.1 (for {comp.name}) is in use by another process; "
                f"stop it, or run `fleetserve dev-cluster up --port-base N` to move the dev cluster's ports "
                f"(now {config.port_base}+offset)")
    _private_state_dir(state_dir)
    config.save(state_dir)
    _prepare(cluster)
    for comp in components:
        if comp.name in running:
            _wait_healthy(cluster, comp, processes.read_pid(processes.pid_file(state_dir, comp.name)) or 0, log)
            continue
        env = comp.env(cluster) if comp.env else None
        proc = processes.start(state_dir, comp.name, argvs[comp.name], env=env, cwd=state_dir)
        t0 = time.monotonic()
        _wait_healthy(cluster, comp, proc.pid, log)
        log(f"{comp.name:<24} pid {proc.pid:<8} healthy after {time.monotonic() - t0:.1f}s")
    log(f"dev cluster ready: {cluster.server_url}, kubeconfig {cluster.kubeconfig}")
    return cluster


def down(state_dir: Path, log: Callable[[str], None] = print) -> None:
    """Stop every process with a pid file in the state dir, then delete the state dir."""
    state_dir = state_dir.expanduser().resolve()
    with _locked(state_dir):
        _down(state_dir, log)


def _down(state_dir: Path, log: Callable[[str], None]) -> None:
    if not state_dir.exists():
        log(f"no dev cluster in {state_dir}")
        return
    order = {c.name: i for i, c in enumerate(COMPONENTS)}
    entries = processes.tracked(state_dir)
    # Stage by stage in reverse start order, processes of unknown components
    # (pods, helpers) first: the API server exits promptly only while etcd is up.
    stages: dict[int, list[processes.Tracked]] = {}
    for t in entries:
        stages.setdefault(order.get(t.name, len(order)), []).append(t)
    for rank in sorted(stages, reverse=True):
        live = [t for t in stages[rank] if t.alive()]
        t0 = time.monotonic()
        killed = processes.stop(stages[rank])
        for t in live:
            how = "with SIGKILL" if t.name in killed else f"in {time.monotonic() - t0:.1f}s"
            log(f"stopped {t.name} (pid {t.pid}) {how}")
    # A node agent that had to be killed could not remove its pod-network addresses from `lo`.
    _agent().remove_left_addresses(state_dir)
    from .realnodes import cleanup as real_nodes_cleanup  # containers, mounts, bridges, iptables chains

    real_nodes_cleanup(state_dir, log)
    shutil.rmtree(state_dir)
    log(f"removed {state_dir}")


@dataclass(frozen=True)
class ComponentStatus:
    name: str
    pid: int | None
    running: bool
    healthy: bool | None  # None: no probe for it (a process outside COMPONENTS)


def status(state_dir: Path) -> tuple[Cluster, list[ComponentStatus]]:
    state_dir = state_dir.expanduser().resolve()
    cluster = Cluster(state_dir, ClusterConfig.load(state_dir))
    known = {c.name: c for c in COMPONENTS}
    rows: list[ComponentStatus] = []
    seen = set()
    for comp in active(cluster):
        pid = processes.read_pid(processes.pid_file(state_dir, comp.name))
        running = processes.is_running(state_dir, comp.name)
        rows.append(ComponentStatus(comp.name, pid, running, running and comp.healthy(cluster)))
        seen.add(comp.name)
    for t in processes.tracked(state_dir):
        if t.name not in seen and t.name not in known:
            rows.append(ComponentStatus(t.name, t.pid, t.alive(), None))
    return cluster, rows


def is_up(state_dir: Path) -> bool:
    """True when the state dir has a running API server that answers /readyz with ok."""
    state_dir = state_dir.expanduser().resolve()
    try:
        cluster = Cluster(state_dir, ClusterConfig.load(state_dir))
    except DevClusterError:
        return False
    return processes.is_running(state_dir, "kube-apiserver") and apiserver_healthy(cluster)


def main_error(exc: Exception) -> int:
    print(f"fleetserve dev-cluster: error: {exc}", file=sys.stderr)
    return 1


from . import realnodes  # noqa: E402,F401  (registers the real nodes' components; enabled by --real-nodes)
