"""Real nodes in the dev cluster (`fleetserve dev-cluster up --real-nodes N`): a kubelet with its own
containerd per node, and one kube-proxy, beside the node agent's nodes.

Everything comes from the tools cache (`make install`, hack/install-tools.sh): kubelet and kube-proxy
from the control plane's wrapper module (hack/k8s/build.sh), Debian's containerd, runc, CNI plugins and
iptables unpacked with `dpkg -x` (no daemon or service installed), and the static pause binary of
hack/realnode/pause.go, written into an OCI image here and imported into each node's containerd (no
registry is reachable).

Per node ``i`` (``<state>/real-nodes/real-<i>/``): ``containerd-real-<i>`` (its own root, state,
socket, runc root and CNI config; CRI with ``restrict_oom_score_adj``, since this sandbox forbids a
negative oom_score_adj) and ``kubelet-real-<i>`` (cgroupfs, cgroup v1 tolerated, no QoS cgroups; its
root dir, pod logs and volume-plugin dir under the node's directory). One ``kube-proxy`` (iptables
mode) serves the host's single network namespace. Each component is a small Python step that writes
the configuration and then execs the binary (same pid, so ``down`` stops it).

Addresses (never a private range; nothing leaves loopback or the namespaces made here): the real nodes
use the dev cluster's top pod-network block 198.19.240.0/20 (agents claim blocks from the bottom):
node ``i`` owns 198.19.(240+i).0/24 on the bridge ``fsreal<i>``, ``.1`` is the node IP (this kernel
has no dummy interfaces; a port-less bridge carries the address as well), pods get the rest and a
route to 198.18.0.0/15 only (no default route). The Service ClusterIP range moves to
198.19.255.0/24 when a cluster has real nodes (kube-proxy makes its addresses real targets); a
cluster without them keeps 10.0.0.0/24 exactly as before. The iptables chains and the bridges are
host-wide, so one cluster per machine may run real nodes (``<lock dir>/real-nodes.owner``).

``down`` (controlplane._down -> :func:`cleanup`) removes every piece: the containers (runc delete
--force under the node's own runc root) and their shims, every mount under the state dir, the
bridges, kube-proxy's and the kubelet's iptables chains (``kube-proxy --cleanup``, then any KUBE-/CNI-
chain left), the /var/log/containers links into the state dir and libcni's cached results.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from . import controlplane, locks, pki, tools

MAX_REAL_NODES = 4
NODE_PREFIX = "real-node-"
CLUSTER_CIDR = "198.19.240.0/20"
SERVICE_CIDR = "198.19.255.0/24"
POD_ROUTE = "198.18.0.0/15"  # the only route a real node's pod gets
# The API server's address in a cluster with real nodes: on `lo` (/32), a local address of the host, so
# a pod's packet to it (or to the `kubernetes` ClusterIP, DNATed here by kube-proxy) is delivered
# locally and needs no IPv4 forwarding, which stays off. Inside the real nodes' block, above their /24s.
API_ADDRESS = "198.19.254.1"
KUBERNETES_SERVICE_IP = "198.19.255.1"  # the first address of SERVICE_CIDR
PAUSE_IMAGE = "fleetserve.local/pause:1"
NODE_LABEL = "fleetserve.io/real-node"
OWNER_FILE = "real-nodes.owner"
IPTABLES_TABLES = ("filter", "nat", "mangle")


# ---------------------------------------------------------------- names, addresses, paths


def node_name(i: int) -> str:
    return f"{NODE_PREFIX}{i}"


def node_ip(i: int) -> str:
    return f"198.19.{240 + i}.1"


def pod_cidr(i: int) -> str:
    return f"198.19.{240 + i}.0/24"


def bridge(i: int) -> str:
    return f"fsreal{i}"


def api_address(config: Any) -> str:
    """Where the API server listens and what it advertises: API_ADDRESS with real nodes, else loopback."""
    return API_ADDRESS if getattr(config, "real_nodes", 0) else "127.0.0.1"


def apiserver_sans(config: Any) -> tuple[str, ...]:
    """The API server certificate's extra IP SANs: with real nodes, its address and the `kubernetes` ClusterIP."""
    return (API_ADDRESS, KUBERNETES_SERVICE_IP) if getattr(config, "real_nodes", 0) else ()


def service_cidr(config: Any) -> str:
    """The Service ClusterIP range of a cluster: 198.19.255.0/24 with real nodes, else pki.SERVICE_CIDR."""
    return SERVICE_CIDR if getattr(config, "real_nodes", 0) else pki.SERVICE_CIDR


