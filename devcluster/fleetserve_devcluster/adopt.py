"""Adopting the GPU nodes a cluster autoscaler creates: the node agent as their kubelet.

The Cluster Autoscaler's ``kwok`` cloud provider (and a test standing in for it)
scales a node group up by creating bare ``Node`` objects annotated
``kwok.x-k8s.io/node: fake``. On a real cluster a VM boots and its kubelet
registers; here the node agent adopts the object instead:

1. **seen** — it adds its finalizer (so a deletion waits for its pods to stop)
   and the ``node.kubernetes.io/not-ready:NoSchedule`` taint a registering
   kubelet carries, and reports ``Ready=False`` (reason ``NodeProvisioning``)
   with Lease heartbeats;
2. **ready** after the provisioning delay (default 20 s, standing in for a GPU
   node's boot; ``FLEETSERVE_DEV_NODE_PROVISION_SECONDS`` or the
   ``node_provision_delay_s`` key of the cluster's ``cluster.json``) — the taint
   goes, ``Ready=True``, and the agent runs the pods bound to it like its own;
3. **deleted** (the autoscaler scales the group down) — the agent cordons it
   (``spec.unschedulable``, so no replacement pod is bound to it meanwhile),
   deletes the pods still bound to it with their grace periods (preStop,
   SIGTERM, wait, SIGKILL, as for any pod deletion), and only once their
   processes are gone removes its finalizer, letting the Node object go.

Every patch that rewrites a list (finalizers, taints) carries the node's
``resourceVersion``: when someone else changed the node since the agent read
it (Karpenter removing its ``karpenter.sh/unregistered`` taint, a user adding
one), the API server answers 409 and the next pass reads it again, instead of
the agent writing back a stale list.

The state machine is :func:`adoption_step`, a pure function unit-tested on
plain dicts; :class:`Adopter` does the API calls around it.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

from .kube import Kube, KubeError, ns_path
from .pods import GPU_RESOURCE, MAX_NODES, NodeAllocator

JsonObj = dict[str, Any]
log = logging.getLogger("fleetserve.devcluster.agent")

KWOK_ANNOTATION = "kwok.x-k8s.io/node"
KWOK_VALUE = "fake"
FINALIZER = "fleetserve.io/node-agent"
PROVISIONED_ANNOTATION = "fleetserve.io/provisioned-at"
NOT_READY_TAINT = "node.kubernetes.io/not-ready"
DEFAULT_PROVISION_DELAY_S = 20.0
PROVISION_ENV = "FLEETSERVE_DEV_NODE_PROVISION_SECONDS"
PROVISION_CONFIG_KEY = "node_provision_delay_s"
LEASE_SECONDS = 40
HEARTBEAT_SECONDS = 10.0


def provision_delay(state_dir: Path | None, environ: dict[str, str] | None = None) -> float:
    """Seconds from adopting a node to reporting it Ready: env, else cluster.json, else 20.

    Raises ValueError naming the setting when it is not a non-negative number.
    """
    env = os.environ if environ is None else environ
    source, raw = PROVISION_ENV, env.get(PROVISION_ENV)
    if raw is None and state_dir is not None:
        try:
            config = json.loads((state_dir / "cluster.json").read_text())
        except (OSError, ValueError):
            config = {}
        source, raw = f"{state_dir / 'cluster.json'}: {PROVISION_CONFIG_KEY}", config.get(PROVISION_CONFIG_KEY)
    if raw is None:
        return DEFAULT_PROVISION_DELAY_S
    try:
        value = float(raw)
    except (TypeError, ValueError):
        value = -1.0
    if not value >= 0:
        raise ValueError(f"{source}={raw!r}: the node provisioning delay must be a number of seconds >= 0, e.g. 20")
    return value


def is_adoptable(node: JsonObj) -> bool:
    """A node the cluster autoscaler's kwok provider made (annotation ``kwok.x-k8s.io/node: fake``)."""
    annotations = (node.get("metadata") or {}).get("annotations") or {}
    return annotations.get(KWOK_ANNOTATION) == KWOK_VALUE


def node_gpus(node: JsonObj, default: int) -> int:
    """The node's ``nvidia.com/gpu`` as its template set it: allocatable, else capacity (``default``
    when absent). Karpenter's kwok nodes put the instance type's GPUs in allocatable and only the
    NodeClaim's requests in capacity."""
    status = node.get("status") or {}
    for field in ("allocatable", "capacity"):
        value = (status.get(field) or {}).get(GPU_RESOURCE)
        if value is not None:
            try:
                return int(value)
            except (TypeError, ValueError):
                return default
    return default


class Phase(StrEnum):
    PROVISIONING = "provisioning"
    READY = "ready"
    DRAINING = "draining"


class Action(StrEnum):
    """What :func:`adoption_step` asks the agent to do now."""

    ADOPT = "adopt"              # add finalizer + not-ready taint, report NotReady
    MAKE_READY = "make-ready"    # remove the taint, report Ready, start running pods
    DRAIN = "drain"              # delete the pods still bound to the node, gracefully
    RELEASE = "release"          # nothing runs any more: remove the finalizer
    NONE = "none"


