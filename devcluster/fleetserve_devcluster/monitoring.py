"""Monitoring in the dev cluster (`fleetserve dev-cluster up --monitoring`): the Prometheus Operator
and a Prometheus with Kubernetes service discovery, both built from the Go module proxy.

Two more dev-cluster components (pid, log, health; stopped by ``down``):

``prometheus-operator``
    The Prometheus Operator (``cmd/operator`` of :data:`PROMETHEUS_OPERATOR_VERSION`, built by
    ``hack/prometheus-operator/build.sh``), watching the whole cluster as the ServiceAccount
    ``monitoring/prometheus-operator`` with the ClusterRole its module ships
    (``example/rbac/prometheus-operator``), through a kubeconfig holding that account's token.
    Before it execs the binary, ``start`` applies (idempotently): the module's CRDs
    (``hack/prometheus-operator-crds.sh``), namespace ``monitoring``, both ServiceAccounts and
    their RBAC, and the ``Prometheus`` object ``monitoring/fleet`` selecting every ServiceMonitor,
    PodMonitor and PrometheusRule in every namespace.

``prometheus``
    Upstream Prometheus (``cmd/prometheus`` of :data:`PROMETHEUS_GO_VERSION`, with Kubernetes
    discovery; ``hack/prometheus/build.sh``) on ``127.0.0.1:<port_base + 90>``, run by a small
    supervisor that does the kubelet's and the config reloader's part of the operator's
    StatefulSet: it reads the configuration the operator generates (Secret
    ``prometheus-fleet``, ``prometheus.yaml.gz``) and its rule ConfigMaps
    (``prometheus-fleet-rulefiles-*``), writes them to files, and reloads Prometheus
    (``/-/reload``) when they change.  Two rewrites make the pod's paths host paths: every
    ``kubernetes_sd_configs`` entry gets ``kubeconfig_file`` (the ServiceAccount
    ``monitoring/prometheus``'s token and the cluster CA: Prometheus discovers the fleet through
    the API server with the RBAC of the module's ``example/rbac/prometheus``, as in-cluster), and
    ``rule_files`` point at the written rule files.

Why Prometheus is a component and not the operator's StatefulSet pod: the node agent runs a
container only when its command is ``fleetserve`` and runs no initContainers (podworker.py); the
operator's pod is the ``prometheus`` image plus a ``prometheus-config-reloader`` init container and
sidecar.  The ``Prometheus`` object therefore has ``replicas: 0`` (the operator still generates
the configuration, its StatefulSet has no pod to fail).

Enabled per state dir by the file ``<state>/monitoring/enabled`` (``up --monitoring`` writes it);
importing this module registers both components with controlplane.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import json
import os
import re
import signal
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import yaml

from . import controlplane, tools
from .crdwait import wait_established

PROMETHEUS_OPERATOR_VERSION = "v0.85.0"
# Go module tag of Prometheus 3.16.0 (Prometheus tags its Go module v0.<3MM>.<P>).
PROMETHEUS_GO_VERSION = "v0.316.0"
NAMESPACE = "monitoring"
PROMETHEUS_NAME = "fleet"
# Offsets from --port-base (controlplane uses 180/181 and 257..443).
PROMETHEUS_PORT_OFFSET = 90
OPERATOR_PORT_OFFSET = 91
# The operator's config interval defaults are 30s; the dev cluster scrapes and evaluates faster so
# that an alert's `for:` dominates how long a test waits.
SCRAPE_INTERVAL = "5s"
EVALUATION_INTERVAL = "5s"
# What the operator's StatefulSet pod would substitute in the config ($(POD_NAME) etc.).
POD_ENV = {"POD_NAME": f"prometheus-{PROMETHEUS_NAME}-0", "SHARD": "0"}
POD_RULES_DIR = "/etc/prometheus/rules/"
TOKEN_SECONDS = 7 * 24 * 3600
SYNC_INTERVAL_S = 2.0


# ---------------------------------------------------------------- cached builds


def operator_home() -> Path:
    return tools.cache_dir() / "prometheus-operator" / PROMETHEUS_OPERATOR_VERSION


def operator_binary() -> Path:
    return operator_home() / "bin" / "prometheus-operator"


def rbac_dir() -> Path:
    return operator_home() / "rbac"


def crds_dir() -> Path:
    return tools.cache_dir() / "prometheus-operator-crds" / PROMETHEUS_OPERATOR_VERSION


def prometheus_binary() -> Path:
    return tools.cache_dir() / "prometheus-go" / PROMETHEUS_GO_VERSION / "bin" / "prometheus"


def installed() -> bool:
    return (os.access(operator_binary(), os.X_OK) and os.access(prometheus_binary(), os.X_OK)
            and (rbac_dir() / ".complete").exists() and (crds_dir() / ".complete").exists())


def _hack() -> Path:
    return Path(__file__).resolve().parents[2] / "hack"


def build(log: Any = print) -> None:
    """Build both binaries from the Go module proxy and take the CRDs unless cached (minutes when cold)."""
    if installed():
        return
    env = {**os.environ, "FLEETSERVE_CACHE_DIR": str(tools.cache_dir()),
           "PROMETHEUS_OPERATOR_VERSION": PROMETHEUS_OPERATOR_VERSION, "PROMETHEUS_GO_VERSION": PROMETHEUS_GO_VERSION}
    for script in ("prometheus-operator/build.sh", "prometheus/build.sh", "prometheus-operator-crds.sh"):
        path = _hack() / script
        if not path.exists():
            raise tools.ToolMissingError(f"monitoring is not built and {path} is not here: run hack/{script} "
                                         "from a fleetserve checkout")
        log(f"hack/{script}: building from the Go module proxy if not cached (minutes on a cold cache)...")
        proc = subprocess.run(["bash", str(path)], env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise tools.ToolMissingError(f"hack/{script} failed (exit {proc.returncode}):\n"
                                         f"{(proc.stdout + proc.stderr)[-3000:]}")
    if not installed():
        raise tools.ToolMissingError(f"monitoring: the builds ran but {operator_binary()}, {prometheus_binary()}, "
                                     f"{rbac_dir()} or {crds_dir()} is missing")


# ---------------------------------------------------------------- per-cluster state


def state(state_dir: Path) -> Path:
    return state_dir / "monitoring"


def enabled(state_dir: Path) -> bool:
    return (state(state_dir) / "enabled").exists()


def enable(state_dir: Path) -> None:
    """Mark the cluster in ``state_dir`` as one with monitoring (before ``up``)."""
    state(state_dir).mkdir(mode=0o700, parents=True, exist_ok=True)
    (state(state_dir) / "enabled").touch()


def prometheus_port(config: controlplane.ClusterConfig) -> int:
    return config.port_base + PROMETHEUS_PORT_OFFSET


def operator_port(config: controlplane.ClusterConfig) -> int:
    return config.port_base + OPERATOR_PORT_OFFSET


def prometheus_url(state_dir: Path) -> str:
    """The dev cluster's Prometheus (HTTP API at ``/api/v1``)."""
    return f"http://127.0.0.1:{prometheus_port(controlplane.ClusterConfig.load(state_dir))}"


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return bool(resp.status == 200)
    except OSError:
        return False