def nodes_dir(state_dir: Path) -> Path:
    return state_dir / "real-nodes"


def node_dir(state_dir: Path, i: int) -> Path:
    return nodes_dir(state_dir) / f"real-{i}"


def socket_path(state_dir: Path, i: int) -> Path:
    return node_dir(state_dir, i) / "containerd.sock"


# Offsets 60..69 of the port base: no other component's (nor the neighbouring bases', steps of 100).
def kubelet_port(port_base: int, i: int) -> int:
    return port_base + 62 + 2 * i  # its healthz on the next port


def kube_proxy_port(port_base: int) -> int:
    return port_base + 60  # healthz; metrics on +61


def runtime_dir() -> Path:
    return tools.cache_dir() / "node-runtime" / tools.NODE_RUNTIME


def k8s_binary(name: str) -> Path:
    return tools.tool_dir("kubectl") / name


def installed() -> bool:
    return (runtime_dir() / ".complete").is_file() and all(
        os.access(k8s_binary(b), os.X_OK) for b in ("kubelet", "kube-proxy"))


def require_installed() -> None:
    if not installed():
        raise tools.ToolMissingError(
            f"the real nodes' tools are not installed (kubelet, kube-proxy in {tools.tool_dir('kubectl')}, "
            f"containerd/runc/CNI in {runtime_dir()}); run `make install` (or hack/install-tools.sh k8s node-runtime)")


def runtime_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{runtime_dir() / 'bin'}:{env.get('PATH', '/usr/sbin:/usr/bin:/sbin:/bin')}"
    return env


def _ctr(state_dir: Path, i: int, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(runtime_dir() / "bin" / "ctr"), "--address", str(socket_path(state_dir, i)),
                           "--namespace", "k8s.io", *args], capture_output=True, text=True, timeout=timeout)


def _run(*argv: str, check: bool = False) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(list(argv), capture_output=True, text=True, timeout=60, env=runtime_env())
    if check and done.returncode != 0:
        raise controlplane.DevClusterError(f"{' '.join(argv)} failed: {done.stderr.strip() or done.stdout.strip()}")
    return done


# ---------------------------------------------------------------- host-wide ownership


def _owner_path() -> Path:
    return locks.private_dir(locks.lock_dir()) / OWNER_FILE


# Host paths the kubelet, containerd's shims, libcni and iptables create outside any configurable
# directory. The first start records which of them existed; `down` removes the others (a directory
# only once empty, a file only among the known ones).
HOST_PATHS = ("/var/lib/kubelet", "/var/lib/kubelet/device-plugins", "/var/log/containers", "/var/lib/cni",
              "/var/lib/cni/results", "/run/containerd", "/run/containerd/s", "/run/xtables.lock")
CGROUP_PARENT = "k8s.io"  # containerd's cgroup parent for pods without one (the kubelet runs without QoS cgroups)
HOST_FILES = ("/var/lib/kubelet/device-plugins/kubelet.sock",
              "/var/lib/kubelet/device-plugins/kubelet_internal_checkpoint", "/run/xtables.lock")
PREEXISTING_FILE = "preexisting.json"


def claim_host(state_dir: Path) -> None:
    """Refuse when another live cluster on this machine runs real nodes (bridges, iptables are host-wide)."""
    path = _owner_path()
    with contextlib.suppress(FileNotFoundError):
        other = Path(path.read_text().strip())
        if other != state_dir and nodes_dir(other).is_dir():
            raise controlplane.DevClusterError(
                f"the dev cluster in {other} runs real nodes on this machine (bridges fsreal*, kube-proxy's "
                f"iptables chains are host-wide); `fleetserve dev-cluster down --state-dir {other}` first")
    path.write_text(f"{state_dir}\n")
    record = nodes_dir(state_dir) / PREEXISTING_FILE
    if not record.exists():
        cgroups = [str(p) for p in Path("/sys/fs/cgroup").glob(f"*/{CGROUP_PARENT}")]
        _write(record, json.dumps([p for p in HOST_PATHS if os.path.lexists(p)] + cgroups))


def prepare_host(state_dir: Path) -> None:
    """Before the API server starts: claim the host and put API_ADDRESS on `lo` (`down` removes it)."""
    claim_host(state_dir)
    _run("ip", "addr", "replace", f"{API_ADDRESS}/32", "dev", "lo", check=True)


