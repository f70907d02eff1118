"""Pure functions that turn a Pod (a JSON dict) into what the node agent runs.

Nothing here talks to the API server or starts a process, so all of it is
unit-tested on plain dicts: which containers can run locally and with which
argv, the environment (env, envFrom, downward API, `$(VAR)` expansion), the
pod's GPU request, and the per-node allocation of pod IPs and GPU ids.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

JsonObj = dict[str, Any]
GPU_RESOURCE = "nvidia.com/gpu"
NOT_RUNNABLE_REASON = "ImageNotRunnableLocally"
MAX_NODES = 16  # per dev cluster: each node owns one /24 of the agent's block of 16
NETWORK_BLOCKS = 32  # 198.18.0.0/15 = 32 blocks of 16 /24s

# lookup(kind, namespace, name) -> the object's string data, or None when it does not exist.
# kind is "configmap" or "secret"; a Secret's values come back already base64-decoded.
Lookup = Callable[[str, str, str], "dict[str, str] | None"]


class ContainerConfigError(Exception):
    """The container cannot be configured yet (e.g. a referenced ConfigMap is missing).

    Reported as the waiting reason `CreateContainerConfigError`, retried, as the kubelet does.
    """


def local_argv(container: JsonObj, fleetserve_bin: str) -> list[str] | None:
    """The argv to run for `container`, or None when it is not a fleetserve command.

    A container runs locally when its command (or, with no command, its args)
    starts with `fleetserve` (any path ending in /fleetserve too); that word is
    replaced by the project's own `fleetserve` executable.  With no command and
    an image whose name starts with `fleetserve` (its entrypoint is fleetserve),
    the args are fleetserve's args.
    """
    command = list(container.get("command") or [])
    args = list(container.get("args") or [])
    argv = command + args
    if argv and (argv[0] == "fleetserve" or argv[0].endswith("/fleetserve")):
        return [fleetserve_bin, *argv[1:]]
    image_name = str(container.get("image", "")).split("@")[0].rsplit("/", 1)[-1].split(":")[0]
    if not command and args and image_name.startswith("fleetserve"):
        return [fleetserve_bin, *args]
    return None


def rewrite_bind_host(argv: list[str], pod_ip: str) -> list[str]:
    """Make a `--host X` / `--host=X` argument bind the pod's own IP.

    Several replicas share one loopback interface, so `--host 0.0.0.0` would make
    the second replica's bind fail; in a real pod 0.0.0.0 means "the pod's IP".
    """
    out: list[str] = []
    skip_next = False
    for i, arg in enumerate(argv):
        if skip_next:
            skip_next = False
            continue
        if arg == "--host" and i + 1 < len(argv):
            out += ["--host", pod_ip]
            skip_next = True
        elif arg.startswith("--host="):
            out.append(f"--host={pod_ip}")
        else:
            out.append(arg)
    return out


_VAR = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.\-]*)\)")


def expand_vars(text: str, env: dict[str, str]) -> str:
    """Kubernetes `$(VAR)` expansion: known names are replaced, `$$` escapes, unknown stay as written."""

    def sub(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        name = m.group(1)
        return env.get(name, m.group(0))

    return _VAR.sub(sub, text)


@dataclass(frozen=True)
class PodNetwork:
    """The addresses the downward API and the env expose."""

    pod_ip: str
    host_ip: str
    node_name: str


def field_value(pod: JsonObj, path: str, net: PodNetwork) -> str:
    """A downward-API `fieldRef.fieldPath` of `pod`."""
    meta = pod.get("metadata", {})
    simple = {
        "metadata.name": meta.get("name", ""),
        "metadata.namespace": meta.get("namespace", ""),
        "metadata.uid": meta.get("uid", ""),
        "spec.nodeName": pod.get("spec", {}).get("nodeName", net.node_name),
        "spec.serviceAccountName": pod.get("spec", {}).get("serviceAccountName", "default"),
        "status.podIP": net.pod_ip,
        "status.podIPs": net.pod_ip,
        "status.hostIP": net.host_ip,
        "status.hostIPs": net.host_ip,
    }
    if path in simple:
        return str(simple[path])
    m = re.fullmatch(r"metadata\.(labels|annotations)\['([^']+)'\]", path)
    if m:
        return str(meta.get(m.group(1), {}).get(m.group(2), ""))
    if path in ("metadata.labels", "metadata.annotations"):
        items = meta.get(path.split(".")[1], {})
        return "\n".join(f'{k}="{v}"' for k, v in sorted(items.items()))
    raise ContainerConfigError(f"fieldRef.fieldPath {path!r} is not supported by the dev-cluster node agent")


def resource_value(container: JsonObj, ref: JsonObj) -> str:
    """A downward-API `resourceFieldRef` (limits, else requests, as a plain number string)."""
    resource = str(ref.get("resource", ""))
    kind, _, name = resource.partition(".")
    resources = container.get("resources", {})
    value = resources.get(kind, {}).get(name) or resources.get("requests", {}).get(name) or "0"
    return str(value)


def _key_ref(ref: JsonObj, kind: str, namespace: str, lookup: Lookup, what: str) -> str | None:
    data = lookup(kind, namespace, ref.get("name", ""))
    optional = bool(ref.get("optional", False))
    if data is None or ref.get("key") not in data:
        if optional:
            return None
        missing = f'{kind} "{ref.get("name")}"' if data is None else f'key {ref.get("key")!r} in {kind} "{ref.get("name")}"'
        raise ContainerConfigError(f"{what}: {missing} not found")
    return data[ref["key"]]


def resolve_env(pod: JsonObj, container: JsonObj, lookup: Lookup, net: PodNetwork,
                base: dict[str, str] | None = None) -> dict[str, str]:
    """The container's environment, in Kubernetes' order: `base`, then envFrom, then env.

    Later entries win; `$(VAR)` in an `env[].value` refers to variables defined before it.
    Raises ContainerConfigError for a missing, non-optional ConfigMap/Secret (or key).
    """
    namespace = pod["metadata"]["namespace"]
    env = dict(base or {})
    for source in container.get("envFrom") or []:
        prefix = source.get("prefix", "")
        for kind, key in (("configmap", "configMapRef"), ("secret", "secretRef")):
            if key not in source:
                continue
            ref = source[key]
            data = lookup(kind, namespace, ref.get("name", ""))
            if data is None:
                if ref.get("optional"):
                    continue
                raise ContainerConfigError(f'envFrom: {kind} "{ref.get("name")}" not found')
            env.update({prefix + k: v for k, v in data.items()})
    for var in container.get("env") or []:
        name = var["name"]
        if "value" in var or "valueFrom" not in var:
            env[name] = expand_vars(str(var.get("value", "")), env)
            continue
        source = var["valueFrom"]
        what = f"env {name}"
        value: str | None
        if "configMapKeyRef" in source:
            value = _key_ref(source["configMapKeyRef"], "configmap", namespace, lookup, what)
        elif "secretKeyRef" in source:
            value = _key_ref(source["secretKeyRef"], "secret", namespace, lookup, what)
        elif "fieldRef" in source:
            value = field_value(pod, source["fieldRef"].get("fieldPath", ""), net)
        elif "resourceFieldRef" in source:
            value = resource_value(container, source["resourceFieldRef"])
        else:
            raise ContainerConfigError(f"{what}: valueFrom {sorted(source)} is not supported")
        if value is not None:
            env[name] = value
    return env


def decode_secret(secret: JsonObj) -> dict[str, str]:
    """A Secret's `data` (base64) and `stringData` as text."""
    out = {k: base64.b64decode(v).decode("utf-8", "replace") for k, v in (secret.get("data") or {}).items()}
    out.update(secret.get("stringData") or {})
    return out