def prometheus_object() -> dict[str, Any]:
    everything: dict[str, Any] = {}
    return {"apiVersion": "monitoring.coreos.com/v1", "kind": "Prometheus",
            "metadata": {"name": PROMETHEUS_NAME, "namespace": NAMESPACE},
            "spec": {"replicas": 0, "serviceAccountName": "prometheus",
                     "scrapeInterval": SCRAPE_INTERVAL, "evaluationInterval": EVALUATION_INTERVAL,
                     "serviceMonitorSelector": everything, "serviceMonitorNamespaceSelector": everything,
                     "podMonitorSelector": everything, "podMonitorNamespaceSelector": everything,
                     "ruleSelector": everything, "ruleNamespaceSelector": everything}}


def _rbac_objects() -> list[dict[str, Any]]:
    """The module's ServiceAccounts, ClusterRoles and bindings, namespaced to :data:`NAMESPACE`."""
    out = []
    for path in sorted(rbac_dir().glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if not doc:
                continue
            if doc["kind"] == "ServiceAccount":
                doc["metadata"]["namespace"] = NAMESPACE
            for subject in doc.get("subjects") or []:
                if subject.get("kind") == "ServiceAccount":
                    subject["namespace"] = NAMESPACE
            out.append(doc)
    return out


class _Kubectl:
    def __init__(self, state_dir: Path) -> None:
        self.argv = [str(tools.tool_path("kubectl")), f"--kubeconfig={state_dir / 'kubeconfig'}"]

    def __call__(self, *args: str, stdin: str | None = None) -> str:
        proc = subprocess.run([*self.argv, *args], input=stdin, capture_output=True, text=True, timeout=120)
        if proc.returncode != 0:
            raise RuntimeError(f"kubectl {' '.join(args)}: {proc.stderr.strip()}")
        return proc.stdout

    def apply(self, objects: list[dict[str, Any]]) -> None:
        self("apply", "--server-side", "--force-conflicts", "--field-manager=fleetserve-dev-cluster", "-f", "-",
             stdin=json.dumps({"apiVersion": "v1", "kind": "List", "items": objects}))


def token_kubeconfig(state_dir: Path, service_account: str) -> Path:
    """A kubeconfig for ServiceAccount ``monitoring/<service_account>`` (a TokenRequest token, the cluster CA)."""
    kubectl = _Kubectl(state_dir)
    token = kubectl("create", "token", "-n", NAMESPACE, service_account, f"--duration={TOKEN_SECONDS}s").strip()
    cluster = controlplane.Cluster(state_dir, controlplane.ClusterConfig.load(state_dir))
    ca = base64.b64encode(cluster.pki.ca_crt.read_bytes()).decode()
    name = f"{NAMESPACE}-{service_account}"
    config = {"apiVersion": "v1", "kind": "Config",
              "clusters": [{"name": "dev", "cluster": {"server": cluster.server_url,
                                                       "certificate-authority-data": ca}}],
              "users": [{"name": name, "user": {"token": token}}],
              "contexts": [{"name": name, "context": {"cluster": "dev", "user": name, "namespace": NAMESPACE}}],
              "current-context": name}
    path = state(state_dir) / f"{service_account}.kubeconfig"
    _write(path, yaml.safe_dump(config, sort_keys=False))
    return path


def _write(path: Path, text: str) -> bool:
    """Write ``text`` atomically (0600); False when the file already held exactly that."""
    if path.exists() and path.read_text() == text:
        return False
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.chmod(0o600)
    tmp.replace(path)
    return True


def prepare(state_dir: Path) -> Path:
    """CRDs, namespace, RBAC and the Prometheus object; returns the operator's kubeconfig."""
    kubectl = _Kubectl(state_dir)
    kubectl("apply", "--server-side", "--force-conflicts", "-f", str(crds_dir()))
    wait_established(kubectl, "crd/prometheuses.monitoring.coreos.com", "crd/servicemonitors.monitoring.coreos.com",
                     "crd/prometheusrules.monitoring.coreos.com")
    kubectl.apply([{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}}])
    kubectl.apply(_rbac_objects())
    kubectl.apply([prometheus_object()])
    return token_kubeconfig(state_dir, "prometheus-operator")