def _api_address_present() -> bool:
    return f" {API_ADDRESS}/" in _run("ip", "-o", "-4", "addr", "show", "dev", "lo").stdout


def _owns_host(state_dir: Path) -> bool:
    try:
        return Path(_owner_path().read_text().strip()) == state_dir
    except FileNotFoundError:
        return False


# ---------------------------------------------------------------- OCI images without a registry


def oci_archive(name: str, files: dict[str, tuple[bytes, int]], entrypoint: list[str],
                user: str | None = None) -> bytes:
    """An OCI image layout as a tar (what `ctr images import` reads): one layer holding `files`
    (path -> (content, mode)), named `name` through the io.containerd.image.name annotation."""
    layer_buf = io.BytesIO()
    with tarfile.open(fileobj=layer_buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        dirs = sorted({str(Path(p).parent) for p in files} - {"."})
        for d in ["tmp", *dirs]:
            info = tarfile.TarInfo(d)
            info.type, info.mode = tarfile.DIRTYPE, 0o1777 if d == "tmp" else 0o755
            tar.addfile(info)
        for path, (content, mode) in sorted(files.items()):
            info = tarfile.TarInfo(path.lstrip("/"))
            info.size, info.mode = len(content), mode
            tar.addfile(info, io.BytesIO(content))
    layer = layer_buf.getvalue()
    layer_digest = "sha256:" + hashlib.sha256(layer).hexdigest()
    config = json.dumps({
        "architecture": "amd64", "os": "linux",
        "config": {"Entrypoint": entrypoint, **({"User": user} if user else {})},
        "rootfs": {"type": "layers", "diff_ids": [layer_digest]},
    }, sort_keys=True).encode()
    config_digest = "sha256:" + hashlib.sha256(config).hexdigest()
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest,
                   "size": len(config)},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": layer_digest,
                    "size": len(layer)}],
    }, sort_keys=True).encode()
    manifest_digest = "sha256:" + hashlib.sha256(manifest).hexdigest()
    index = json.dumps({"schemaVersion": 2, "manifests": [{
        "mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": manifest_digest,
        "size": len(manifest), "platform": {"architecture": "amd64", "os": "linux"},
        "annotations": {"io.containerd.image.name": name,
                        "org.opencontainers.image.ref.name": name.rsplit(":", 1)[-1]}}]}).encode()
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tar:
        def add(path: str, data: bytes) -> None:
            info = tarfile.TarInfo(path)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        add("oci-layout", b'{"imageLayoutVersion":"1.0.0"}')
        add("index.json", index)
        for digest, data in ((layer_digest, layer), (config_digest, config), (manifest_digest, manifest)):
            add(f"blobs/sha256/{digest.split(':', 1)[1]}", data)
    return out.getvalue()


def import_image(state_dir: Path, i: int, archive: bytes, name: str) -> None:
    """Import an OCI archive into real node `i`'s containerd (namespace k8s.io, the CRI's), unpacked."""
    path = node_dir(state_dir, i) / "import.tar"
    path.write_bytes(archive)
    try:
        done = _ctr(state_dir, i, "images", "import", "--snapshotter", "overlayfs", str(path))
        if done.returncode != 0:
            raise controlplane.DevClusterError(f"importing {name} into {node_name(i)}: {done.stderr.strip()}")
    finally:
        path.unlink(missing_ok=True)


def import_archive(state_dir: Path, archive: Path) -> list[str]:
    """Import an OCI archive (e.g. `make images`' out/<name>.tar) into every real node of the cluster.
    Returns the image names it holds (the archive's io.containerd.image.name / ref.name annotations)."""
    config = controlplane.ClusterConfig.load(state_dir)
    with tarfile.open(archive) as tar:
        member = tar.extractfile("index.json")
        index = json.loads(member.read()) if member else {}
    names = [m.get("annotations", {}).get("org.opencontainers.image.ref.name", "") for m in index.get("manifests", [])]
    for i in range(config.real_nodes):
        done = _ctr(state_dir, i, "images", "import", "--snapshotter", "overlayfs", str(archive.resolve()),
                    timeout=600)
        if done.returncode != 0:
            raise controlplane.DevClusterError(f"importing {archive} into {node_name(i)}: {done.stderr.strip()}")
    return names


def has_image(state_dir: Path, i: int, name: str) -> bool:
    done = _ctr(state_dir, i, "images", "ls", "-q", f"name=={name}")
    return done.returncode == 0 and name in done.stdout.split()


