"""Node-aware fleet scaling: pods waiting for a node, and which pods a scale-down removes.

Two pure functions, unit-tested on plain dicts (tests/unit/test_cluster_autoscaling_nodes.py):

* :func:`node_wait` — how many of a fleet's pods the scheduler could not place
  (``PodScheduled=False``, reason ``Unschedulable``), since when, and how many
  of them have waited longer than ``scheduling.maxNodeProvisionSeconds``. A
  pod inside that limit is *waiting for a node*: a cluster autoscaler
  (Cluster Autoscaler, Karpenter) may be booting one for it, so the operator
  counts it as capacity already requested, never removes it because of one
  scrape, and reports ``Progressing/WaitingForNodes``. Past the limit it is
  *unschedulable*: ``Degraded/Unschedulable`` and a Warning event.
* :func:`deletion_costs` — the ``controller.kubernetes.io/pod-deletion-cost``
  each pod gets before the fleet shrinks, so the ReplicaSet removes the pods
  on the node that is easiest to empty first: the node with the fewest of
  this fleet's pods, then the newest node, then the least loaded one. An
  emptied node is what lets a cluster autoscaler remove it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

DELETION_COST_ANNOTATION = "controller.kubernetes.io/pod-deletion-cost"
# Costs are spread this far apart per node rank, so pods of one node stay together.
_NODE_STRIDE = 1000


@dataclass(frozen=True)
class NodeWait:
    """The fleet's pods the scheduler could not place, at one instant.

    Invariants: ``waiting + overdue`` is the number of unschedulable pods;
    ``since`` is the earliest ``PodScheduled`` transition among them (RFC 3339),
    None when there are none; ``longest_s`` is how long that pod has waited.
    """

    waiting: int = 0
    overdue: int = 0
    since: str | None = None
    longest_s: float = 0.0

    @property
    def unschedulable(self) -> int:
        return self.waiting + self.overdue

    def to_status(self) -> dict[str, Any] | None:
        """``status.autoscaler.waitingForNodes``, or None when no pod waits."""
        if not self.unschedulable:
            return None
        return {"pods": self.waiting, "overdue": self.overdue, "since": self.since,
                "seconds": int(self.longest_s)}

    def describe(self, limit_s: int) -> str:
        """E.g. ``"2 pods wait for a node since 2026-01-02T03:04:05Z (scheduling.maxNodeProvisionSeconds: 900)"``."""
        pods = f"{self.unschedulable} pod{'s' if self.unschedulable != 1 else ''}"
        # No running seconds here: a condition message that changes every second is a write every time.
        return (f"{pods} wait{'s' if self.unschedulable == 1 else ''} for a node since {self.since} "
                f"(scheduling.maxNodeProvisionSeconds: {limit_s})")


def _parse_time(text: str) -> datetime | None:
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None


def unschedulable_since(pod: Mapping[str, Any]) -> str | None:
    """When the scheduler gave up on ``pod`` (None: it is placed, finished or being deleted)."""
    meta, status = pod.get("metadata") or {}, pod.get("status") or {}
    if meta.get("deletionTimestamp") or status.get("phase") in ("Succeeded", "Failed"):
        return None
    for cond in status.get("conditions") or []:
        if cond.get("type") == "PodScheduled" and cond.get("status") == "False" \
                and cond.get("reason") == "Unschedulable":
            return str(cond.get("lastTransitionTime") or meta.get("creationTimestamp") or "") or None
    return None


def node_wait(pods: Iterable[Mapping[str, Any]], limit_s: float, now: datetime) -> NodeWait:
    """Split the unschedulable pods into those still waiting for a node and those past ``limit_s``.

    A pod whose time cannot be read counts as waiting since ``now`` (never
    wrongly overdue). ``limit_s == 0`` makes every unschedulable pod overdue.
    """
    waiting = overdue = 0
    since: str | None = None
    longest = 0.0
    for pod in pods:
        when = unschedulable_since(pod)
        if when is None:
            continue
        at = _parse_time(when)
        waited = max(0.0, (now - at).total_seconds()) if at is not None else 0.0
        if waited >= limit_s:
            overdue += 1
        else:
            waiting += 1
        if waited >= longest:
            longest = waited
        if at is not None and (since is None or when < since):  # RFC 3339 UTC strings sort by time
            since = when
    return NodeWait(waiting=waiting, overdue=overdue, since=since, longest_s=longest)


@dataclass(frozen=True)
class PodPlacement:
    """One running pod of the fleet as the deletion order sees it.

    ``node_created`` is the node's creationTimestamp (RFC 3339; "" when the
    node is unknown, which sorts as oldest, so an unknown node is emptied last);
    ``load`` is the pod's scraped queue (waiting + running requests).
    """

    pod: str
    node: str
    node_created: str = ""
    load: float = 0.0


def deletion_costs(pods: Iterable[PodPlacement]) -> dict[str, int]:
    """``pod-deletion-cost`` per pod: the ReplicaSet deletes the lowest cost first.

    Nodes are ranked by (this fleet's pods on the node ascending, the node's
    creation time descending, the node's total load ascending, name); pods get
    ``rank × 1000 + their order on the node`` (least loaded first). Invariants:
    every pod of a lower-ranked node costs less than every pod of a higher-ranked
    one, so a scale-down by k removes whole nodes' worth of pods before touching
    the next node; costs are non-negative and distinct.
    """
    by_node: dict[str, list[PodPlacement]] = {}
    for placement in pods:
        by_node.setdefault(placement.node, []).append(placement)

    def node_key(node: str) -> tuple[int, float, float, str]:
        members = by_node[node]
        created = _parse_time(members[0].node_created) if members[0].node_created else None
        # Newest first; an unknown node counts as the oldest (emptied last).
        newest_first = -created.timestamp() if created is not None else float("inf")
        return len(members), newest_first, sum(p.load for p in members), node

    costs: dict[str, int] = {}
    for rank, node in enumerate(sorted(by_node, key=node_key)):
        for order, placement in enumerate(sorted(by_node[node], key=lambda p: (p.load, p.pod))):
            costs[placement.pod] = rank * _NODE_STRIDE + order
    return costs


def placements(pods: Iterable[Mapping[str, Any]], node_created: Mapping[str, str],
               load: Mapping[str, float]) -> list[PodPlacement]:
    """The fleet's placed, live pods as :class:`PodPlacement` (pending or deleted pods are left out:
    the ReplicaSet removes unplaced pods first anyway, and deleted ones are already going)."""
    out = []
    for pod in pods:
        meta, spec = pod.get("metadata") or {}, pod.get("spec") or {}
        node = spec.get("nodeName")
        if not node or meta.get("deletionTimestamp"):
            continue
        name = str(meta.get("name"))
        out.append(PodPlacement(pod=name, node=str(node), node_created=node_created.get(str(node), ""),
                                load=float(load.get(name, 0.0))))
    return out


def cost_patches(pods: Iterable[Mapping[str, Any]], costs: Mapping[str, int]) -> dict[str, int]:
    """The pods whose annotation differs from ``costs`` (only those are patched)."""
    out = {}
    for pod in pods:
        meta = pod.get("metadata") or {}
        name = str(meta.get("name"))
        if name in costs and (meta.get("annotations") or {}).get(DELETION_COST_ANNOTATION) != str(costs[name]):
            out[name] = costs[name]
    return out