def _start_operator(state_dir: Path, port: int) -> int:
    kubeconfig = prepare(state_dir)
    argv = [str(operator_binary()), f"--web.listen-address=127.0.0.1:{port}", "--log-level=info",
            f"--prometheus-instance-namespaces={NAMESPACE}", "--kubelet-endpoints=false"]
    os.execve(argv[0], argv, {**os.environ, "KUBECONFIG": str(kubeconfig)})
    return 1  # not reached


# ---------------------------------------------------------------- the Prometheus supervisor


def _admin_context(state_dir: Path) -> tuple[str, ssl.SSLContext]:
    """The node agent's view of Secrets and ConfigMaps (the kubelet reads them for the pod's volumes)."""
    cluster = controlplane.Cluster(state_dir, controlplane.ClusterConfig.load(state_dir))
    ctx = ssl.create_default_context(cafile=str(cluster.pki.ca_crt))
    ctx.load_cert_chain(str(cluster.pki.crt("admin")), str(cluster.pki.key("admin")))
    return cluster.server_url, ctx


def _get(server: str, ctx: ssl.SSLContext, path: str) -> dict[str, Any] | None:
    try:
        with urllib.request.urlopen(server + path, context=ctx, timeout=10) as resp:
            data: dict[str, Any] = json.load(resp)
            return data
    except urllib.error.HTTPError as exc:
        if exc.code == 404:
            return None
        raise


def rewrite_config(text: str, kubeconfig: Path, rules_dir: Path) -> str:
    """The operator's generated configuration with the pod's paths replaced by host paths."""
    text = re.sub(r"\$\(([A-Z_][A-Z0-9_]*)\)", lambda m: POD_ENV.get(m.group(1), m.group(0)), text)
    config = yaml.safe_load(text) or {}
    for job in config.get("scrape_configs") or []:
        for sd in job.get("kubernetes_sd_configs") or []:
            if "api_server" not in sd:  # in-cluster discovery -> the same API server, the same account
                sd["kubeconfig_file"] = str(kubeconfig)
    config["rule_files"] = [str(rules_dir / f[len(POD_RULES_DIR):]) if f.startswith(POD_RULES_DIR) else f
                            for f in config.get("rule_files") or []]
    return str(yaml.safe_dump(config, sort_keys=False))