def binary_image(name: str, binary: Path, args: list[str] | None = None, user: str | None = None) -> bytes:
    """An image whose only file is the static `binary` at /<its name>, its entrypoint."""
    target = f"/{binary.name}"
    return oci_archive(name, {target: (binary.read_bytes(), 0o755)}, [target, *(args or [])], user)


# ---------------------------------------------------------------- configuration files


def containerd_config(state_dir: Path, i: int) -> str:
    d, rt = node_dir(state_dir, i), runtime_dir()
    cri = 'plugins."io.containerd.grpc.v1.cri"'
    return f"""version = 2
root = "{d / 'containerd' / 'root'}"
state = "{d / 'containerd' / 'state'}"
disabled_plugins = ["io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs",
                    "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.aufs",
                    "io.containerd.tracing.processor.v1.otlp", "io.containerd.internal.v1.tracing"]

[grpc]
  address = "{socket_path(state_dir, i)}"
[ttrpc]
  address = "{socket_path(state_dir, i)}.ttrpc"
[debug]
  address = ""
[metrics]
  address = ""

[plugins."io.containerd.internal.v1.opt"]
  path = "{d / 'containerd' / 'opt'}"
[{cri}]
  sandbox_image = "{PAUSE_IMAGE}"
  restrict_oom_score_adj = true
  netns_mounts_under_state_dir = true
  disable_apparmor = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  [{cri}.containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [{cri}.containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [{cri}.containerd.runtimes.runc.options]
        BinaryName = "{rt / 'bin' / 'runc'}"
        Root = "{d / 'runc'}"
        SystemdCgroup = false
  [{cri}.cni]
    bin_dir = "{rt / 'root' / 'usr' / 'lib' / 'cni'}"
    conf_dir = "{d / 'cni' / 'net.d'}"
"""


def cni_conflist(state_dir: Path, i: int) -> dict[str, Any]:
    return {
        "cniVersion": "1.0.0", "name": f"fleetserve-real-{i}",
        "plugins": [
            {"type": "bridge", "bridge": bridge(i), "isGateway": True, "ipMasq": False, "hairpinMode": True,
             "ipam": {"type": "host-local", "ranges": [[{"subnet": pod_cidr(i), "gateway": node_ip(i)}]],
                      "routes": [{"dst": POD_ROUTE}], "dataDir": str(node_dir(state_dir, i) / "cni" / "ipam")}},
            {"type": "portmap", "capabilities": {"portMappings": True}},
        ],
    }


def kubelet_config(state_dir: Path, i: int, port_base: int) -> dict[str, Any]:
    d = node_dir(state_dir, i)
    return {
        "apiVersion": "kubelet.config.k8s.io/v1beta1", "kind": "KubeletConfiguration",
        "address": node_ip(i), "port": kubelet_port(port_base, i), "readOnlyPort": 0,
        "healthzBindAddress": "127.0.0.1", "healthzPort": kubelet_port(port_base, i) + 1,
        "authentication": {"anonymous": {"enabled": False}, "webhook": {"enabled": True},
                           "x509": {"clientCAFile": str(state_dir / "pki" / "ca.crt")}},
        "authorization": {"mode": "Webhook"},
        "tlsCertFile": "", "tlsPrivateKeyFile": "",
        # What this machine needs (issue 21): cgroup v1 with cgroupfs, no QoS cgroups, no swap check.
        "cgroupDriver": "cgroupfs", "failCgroupV1": False, "cgroupsPerQOS": False, "enforceNodeAllocatable": [],
        "failSwapOn": False,
        "containerRuntimeEndpoint": f"unix://{socket_path(state_dir, i)}",
        "podLogsDir": str(d / "pod-logs"), "volumePluginDir": str(d / "volume-plugins"),
        "resolvConf": str(d / "resolv.conf"), "clusterDomain": "cluster.local",
        "staticPodPath": "", "registerNode": True, "serializeImagePulls": False,
        # A shared dev machine: evict only when it is really full.
        "evictionHard": {"memory.available": "100Mi", "nodefs.available": "1%", "nodefs.inodesFree": "1%",
                         "imagefs.available": "1%"},
        "imageGCHighThresholdPercent": 100, "imageGCLowThresholdPercent": 99,
        "nodeStatusUpdateFrequency": "5s", "syncFrequency": "10s",
    }