@dataclass(frozen=True)
class Adopted:
    """The agent's record of one adopted node. ``seen_at`` is on the agent's monotonic clock."""

    name: str
    index: int
    seen_at: float
    phase: Phase


def adoption_step(node: JsonObj, record: Adopted | None, now: float, delay_s: float,
                  pods_left: int) -> tuple[Phase | None, Action]:
    """The node's next phase and the action to take, from the Node object and the agent's record.

    ``pods_left`` counts the pods still bound to the node or still running on
    it. Invariants: a node is Ready only ``delay_s`` after it was first seen
    (or when a previous agent already finished provisioning it); the finalizer
    goes only when ``pods_left == 0``.
    """
    meta = node.get("metadata") or {}
    provisioned = PROVISIONED_ANNOTATION in (meta.get("annotations") or {})
    if meta.get("deletionTimestamp"):
        if FINALIZER not in (meta.get("finalizers") or []):
            return None, Action.NONE
        return (Phase.DRAINING, Action.DRAIN) if pods_left else (None, Action.RELEASE)
    if record is None:
        return (Phase.READY, Action.MAKE_READY) if provisioned else (Phase.PROVISIONING, Action.ADOPT)
    if record.phase is Phase.PROVISIONING and now - record.seen_at >= delay_s:
        return Phase.READY, Action.MAKE_READY
    return record.phase, Action.NONE


def without_taint(taints: list[JsonObj], key: str) -> list[JsonObj]:
    return [t for t in taints if t.get("key") != key]