def sync(state_dir: Path, server: str, ctx: ssl.SSLContext, kubeconfig: Path) -> bool | None:
    """Write the operator's current config and rule files; None while there is no config yet,
    else whether anything changed."""
    secret = _get(server, ctx, f"/api/v1/namespaces/{NAMESPACE}/secrets/prometheus-{PROMETHEUS_NAME}")
    blob = ((secret or {}).get("data") or {}).get("prometheus.yaml.gz")
    if not blob:
        return None
    rules_dir = state(state_dir) / "rules"
    changed = False
    cms = _get(server, ctx, f"/api/v1/namespaces/{NAMESPACE}/configmaps?labelSelector=prometheus-name%3D"
                            f"{PROMETHEUS_NAME}") or {}
    wanted: set[Path] = set()
    for cm in cms.get("items") or []:
        name = cm["metadata"]["name"]
        if not name.startswith(f"prometheus-{PROMETHEUS_NAME}-rulefiles-"):
            continue
        for key, value in (cm.get("data") or {}).items():
            path = rules_dir / name / key
            wanted.add(path)
            changed |= _write(path, value)
    if rules_dir.exists():
        for path in rules_dir.glob("*/*"):
            if path.is_file() and path not in wanted and not path.name.startswith("."):
                path.unlink()
                changed = True
    text = gzip.decompress(base64.b64decode(blob)).decode()
    changed |= _write(state(state_dir) / "prometheus.yaml", rewrite_config(text, kubeconfig, rules_dir))
    return changed


def _run_prometheus(state_dir: Path, port: int) -> int:
    server, ctx = _admin_context(state_dir)
    kubeconfig = token_kubeconfig(state_dir, "prometheus")
    deadline = time.monotonic() + 120
    while sync(state_dir, server, ctx, kubeconfig) is None:  # the operator has not written it yet
        if time.monotonic() > deadline:
            print(f"no Secret {NAMESPACE}/prometheus-{PROMETHEUS_NAME} from the Prometheus Operator after 120s",
                  file=sys.stderr)
            return 1
        time.sleep(1)
    argv = [str(prometheus_binary()), f"--config.file={state(state_dir) / 'prometheus.yaml'}",
            f"--storage.tsdb.path={state(state_dir) / 'data'}", "--storage.tsdb.retention.time=1d",
            f"--web.listen-address=127.0.0.1:{port}", "--web.enable-lifecycle"]
    child = subprocess.Popen(argv)

    def stop(signum: int, _frame: Any) -> None:
        child.send_signal(signum)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    last = hashlib.sha256(b"").hexdigest()
    while child.poll() is None:
        time.sleep(SYNC_INTERVAL_S)
        try:
            changed = sync(state_dir, server, ctx, kubeconfig)
        except (OSError, ValueError, yaml.YAMLError) as exc:
            print(f"sync: {exc}", file=sys.stderr, flush=True)
            continue
        if changed:
            digest = hashlib.sha256((state(state_dir) / "prometheus.yaml").read_bytes()).hexdigest()
            print(f"config or rules changed (config {digest[:12]}, was {last[:12]}): reloading", flush=True)
            last = digest
            try:
                urllib.request.urlopen(urllib.request.Request(f"http://127.0.0.1:{port}/-/reload", method="POST"),
                                       timeout=30).close()
            except OSError as exc:
                print(f"reload: {exc}", file=sys.stderr, flush=True)
    return child.returncode


# ---------------------------------------------------------------- components


def _operator_argv(c: controlplane.Cluster) -> list[str]:
    if not installed():
        raise tools.ToolMissingError(f"monitoring is not built ({operator_binary()}, {prometheus_binary()}); "
                                     "`fleetserve dev-cluster up --monitoring` builds it")
    return [sys.executable, "-m", "fleetserve_devcluster.monitoring", "operator", str(c.state_dir),
            str(operator_port(c.config))]


def _prometheus_argv(c: controlplane.Cluster) -> list[str]:
    _operator_argv(c)
    return [sys.executable, "-m", "fleetserve_devcluster.monitoring", "prometheus", str(c.state_dir),
            str(prometheus_port(c.config))]


controlplane.register(controlplane.Component(
    "prometheus-operator", _operator_argv, lambda c: _http_ok(f"http://127.0.0.1:{operator_port(c.config)}/healthz"),
    timeout_s=120, enabled=lambda c: enabled(c.state_dir)))
controlplane.register(controlplane.Component(
    "prometheus", _prometheus_argv, lambda c: _http_ok(f"http://127.0.0.1:{prometheus_port(c.config)}/-/ready"),
    timeout_s=180, enabled=lambda c: enabled(c.state_dir)))


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "operator":
        sys.exit(_start_operator(Path(sys.argv[2]), int(sys.argv[3])))
    if len(sys.argv) == 4 and sys.argv[1] == "prometheus":
        sys.exit(_run_prometheus(Path(sys.argv[2]), int(sys.argv[3])))
    print("usage: python -m fleetserve_devcluster.monitoring operator|prometheus STATE_DIR PORT", file=sys.stderr)
    sys.exit(2)