def kube_proxy_config(state_dir: Path, real_nodes: int, port_base: int) -> dict[str, Any]:
    port = kube_proxy_port(port_base)
    return {
        "apiVersion": "kubeproxy.config.k8s.io/v1alpha1", "kind": "KubeProxyConfiguration",
        "clientConnection": {"kubeconfig": str(nodes_dir(state_dir) / "kube-proxy.kubeconfig")},
        "mode": "iptables", "hostnameOverride": node_name(0), "clusterCIDR": CLUSTER_CIDR,
        "bindAddress": "127.0.0.1",
        "healthzBindAddress": f"127.0.0.1:{port}", "metricsBindAddress": f"127.0.0.1:{port + 1}",
        # NodePorts only on the real nodes' own addresses, never on loopback or the machine's uplink.
        "nodePortAddresses": [f"{node_ip(i)}/32" for i in range(real_nodes)],
        # Pod -> ClusterIP -> pod on the same bridge comes back through the host (no br_netfilter).
        "iptables": {"masqueradeAll": True, "syncPeriod": "10s", "minSyncPeriod": "1s",
                     "localhostNodePorts": False},
        # 0: leave the host's conntrack sysctls as they are.
        "conntrack": {"maxPerCore": 0, "min": 0, "tcpEstablishedTimeout": "0s", "tcpCloseWaitTimeout": "0s"},
    }


def _write(path: Path, text: str, mode: int = 0o600) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.chmod(mode)
    tmp.replace(path)


def _client_kubeconfig(state_dir: Path, stem: str, subject: str, path: Path) -> None:
    paths = pki.PKIPaths(state_dir / "pki")
    pki._new_leaf(paths, stem, subject, "clientAuth")
    cluster = controlplane.Cluster(state_dir, controlplane.ClusterConfig.load(state_dir))
    pki.write_kubeconfig(path, cluster.server_url, paths, stem)


# ---------------------------------------------------------------- the host network of a node


def ensure_bridge(i: int) -> None:
    """The node's bridge with the node IP (the CNI bridge plugin adds its pods' veths to it)."""
    if _run("ip", "link", "show", bridge(i)).returncode != 0:
        _run("ip", "link", "add", bridge(i), "type", "bridge", check=True)
    _run("ip", "addr", "replace", f"{node_ip(i)}/24", "dev", bridge(i), check=True)
    _run("ip", "link", "set", bridge(i), "up", check=True)
    if i == 0:
        # ClusterIPs without a kube-proxy rule (yet) go to this port-less bridge, never to the uplink.
        _run("ip", "route", "replace", SERVICE_CIDR, "dev", bridge(0), check=True)


# ---------------------------------------------------------------- the components' start steps (then exec)


def start_containerd(state_dir: Path, i: int) -> None:
    require_installed()
    claim_host(state_dir)
    d = node_dir(state_dir, i)
    for sub in ("containerd", "cni/net.d", "cni/ipam", "runc"):
        (d / sub).mkdir(parents=True, exist_ok=True)
    d.chmod(0o700)
    ensure_bridge(i)
    _write(d / "containerd.toml", containerd_config(state_dir, i))
    _write(d / "cni" / "net.d" / "10-fleetserve.conflist", json.dumps(cni_conflist(state_dir, i), indent=1), 0o644)
    socket_path(state_dir, i).unlink(missing_ok=True)
    exe = runtime_dir() / "bin" / "containerd"
    os.execve(exe, [str(exe), "--config", str(d / "containerd.toml")], runtime_env())


def _allow_apiserver_to_kubelets(state_dir: Path) -> None:
    """`kubectl logs/exec` reach a kubelet as the API server's client identity; the kubelet asks the
    API server (webhook authorization) whether it may: bind it to system:kubelet-api-admin, as kubeadm does."""
    from .kube import Kube, KubeError

    kube = Kube.from_kubeconfig(state_dir / "kubeconfig")
    try:
        kube.create("/apis/rbac.authorization.k8s.io/v1/clusterrolebindings", {
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
            "metadata": {"name": "fleetserve:apiserver-kubelet-client"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                        "name": "system:kubelet-api-admin"},
            "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User",
                          "name": "kube-apiserver-kubelet-client"}]})
    except KubeError as exc:
        if exc.status != 409:
            raise controlplane.DevClusterError(f"cannot bind the API server's kubelet client: {exc}") from None


