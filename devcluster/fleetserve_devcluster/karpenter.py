"""Karpenter in the dev cluster (`fleetserve dev-cluster up --karpenter`): real node autoscaling.

Karpenter's own ``kwok`` cloud provider (``sigs.k8s.io/karpenter/kwok``, built from the Go
module proxy by ``hack/karpenter/build.sh`` into ``<cache>/karpenter/<version>/``) runs as one
more dev-cluster component (pid, log, health on its ``/readyz``, stopped by ``down``). For a
Pending pod it creates a NodeClaim and, after the KWOKNodeClass's ``nodeRegistrationDelay``
(standing in for a GPU node's boot), a Node annotated ``kwok.x-k8s.io/node: fake``; the node
agent adopts that node (adopt.py: Ready, Lease, its pods really run) and, when Karpenter deletes
it, stops its pods with their grace periods before letting it go.

What ``start`` applies before it execs the binary (idempotent, on every (re)start):

* the release's CRDs (NodePool, NodeClaim, NodeOverlay, KWOKNodeClass, ...), from the module;
* KWOKNodeClass ``default`` with ``nodeRegistrationDelay`` = ``--node-provision-seconds``;
* NodePool ``gpu``: the GPU instance types of :data:`INSTANCE_TYPES`, ``limits.nodes`` =
  ``--max-gpu-nodes``, the taint ``nvidia.com/gpu:NoSchedule`` (GPU pods tolerate it through the
  API server's ExtendedResourceToleration admission plugin, as on GKE and AKS), and
  ``consolidationPolicy: WhenEmptyOrUnderutilized`` after :data:`CONSOLIDATE_AFTER`.

The component execs the binary from the launcher (``python -m fleetserve_devcluster.karpenter
start``), so its pid file names Karpenter itself.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

from . import tools
from .crdwait import wait_established

KARPENTER_VERSION = "v1.15.0"
BINARY = "karpenter-kwok"
NODE_POOL = "gpu"
NODE_CLASS = "default"
CONSOLIDATE_AFTER = "30s"
GPU_PRODUCT = "NVIDIA-H100-80GB-HBM3"
# 1- and 4-GPU instance types, CPU and memory like AWS p5-class GPU instances per GPU share.
INSTANCE_TYPES: list[dict[str, Any]] = [
    {"name": f"gpu-{n}x-h100", "gpus": n, "cpu": str(16 * n), "memory": f"{128 * n}Gi", "price": 4.0 * n}
    for n in (1, 4)
]


def home() -> Path:
    return tools.cache_dir() / "karpenter" / KARPENTER_VERSION


def binary_path() -> Path:
    return home() / "bin" / BINARY


def crds_dir() -> Path:
    return home() / "crds"


def installed() -> bool:
    return os.access(binary_path(), os.X_OK) and (crds_dir() / ".complete").exists()


def build_script() -> Path:
    """``hack/karpenter/build.sh`` of the source tree this package runs from."""
    return Path(__file__).resolve().parents[2] / "hack" / "karpenter" / "build.sh"


def build(log: Any = print) -> None:
    """Build the kwok provider from the Go module proxy unless cached (minutes when cold)."""
    if installed():
        return
    script = build_script()
    if not script.exists():
        raise tools.ToolMissingError(f"Karpenter {KARPENTER_VERSION} is not built ({binary_path()}) and "
                                     f"{script} is not here: run hack/karpenter/build.sh from a fleetserve checkout")
    log(f"building Karpenter {KARPENTER_VERSION}'s kwok provider from the Go module proxy (minutes on a cold cache)...")
    env = {**os.environ, "KARPENTER_VERSION": KARPENTER_VERSION, "FLEETSERVE_CACHE_DIR": str(tools.cache_dir())}
    proc = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True)
    if proc.returncode != 0 or not installed():
        raise tools.ToolMissingError(f"hack/karpenter/build.sh failed (exit {proc.returncode}):\n"
                                     f"{(proc.stdout + proc.stderr)[-3000:]}")


def instance_types_file() -> list[dict[str, Any]]:
    """The ``--instance-types-file-path`` content, in the offering format of upstream's
    ``kwok/cloudprovider/instance_types.json``."""
    out = []
    for it in INSTANCE_TYPES:
        offerings = [{"Price": it["price"] * (0.4 if cap == "spot" else 1.0), "Available": True, "Requirements": [
            {"key": "karpenter.sh/capacity-type", "operator": "In", "values": [cap]},
            {"key": "topology.kubernetes.io/zone", "operator": "In", "values": ["dev-zone-a"]}]}
            for cap in ("on-demand", "spot")]
        out.append({"name": it["name"], "offerings": offerings, "architecture": "amd64",
                    "operatingSystems": ["linux"],
                    "resources": {"cpu": it["cpu"], "memory": it["memory"], "pods": "110",
                                  "ephemeral-storage": "500Gi", "nvidia.com/gpu": str(it["gpus"])}})
    return out


def node_class(provision_s: float) -> dict[str, Any]:
    return {"apiVersion": "karpenter.kwok.sh/v1alpha1", "kind": "KWOKNodeClass", "metadata": {"name": NODE_CLASS},
            "spec": {"nodeRegistrationDelay": f"{max(0, round(provision_s))}s"}}


def node_pool(max_nodes: int) -> dict[str, Any]:
    return {"apiVersion": "karpenter.sh/v1", "kind": "NodePool", "metadata": {"name": NODE_POOL}, "spec": {
        "template": {
            "metadata": {"labels": {"nvidia.com/gpu.present": "true", "nvidia.com/gpu.product": GPU_PRODUCT,
                                    "fleetserve.io/node-pool": NODE_POOL}},
            "spec": {
                "nodeClassRef": {"group": "karpenter.kwok.sh", "kind": "KWOKNodeClass", "name": NODE_CLASS},
                "requirements": [
                    {"key": "node.kubernetes.io/instance-type", "operator": "In",
                     "values": [it["name"] for it in INSTANCE_TYPES]},
                    {"key": "karpenter.sh/capacity-type", "operator": "In", "values": ["on-demand"]}],
                "taints": [{"key": "nvidia.com/gpu", "effect": "NoSchedule"}],
                "expireAfter": "Never"}},
        "limits": {"nodes": str(max_nodes)},
        "disruption": {"consolidationPolicy": "WhenEmptyOrUnderutilized", "consolidateAfter": CONSOLIDATE_AFTER}}}


def env(state_dir: Path, metrics_port: int, health_port: int) -> dict[str, str]:
    return {**os.environ, "KUBECONFIG": str(state_dir / "kubeconfig"),
            "INSTANCE_TYPES_FILE_PATH": str(state_dir / "karpenter" / "instance-types.json"),
            "METRICS_PORT": str(metrics_port), "HEALTH_PROBE_PORT": str(health_port),
            "DISABLE_LEADER_ELECTION": "true", "LOG_LEVEL": "info"}


def healthy(health_port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{health_port}/readyz", timeout=2) as resp:
            return bool(resp.status == 200)
    except OSError:
        return False


def prepare(state_dir: Path, max_nodes: int, provision_s: float) -> None:
    """Write the instance types and apply the CRDs, the KWOKNodeClass and the NodePool."""
    kubectl = [str(tools.tool_path("kubectl")), f"--kubeconfig={state_dir / 'kubeconfig'}"]
    conf = state_dir / "karpenter"
    conf.mkdir(mode=0o700, exist_ok=True)
    (conf / "instance-types.json").write_text(json.dumps(instance_types_file(), indent=1) + "\n")

    def run(*args: str, stdin: str | None = None) -> None:
        proc = subprocess.run([*kubectl, *args], input=stdin, capture_output=True, text=True, timeout=120)
        if proc.returncode != 0:
            raise RuntimeError(f"kubectl {' '.join(args)}: {proc.stderr.strip()}")

    run("apply", "--server-side", "--force-conflicts", "-f", str(crds_dir()))
    wait_established(run, "crd/nodepools.karpenter.sh", "crd/nodeclaims.karpenter.sh",
                     "crd/kwoknodeclasses.karpenter.kwok.sh")
    objects = {"apiVersion": "v1", "kind": "List", "items": [node_class(provision_s), node_pool(max_nodes)]}
    run("apply", "--server-side", "--force-conflicts", "--field-manager=fleetserve-dev-cluster", "-f", "-",
        stdin=json.dumps(objects))


def _start(argv: list[str]) -> int:
    """``start STATE_DIR MAX_NODES PROVISION_S METRICS_PORT HEALTH_PORT``: prepare, then exec Karpenter."""
    state_dir, max_nodes, provision_s, metrics_port, health_port = (
        Path(argv[0]), int(argv[1]), float(argv[2]), int(argv[3]), int(argv[4]))
    prepare(state_dir, max_nodes, provision_s)
    os.execve(str(binary_path()), [str(binary_path())], env(state_dir, metrics_port, health_port))
    return 1  # not reached


if __name__ == "__main__":
    if len(sys.argv) == 7 and sys.argv[1] == "start":
        sys.exit(_start(sys.argv[2:]))
    print("usage: python -m fleetserve_devcluster.karpenter start STATE_DIR MAX_NODES PROVISION_S "
          "METRICS_PORT HEALTH_PORT", file=sys.stderr)
    sys.exit(2)