class Adopter:
    """Adopts kwok-annotated nodes for one node agent (see the module docstring).

    Invariant: ``records`` holds exactly the adopted nodes this agent still
    answers for; each has a distinct allocator index not used by the agent's
    own nodes, so their pod IPs never collide.
    """

    def __init__(self, kube: Kube, delay_s: float, own_nodes: dict[str, NodeAllocator], net: int,
                 default_gpus: int, status_fn: Callable[[str, str, int, JsonObj], JsonObj]) -> None:
        self.kube, self.delay_s, self.own, self.net = kube, delay_s, own_nodes, net
        self.default_gpus, self.status_fn = default_gpus, status_fn
        self.records: dict[str, Adopted] = {}
        self.allocators: dict[str, NodeAllocator] = {}
        self.next_heartbeat: dict[str, float] = {}
        # Where `sync` reads the Nodes: a list request here; the node agent's Node informer (watch.py).
        self.list_nodes: Callable[[], list[JsonObj]] = lambda: list(self.kube.get("/api/v1/nodes")["items"])

    def allocator(self, node: str) -> NodeAllocator | None:
        """The allocator of an adopted node whose pods may run (Ready or draining), else None."""
        record = self.records.get(node)
        if record is None or record.phase is Phase.PROVISIONING:
            return None
        return self.allocators.get(node)

    def sync(self, now: float, running_on: Callable[[str], int]) -> None:
        """One pass over every Node: adopt, make ready, heartbeat, drain, release."""
        nodes = self.list_nodes()
        present = set()
        for node in nodes:
            name = node["metadata"]["name"]
            if name in self.own or not is_adoptable(node):
                continue
            present.add(name)
            record = self.records.get(name)
            pods_left = 0
            if node["metadata"].get("deletionTimestamp"):
                pods_left = len(self._bound_pods(name)) + running_on(name)
            phase, action = adoption_step(node, record, now, self.delay_s, pods_left)
            if phase is not None and record is None:
                index = self._free_index()
                if index is None:
                    log.warning("cannot adopt node %s: all %d node slots are in use", name, MAX_NODES)
                    continue
                record = Adopted(name, index, now, phase)
                self.allocators[name] = NodeAllocator(index=index, gpus=node_gpus(node, self.default_gpus),
                                                      net=self.net)
            if not self._act(node, action):
                if record is not None and name not in self.records:
                    self.allocators.pop(name, None)  # not adopted after all; the next pass retries
                continue
            if phase is None:
                self._forget(name)
                continue
            assert record is not None
            self.records[name] = Adopted(name, record.index, record.seen_at, phase)
            if now >= self.next_heartbeat.get(name, 0.0) or action is not Action.NONE:
                self.next_heartbeat[name] = now + HEARTBEAT_SECONDS
                self._heartbeat(node, phase)
        for name in set(self.records) - present:
            # Deleted without our finalizer (force, or by hand): its pods' workers see them go.
            log.info("adopted node %s is gone", name)
            self._forget(name)

    # ------------------------------------------------------------------ actions
    def _act(self, node: JsonObj, action: Action) -> bool:
        """Do ``action``; False when the node changed since it was read (409) and nothing was done."""
        name = node["metadata"]["name"]
        path = f"/api/v1/nodes/{name}"
        taints = list((node.get("spec") or {}).get("taints") or [])
        version = node["metadata"].get("resourceVersion")
        if action is Action.ADOPT:
            finalizers = [*(node["metadata"].get("finalizers") or []), FINALIZER]
            taint = {"key": NOT_READY_TAINT, "effect": "NoSchedule"}
            if not self._patch_at_version(path, {
                    "metadata": {"finalizers": finalizers, "resourceVersion": version},
                    "spec": {"taints": [*without_taint(taints, NOT_READY_TAINT), taint]}}):
                return False
            log.info("adopted node %s: provisioning for %gs", name, self.delay_s)
        elif action is Action.MAKE_READY:
            patch: JsonObj = {"metadata": {"annotations": {PROVISIONED_ANNOTATION: _now()}, "resourceVersion": version},
                              "spec": {"taints": without_taint(taints, NOT_READY_TAINT) or None}}
            if FINALIZER not in (node["metadata"].get("finalizers") or []):
                patch["metadata"]["finalizers"] = [*(node["metadata"].get("finalizers") or []), FINALIZER]
            if not self._patch_at_version(path, patch):
                return False
            log.info("adopted node %s is Ready", name)
        elif action is Action.DRAIN:
            if not (node.get("spec") or {}).get("unschedulable"):
                # Cordon first: the scheduler must not bind a replacement pod to a node on its way out.
                self.kube.patch(path, {"spec": {"unschedulable": True}})
                log.info("node %s is being deleted: cordoned it", name)
            for pod in self._bound_pods(name):
                if pod["metadata"].get("deletionTimestamp"):
                    continue
                meta = pod["metadata"]
                log.info("node %s is being deleted: deleting pod %s/%s", name, meta["namespace"], meta["name"])
                try:
                    self.kube.delete(ns_path(meta["namespace"], "pods", meta["name"]),
                                     {"preconditions": {"uid": meta["uid"]}})
                except KubeError as exc:
                    if exc.status not in (404, 409):
                        raise
        elif action is Action.RELEASE:
            finalizers = [f for f in node["metadata"].get("finalizers") or [] if f != FINALIZER]
            try:
                self.kube.patch(path, {"metadata": {"finalizers": finalizers or None,
                                                    "resourceVersion": node["metadata"]["resourceVersion"]}})
                log.info("node %s: its pods are stopped; released it for deletion", name)
            except KubeError as exc:
                if exc.status not in (404, 409):  # 409: it changed; the next pass retries
                    raise
        return True

    def _patch_at_version(self, path: str, patch: JsonObj) -> bool:
        """A merge patch that names the resourceVersion it was computed from; False on 409 (stale)."""
        try:
            self.kube.patch(path, patch)
        except KubeError as exc:
            if exc.status != 409:
                raise
            log.info("%s changed since it was read; retrying on the next pass", path)
            return False
        return True

    def _heartbeat(self, node: JsonObj, phase: Phase) -> None:
        name = node["metadata"]["name"]
        alloc = self.allocators[name]
        status = self.status_fn(name, alloc.host_ip, alloc.gpus, node)
        # Keep what the node's template declared (CPU, memory, extended resources).
        capacity = {**status["capacity"], **((node.get("status") or {}).get("capacity") or {})}
        status["capacity"] = capacity
        status["allocatable"] = {**capacity, **((node.get("status") or {}).get("allocatable") or {})}
        if phase is Phase.PROVISIONING:
            for cond in status["conditions"]:
                if cond["type"] == "Ready":
                    cond.update(status="False", reason="NodeProvisioning",
                                message=f"the dev-cluster node agent adopted this node; Ready after {self.delay_s:g}s")
        try:
            self.kube.patch(f"/api/v1/nodes/{name}/status", {"status": status}, strategic=True)
            self._renew_lease(node)
        except KubeError as exc:
            if exc.status != 404:
                raise

    def _renew_lease(self, node: JsonObj) -> None:
        from .agent import micro_time

        name = node["metadata"]["name"]
        path = ns_path("kube-node-lease", "leases", name, group="coordination.k8s.io/v1")
        spec = {"holderIdentity": name, "leaseDurationSeconds": LEASE_SECONDS, "renewTime": micro_time()}
        try:
            self.kube.patch(path, {"spec": spec})
        except KubeError as exc:
            if exc.status != 404:
                raise
            owner = {"apiVersion": "v1", "kind": "Node", "name": name, "uid": node["metadata"]["uid"]}
            self.kube.create(ns_path("kube-node-lease", "leases", group="coordination.k8s.io/v1"), {
                "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                "metadata": {"name": name, "ownerReferences": [owner]}, "spec": spec})

    # ------------------------------------------------------------------ helpers
    def _bound_pods(self, node: str) -> list[JsonObj]:
        items = self.kube.get("/api/v1/pods", fieldSelector=f"spec.nodeName={node}")["items"]
        return [p for p in items if (p.get("status") or {}).get("phase") not in ("Succeeded", "Failed")
                or p["metadata"].get("deletionTimestamp")]

    def _free_index(self) -> int | None:
        used = {a.index for a in self.own.values()} | {r.index for r in self.records.values()}
        return next((i for i in range(MAX_NODES) if i not in used), None)

    def _forget(self, name: str) -> None:
        self.records.pop(name, None)
        self.next_heartbeat.pop(name, None)
        # Workers keep their own reference; released only when none runs (see RELEASE).
        self.allocators.pop(name, None)


def _now() -> str:
    from .status import now_rfc3339

    return now_rfc3339()