def start_kubelet(state_dir: Path, i: int) -> None:
    require_installed()
    config = controlplane.ClusterConfig.load(state_dir)
    _allow_apiserver_to_kubelets(state_dir)
    d = node_dir(state_dir, i)
    if not has_image(state_dir, i, PAUSE_IMAGE):
        import_image(state_dir, i, binary_image(PAUSE_IMAGE, runtime_dir() / "images" / "pause"), PAUSE_IMAGE)
    _client_kubeconfig(state_dir, f"kubelet-{node_name(i)}", f"/O=system:nodes/CN=system:node:{node_name(i)}",
                       d / "kubelet.kubeconfig")
    _write(d / "resolv.conf", "# the real nodes' pods resolve no names outside the cluster\n", 0o644)
    _write(d / "kubelet.yaml", json.dumps(kubelet_config(state_dir, i, config.port_base), indent=1))
    exe = k8s_binary("kubelet")
    os.execve(exe, [str(exe), f"--config={d / 'kubelet.yaml'}", f"--kubeconfig={d / 'kubelet.kubeconfig'}",
                    f"--root-dir={d / 'kubelet'}", f"--cert-dir={d / 'kubelet-pki'}",
                    f"--hostname-override={node_name(i)}", f"--node-ip={node_ip(i)}",
                    f"--node-labels={NODE_LABEL}=true", "--v=1"], runtime_env())


def start_kube_proxy(state_dir: Path) -> None:
    require_installed()
    config = controlplane.ClusterConfig.load(state_dir)
    d = nodes_dir(state_dir)
    _client_kubeconfig(state_dir, "kube-proxy", "/CN=system:kube-proxy", d / "kube-proxy.kubeconfig")
    _write(d / "kube-proxy.yaml", json.dumps(kube_proxy_config(state_dir, config.real_nodes, config.port_base)))
    exe = k8s_binary("kube-proxy")
    os.execve(exe, [str(exe), f"--config={d / 'kube-proxy.yaml'}", "--v=1"], runtime_env())


# ---------------------------------------------------------------- health


def containerd_healthy(c: controlplane.Cluster, i: int) -> bool:
    try:
        return _ctr(c.state_dir, i, "version", timeout=5).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def kubelet_healthy(c: controlplane.Cluster, i: int) -> bool:
    """The node is Ready, and advertises nvidia.com/gpu (patched into its status here when missing)."""
    from .kube import Kube, KubeError

    try:
        kube = Kube.from_kubeconfig(c.kubeconfig)
        node = kube.get_or_none(f"/api/v1/nodes/{node_name(i)}")
        if node is None:
            return False
        status = node.get("status", {})
        gpus = str(c.config.gpus_per_node)
        if status.get("capacity", {}).get("nvidia.com/gpu") != gpus:
            kube.patch(f"/api/v1/nodes/{node_name(i)}/status",
                       {"status": {"capacity": {"nvidia.com/gpu": gpus}, "allocatable": {"nvidia.com/gpu": gpus}}})
            return False
        return any(cond.get("type") == "Ready" and cond.get("status") == "True"
                   for cond in status.get("conditions", []))
    except (OSError, KubeError, ValueError):
        return False


def kube_proxy_healthy(c: controlplane.Cluster) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{kube_proxy_port(c.config.port_base)}/livez", timeout=3) as r:
            return bool(r.status == 200)
    except OSError:
        return False


def _argv(kind: str, i: int | None = None) -> Any:
    def argv(c: controlplane.Cluster) -> list[str]:
        require_installed()
        return [sys.executable, "-m", "fleetserve_devcluster.realnodes", kind, str(c.state_dir),
                *([] if i is None else [str(i)])]
    return argv


def _register() -> None:
    for i in range(MAX_REAL_NODES):
        def on(c: controlplane.Cluster, i: int = i) -> bool:
            return getattr(c.config, "real_nodes", 0) > i
        controlplane.register(controlplane.Component(
            f"containerd-real-{i}", _argv("containerd", i), lambda c, i=i: containerd_healthy(c, i),
            timeout_s=60, enabled=on))
        controlplane.register(controlplane.Component(
            f"kubelet-real-{i}", _argv("kubelet", i), lambda c, i=i: kubelet_healthy(c, i),
            timeout_s=120, enabled=on))
    controlplane.register(controlplane.Component(
        "kube-proxy", _argv("kube-proxy"), kube_proxy_healthy, timeout_s=60,
        enabled=lambda c: getattr(c.config, "real_nodes", 0) > 0))


