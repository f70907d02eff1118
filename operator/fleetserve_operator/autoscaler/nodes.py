"""Node-aware fleet scaling: pods waiting for a node, and which pods a scale-down removes.

Two pure functions, unit-tested on plain dicts (tests/unit/test_cluster_autoscaling_nodes.py):

* :func:`node_wait` — how many of a fleet's pods the scheduler could not place
  for lack of capacity (``PodScheduled=False``, reason ``Unschedulable``, the
  scheduler naming an ``Insufficient`` resource or no node at all: see
  :func:`capacity_shortfall`), since when, and how many of them have waited
  longer than ``scheduling.maxNodeProvisionSeconds``. A pod inside that limit
  is *waiting for a node*: a cluster autoscaler (Cluster Autoscaler,
  Karpenter) may be booting one for it, so the operator counts it as capacity
  already requested, never removes it because of one scrape, and reports
  ``Progressing/WaitingForNodes``. Past the limit it is *unschedulable*:
  ``Degraded/Unschedulable`` and a Warning event. A pod no new node would help
  (a node selector or affinity nothing matches) is unschedulable at once and
  never holds the fleet's growth. The protection lasts until the pod is
  *Ready* (``loading``: bound to a node, loading its model), not only until it
  is bound: the ReplicaSet deletes not-ready pods first.
* :func:`deletion_costs` — the ``controller.kubernetes.io/pod-deletion-cost``
  each pod gets before the fleet shrinks, so the ReplicaSet removes the pods
  on the node that is easiest to empty first: the newest node, then the
  least loaded one, then the one with the fewest of this fleet's pods. An
  emptied node is what lets a cluster autoscaler remove it, and the newest
  node is the one an autoscaler added (static nodes are the oldest).
* :func:`disruption_patches` — ``karpenter.sh/do-not-disrupt`` per pod: on
  while a pod is loading or serving, off only when it is idle and the fleet
  wants fewer replicas, so Karpenter's consolidation never evicts a busy one.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

DELETION_COST_ANNOTATION = "controller.kubernetes.io/pod-deletion-cost"
DO_NOT_DISRUPT_ANNOTATION = "karpenter.sh/do-not-disrupt"
# The scheduler's words for "no node has room" (kube-scheduler's fit and node-count messages);
# anything else (a selector, affinity, taint or volume no node satisfies) is no capacity shortfall.
_CAPACITY_WORDS = ("Insufficient ", "Too many pods", "no nodes available")
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
    # Bound to a node but not Ready yet, inside the limit (counted from the pod's creation).
    loading: int = 0

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


def capacity_shortfall(message: str | None) -> bool:
    """Whether the scheduler's ``Unschedulable`` message says some node lacked room (a new node
    could take the pod) rather than that no node matches it. An empty message counts as a shortfall."""
    return not message or any(word in message for word in _CAPACITY_WORDS)


def unschedulable_since(pod: Mapping[str, Any]) -> str | None:
    """When the scheduler gave up on ``pod`` for lack of capacity (None: it is placed, finished,
    being deleted, or unschedulable for a reason no new node fixes)."""
    meta, status = pod.get("metadata") or {}, pod.get("status") or {}
    if meta.get("deletionTimestamp") or status.get("phase") in ("Succeeded", "Failed"):
        return None
    for cond in status.get("conditions") or []:
        if cond.get("type") == "PodScheduled" and cond.get("status") == "False" \
                and cond.get("reason") == "Unschedulable" and capacity_shortfall(cond.get("message")):
            return str(cond.get("lastTransitionTime") or meta.get("creationTimestamp") or "") or None
    return None


def _loading(pod: Mapping[str, Any]) -> bool:
    """Bound to a node, live, and not Ready yet (starting its server, loading the model)."""
    meta, spec, status = pod.get("metadata") or {}, pod.get("spec") or {}, pod.get("status") or {}
    if not spec.get("nodeName") or meta.get("deletionTimestamp") or status.get("phase") in ("Succeeded", "Failed"):
        return False
    return not any(c.get("type") == "Ready" and c.get("status") == "True" for c in status.get("conditions") or [])


def node_wait(pods: Iterable[Mapping[str, Any]], limit_s: float, now: datetime) -> NodeWait:
    """Split the unschedulable pods into those still waiting for a node and those past ``limit_s``.

    A pod whose time cannot be read counts as waiting since ``now`` (never
    wrongly overdue). ``limit_s == 0`` makes every unschedulable pod overdue.
    ``loading`` counts the bound, not-yet-Ready pods created less than ``limit_s`` ago.
    """
    waiting = overdue = loading = 0
    since: str | None = None
    longest = 0.0
    for pod in pods:
        when = unschedulable_since(pod)
        if when is None:
            if _loading(pod):
                created = _parse_time(str((pod.get("metadata") or {}).get("creationTimestamp") or ""))
                if created is None or (now - created).total_seconds() < limit_s:
                    loading += 1
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
    return NodeWait(waiting=waiting, overdue=overdue, since=since, longest_s=longest, loading=loading)


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

    Nodes are ranked by (the node's creation time descending, the node's total
    load ascending, this fleet's pods on the node ascending, name); pods get
    ``rank × 1000 + their order on the node`` (least loaded first). Invariants:
    every pod of a lower-ranked node costs less than every pod of a higher-ranked
    one, so a scale-down by k removes whole nodes' worth of pods before touching
    the next node; costs are non-negative and distinct.
    """
    by_node: dict[str, list[PodPlacement]] = {}
    for placement in pods:
        by_node.setdefault(placement.node, []).append(placement)

    def node_key(node: str) -> tuple[float, float, int, str]:
        members = by_node[node]
        created = _parse_time(members[0].node_created) if members[0].node_created else None
        # Newest first; an unknown node counts as the oldest (emptied last).
        newest_first = -created.timestamp() if created is not None else float("inf")
        return newest_first, sum(p.load for p in members), len(members), node

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


def disruption_patches(pods: Iterable[Mapping[str, Any]], load: Mapping[str, float],
                       shrinking: bool) -> dict[str, str | None]:
    """``karpenter.sh/do-not-disrupt`` per live pod, only where it differs from what the pod has:
    ``"true"`` while the pod is not Ready (loading) or has requests (``load`` > 0, or no scrape
    of it), ``None`` (remove) when it is idle and the fleet wants fewer replicas (``shrinking``).
    Karpenter then consolidates only nodes whose replicas the fleet can spare."""
    out: dict[str, str | None] = {}
    for pod in pods:
        meta, status = pod.get("metadata") or {}, pod.get("status") or {}
        if meta.get("deletionTimestamp") or status.get("phase") in ("Succeeded", "Failed"):
            continue
        name = str(meta.get("name"))
        ready = any(c.get("type") == "Ready" and c.get("status") == "True" for c in status.get("conditions") or [])
        idle = ready and name in load and load[name] <= 0
        want = None if idle and shrinking else "true"
        if (meta.get("annotations") or {}).get(DO_NOT_DISRUPT_ANNOTATION) != want:
            out[name] = want
    return out
