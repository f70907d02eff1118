"""Sort a fleet's pods into what the autoscaler counts: ready, starting, unschedulable.

Pods arrive as the API server's JSON (the operator's :class:`~fleetserve_operator.kube.Kube`
speaks plain dicts). A pod being deleted (draining) is neither capacity nor
load any more: its readiness already went false and the proxy stopped sending
it requests. Finished pods (Succeeded/Failed) are ignored; their ReplicaSet
replaces them.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from fleetserve_operator.autoscaler.nodes import capacity_shortfall
from fleetserve_operator.autoscaler.scraper import DEFAULT_PORT, ScrapeTarget

HTTP_PORT_NAME = "http"


@dataclass(frozen=True)
class PodCensus:
    """Counts of one fleet's pods at one instant.

    ``ready`` lists the scrape targets of pods that are Ready, have an IP and
    are not being deleted; every other live pod is ``unschedulable``
    (PodScheduled=False, reason Unschedulable, for lack of capacity: a node
    autoscaler can help), ``unplaceable`` (Unschedulable for another reason:
    a node selector or affinity no node matches; these never hold growth)
    or ``starting``.
    ``unschedulable_since`` is the earliest RFC 3339 time the scheduler gave
    up on one of them.
    """

    ready: tuple[ScrapeTarget, ...] = ()
    starting: int = 0
    unschedulable: int = 0
    terminating: int = 0
    unschedulable_since: str | None = None
    unplaceable: int = 0


def take_census(pods: Iterable[dict[str, Any]]) -> PodCensus:
    ready: list[ScrapeTarget] = []
    starting = unschedulable = terminating = unplaceable = 0
    since: str | None = None
    for pod in pods:
        meta = pod.get("metadata") or {}
        status = pod.get("status") or {}
        if meta.get("deletionTimestamp"):
            terminating += 1
            continue
        if status.get("phase") in ("Succeeded", "Failed"):
            continue
        conditions = {c.get("type"): c for c in status.get("conditions") or []}
        scheduled = conditions.get("PodScheduled") or {}
        if scheduled.get("status") == "False" and scheduled.get("reason") == "Unschedulable":
            if not capacity_shortfall(scheduled.get("message")):
                unplaceable += 1
                continue
            unschedulable += 1
            when = scheduled.get("lastTransitionTime")
            if when and (since is None or when < since):  # RFC 3339 UTC strings sort by time
                since = when
            continue
        is_ready = (conditions.get("Ready") or {}).get("status") == "True"
        if is_ready and status.get("podIP"):
            ready.append(ScrapeTarget(pod=str(meta.get("name")), host=str(status["podIP"]), port=_http_port(pod)))
        else:
            starting += 1
    return PodCensus(ready=tuple(ready), starting=starting, unschedulable=unschedulable,
                     terminating=terminating, unschedulable_since=since, unplaceable=unplaceable)


def _http_port(pod: dict[str, Any]) -> int:
    """The container port named ``http`` (the server's), else fleetserve's default 8000."""
    for container in (pod.get("spec") or {}).get("containers") or []:
        for port in container.get("ports") or []:
            if port.get("name") == HTTP_PORT_NAME and port.get("containerPort"):
                return int(port["containerPort"])
    return DEFAULT_PORT