_register()


# ---------------------------------------------------------------- cleanup (down)


def _mounts_under(prefix: Path) -> list[str]:
    """Mount points at or under `prefix` in this mount namespace, deepest last."""
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            point = line.split()[4].encode().decode("unicode_escape")
            if point == str(prefix) or point.startswith(f"{prefix}/"):
                out.append(point)
    return out


def _processes_mentioning(text: str) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmdline:
            pids.append(int(entry))
    return pids


def _iptables_chains(table: str) -> list[str]:
    done = _run(str(runtime_dir() / "bin" / "iptables"), "-t", table, "-S")
    return [line.split()[1] for line in done.stdout.splitlines() if line.startswith("-N ")]


def host_traces(state_dir: Path) -> set[str]:
    """What real nodes leave on the machine, outside the tools cache: mounts under the state dir, its
    processes, the bridges, KUBE-/CNI- iptables chains, the fixed host paths (HOST_PATHS), shim sockets,
    libcni results, /var/log/containers entries and containerd's cgroups. Equal before `up` and after
    `down` when nothing was left behind (tests compare the two)."""
    traces = {f"mount {m}" for m in _mounts_under(state_dir)}
    traces |= {f"process {p}" for p in _processes_mentioning(str(nodes_dir(state_dir)))}
    links = _run("ip", "-o", "link", "show").stdout.splitlines()
    traces |= {f"interface {line.split(':')[1].strip()}" for line in links
               if line.split(":")[1].strip().startswith("fsreal")}
    if (runtime_dir() / ".complete").exists():
        for table in IPTABLES_TABLES:
            traces |= {f"iptables -t {table} chain {ch}" for ch in _iptables_chains(table)
                       if ch.startswith(("KUBE-", "CNI-"))}
    traces |= {f"path {p}" for p in HOST_PATHS if os.path.lexists(p)}
    if _api_address_present():
        traces.add(f"address {API_ADDRESS} on lo")
    for d in ("/run/containerd/s", "/var/lib/cni/results", "/var/log/containers"):
        if os.path.isdir(d):
            traces |= {f"path {d}/{name}" for name in os.listdir(d)}
    for parent in Path("/sys/fs/cgroup").glob(f"*/{CGROUP_PARENT}"):
        traces |= {f"cgroup {p}" for p in [parent, *parent.glob("*")] if p.is_dir()}
    return traces


def cleanup(state_dir: Path, log: Any = print) -> None:
    """After `down` stopped the components: remove every other trace of the real nodes."""
    root = nodes_dir(state_dir)
    if not root.exists():
        return
    runc = str(runtime_dir() / "bin" / "runc")
    containers: list[tuple[Path, str]] = []  # (node dir, container id)
    for d in sorted(root.glob("real-*")):
        ids = {p.name for p in (d / "containerd" / "state" / "io.containerd.runtime.v2.task" / "k8s.io").glob("*")}
        for runc_root in sorted(p for p in (d / "runc").glob("*") if p.is_dir()):
            listing = _run(runc, "--root", str(runc_root), "list", "-q")
            for cid in listing.stdout.split():
                _run(runc, "--root", str(runc_root), "delete", "--force", cid)
                log(f"removed container {cid[:12]} of {d.name}")
                ids.add(cid)
        containers += [(d, cid) for cid in sorted(ids)]
    # The shims (containerd-shim-runc-v2 -address <node>/containerd.sock ...) outlive containerd.
    pids = _processes_mentioning(str(root))
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while pids and time.monotonic() < deadline:
        pids = [p for p in pids if Path(f"/proc/{p}").exists() and "Z" not in _proc_state(p)]
        time.sleep(0.1)
    for d, cid in containers:
        # What a killed shim and a sandbox without CNI DEL leave outside the state dir: the shim's
        # socket (containerd's runtime/v2/shim.SocketAddress), libcni's cached results, the cgroups.
        key = hashlib.sha256(f"{d / 'containerd.sock'}/k8s.io/{cid}".encode()).hexdigest()
        Path(f"/run/containerd/s/{key}").unlink(missing_ok=True)
        for f in Path("/var/lib/cni/results").glob(f"*-{cid}-*"):
            f.unlink(missing_ok=True)
        for cg in Path("/sys/fs/cgroup").glob(f"*/k8s.io/{cid}"):
            with contextlib.suppress(OSError):
                cg.rmdir()
    for _ in range(3):  # nested mounts: deepest first, then what became unmountable
        for point in reversed(_mounts_under(state_dir)):
            if _run("umount", point).returncode != 0:
                _run("umount", "-l", point)
    if _owns_host(state_dir):
        if _api_address_present():
            _run("ip", "addr", "del", f"{API_ADDRESS}/32", "dev", "lo")
            log(f"removed address {API_ADDRESS} from lo")
        for i in range(MAX_REAL_NODES):
            if _run("ip", "link", "show", bridge(i)).returncode == 0:
                _run("ip", "link", "del", bridge(i))
                log(f"removed interface {bridge(i)}")
        if installed():
            _run(str(k8s_binary("kube-proxy")), "--cleanup", "--v=0")
        if (runtime_dir() / ".complete").exists():
            _remove_chains()
        _remove_host_paths(state_dir)
        with contextlib.suppress(FileNotFoundError):
            _owner_path().unlink()