def gpu_request(pod: JsonObj) -> int:
    """GPUs a pod needs: the max of init containers and the sum of containers (limits, else requests)."""

    def one(c: JsonObj) -> int:
        res = c.get("resources", {})
        return int(res.get("limits", {}).get(GPU_RESOURCE) or res.get("requests", {}).get(GPU_RESOURCE) or 0)

    spec = pod.get("spec", {})
    regular = sum(one(c) for c in spec.get("containers", []))
    init = max((one(c) for c in spec.get("initContainers") or []), default=0)
    return max(regular, init)


@dataclass
class NodeAllocator:
    """Pod IPs and GPU ids of one node.

    Invariant: an IP or GPU id is held by at most one pod uid; it is released only
    once that pod's processes have exited.  Node `index` of network block `net`
    (0..31) owns the /24 198.(18 + net//16).(16*(net%16) + index).0: `.1` is the
    node's own address (hostIP), `.2`-`.254` are pod IPs.  Not 127.0.0.0/8: the
    API rejects loopback addresses in EndpointSlices.  198.18.0.0/15 is reserved
    for benchmarking (RFC 2544), so it shadows no real network.  Each running
    agent holds its own block (see agent.claim_network_block), so the pods of
    two dev clusters on one machine never collide.
    """

    index: int
    gpus: int
    net: int = 0
    ips: dict[str, str] = field(default_factory=dict)        # uid -> IP
    gpu_ids: dict[str, list[int]] = field(default_factory=dict)  # uid -> GPU indices

    @property
    def host_ip(self) -> str:
        return f"{self.prefix}1"

    @property
    def prefix(self) -> str:
        return f"198.{18 + self.net // 16}.{16 * (self.net % 16) + self.index}."

    def __post_init__(self) -> None:
        if not (0 <= self.index < MAX_NODES and 0 <= self.net < NETWORK_BLOCKS):
            raise ValueError(f"node index {self.index} / cluster block {self.net}: the dev cluster supports "
                             f"at most {MAX_NODES} nodes (use --nodes {MAX_NODES} or fewer)")

    def allocate_ip(self, uid: str, wanted: str | None = None) -> str:
        """The pod's IP: its current one if it has one, `wanted` if free, else the lowest free."""
        if uid in self.ips:
            return self.ips[uid]
        used = set(self.ips.values())
        prefix = self.prefix
        if wanted and wanted.startswith(prefix) and wanted not in used and wanted != self.host_ip:
            self.ips[uid] = wanted
            return wanted
        for last in range(2, 255):
            ip = prefix + str(last)
            if ip not in used:
                self.ips[uid] = ip
                return ip
        raise RuntimeError(f"node {self.index}: all 253 pod IPs are in use")

    def can_allocate_gpus(self, count: int) -> bool:
        return count <= self.gpus - sum(len(v) for v in self.gpu_ids.values())

    def allocate_gpus(self, uid: str, count: int) -> list[int]:
        """Reserve `count` GPU ids for `uid` (idempotent per uid); ValueError when too few are free."""
        if uid in self.gpu_ids:
            return self.gpu_ids[uid]
        if not self.can_allocate_gpus(count):
            raise ValueError(f"pod needs {count} {GPU_RESOURCE}, node has {self.gpus - sum(len(v) for v in self.gpu_ids.values())} free")
        taken = {g for ids in self.gpu_ids.values() for g in ids}
        self.gpu_ids[uid] = [g for g in range(self.gpus) if g not in taken][:count]
        return self.gpu_ids[uid]

    def free(self, uid: str) -> None:
        self.ips.pop(uid, None)
        self.gpu_ids.pop(uid, None)


def default_fleetserve_bin() -> str:
    """The `fleetserve` executable next to the running interpreter (the project's venv)."""
    import shutil
    import sys

    candidate = Path(sys.executable).parent / "fleetserve"
    if candidate.exists():
        return str(candidate)
    found = shutil.which("fleetserve")
    if not found:
        raise FileNotFoundError("no `fleetserve` executable next to the interpreter or on PATH: run `make install`")
    return found