def _remove_host_paths(state_dir: Path) -> None:
    links = Path("/var/log/containers")
    if links.is_dir():
        for link in links.iterdir():
            with contextlib.suppress(OSError):
                if link.is_symlink() and os.readlink(link).startswith(f"{state_dir}/"):
                    link.unlink()
    results = Path("/var/lib/cni/results")
    if results.is_dir():
        for f in results.glob("fleetserve-real-*"):
            f.unlink(missing_ok=True)
    for f in Path("/var/lib/cni/networks").glob("fleetserve-real-*") if Path("/var/lib/cni/networks").is_dir() else []:
        subprocess.run(["rm", "-rf", str(f)], check=False)
    try:
        before = set(json.loads((nodes_dir(state_dir) / PREEXISTING_FILE).read_text()))
    except (OSError, ValueError):
        return
    for f in HOST_FILES:
        # Ours: a recorded path that was not there before, or a file in a directory that was not.
        ours = f not in before if f in HOST_PATHS else str(Path(f).parent) not in before
        if ours:
            with contextlib.suppress(OSError):
                os.unlink(f)
    cgroups = [str(p) for p in Path("/sys/fs/cgroup").glob(f"*/{CGROUP_PARENT}")]
    for d in sorted((p for p in [*HOST_PATHS, *cgroups] if p not in before and p not in HOST_FILES),
                    key=len, reverse=True):
        with contextlib.suppress(OSError):
            os.rmdir(d)


def _proc_state(pid: int) -> str:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return "Z"
    return stat[stat.rindex(")") + 2:].split()[0]


def _remove_chains() -> None:
    """KUBE-* and CNI-* chains left after kube-proxy --cleanup (the kubelet's canaries, portmap's)."""
    ipt = str(runtime_dir() / "bin" / "iptables")
    for table in IPTABLES_TABLES:
        ours = [ch for ch in _iptables_chains(table) if ch.startswith(("KUBE-", "CNI-"))]
        if not ours:
            continue
        rules = _run(ipt, "-t", table, "-S").stdout.splitlines()
        for rule in rules:  # jumps into our chains from the built-in ones
            parts = rule.split()
            if parts[:1] == ["-A"] and "-j" in parts and parts[parts.index("-j") + 1] in ours \
                    and parts[1] not in ours:
                _run(ipt, "-t", table, "-D", *parts[1:])
        for ch in ours:
            _run(ipt, "-t", table, "-F", ch)
        for ch in ours:
            _run(ipt, "-t", table, "-X", ch)


def main(argv: list[str]) -> int:
    kind, state = argv[0], Path(argv[1]).resolve()
    try:
        if kind == "containerd":
            start_containerd(state, int(argv[2]))
        elif kind == "kubelet":
            start_kubelet(state, int(argv[2]))
        elif kind == "kube-proxy":
            start_kube_proxy(state)
        elif kind == "import":
            for archive in argv[2:]:
                print(f"imported {', '.join(import_archive(state, Path(archive)))} from {archive} into "
                      f"{controlplane.ClusterConfig.load(state).real_nodes} real node(s)")
            return 0
        elif kind == "traces":
            for item in sorted(host_traces(state)):
                print(item)
            return 0
        else:
            print("usage: python -m fleetserve_devcluster.realnodes containerd|kubelet STATE I | kube-proxy STATE",
                  file=sys.stderr)
            return 2
    except (controlplane.DevClusterError, tools.ToolMissingError, OSError) as exc:
        print(f"fleetserve dev-cluster real nodes: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
