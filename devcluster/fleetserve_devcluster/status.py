"""Pod status as the kubelet reports it, built from the agent's view of its containers (pure)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

JsonObj = dict[str, Any]


def now_rfc3339() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


@dataclass
class ContainerView:
    """What the status needs to know about one container.

    Exactly one of `running_since`, `waiting`, `terminated` describes the current state.
    """

    name: str
    image: str
    restart_count: int = 0
    running_since: str | None = None
    container_id: str = ""
    started: bool = False
    ready: bool = False
    waiting: tuple[str, str] | None = ("ContainerCreating", "")
    terminated: JsonObj | None = None
    last_terminated: JsonObj | None = None

    def to_status(self) -> JsonObj:
        if self.running_since is not None:
            state: JsonObj = {"running": {"startedAt": self.running_since}}
        elif self.terminated is not None:
            state = {"terminated": self.terminated}
        else:
            reason, message = self.waiting or ("ContainerCreating", "")
            state = {"waiting": {"reason": reason, **({"message": message} if message else {})}}
        return {
            "name": self.name,
            "image": self.image,
            "imageID": f"fleetserve-local://{self.image}",
            **({"containerID": self.container_id} if self.container_id else {}),
            "ready": self.ready,
            "started": self.started,
            "restartCount": self.restart_count,
            "state": state,
            "lastState": {"terminated": self.last_terminated} if self.last_terminated else {},
        }


@dataclass
class PodView:
    """The pod-level facts next to the containers."""

    pod_ip: str | None
    host_ip: str
    start_time: str
    restart_policy: str = "Always"
    containers: list[ContainerView] = field(default_factory=list)
    failed_reason: str | None = None
    failed_message: str = ""


def pod_phase(view: PodView) -> str:
    """Pending until a container started; Succeeded/Failed once all are done for good; else Running."""
    if view.failed_reason:
        return "Failed"
    cs = view.containers
    if cs and all(c.terminated is not None for c in cs):
        return "Succeeded" if all(c.terminated and c.terminated.get("exitCode") == 0 for c in cs) else "Failed"
    if any(c.running_since or c.restart_count or c.last_terminated for c in cs):
        return "Running"
    return "Pending"


def _condition(kind: str, ok: bool, old: dict[str, JsonObj], reason: str = "") -> JsonObj:
    status = "True" if ok else "False"
    prev = old.get(kind, {})
    since = prev.get("lastTransitionTime") if prev.get("status") == status else None
    cond: JsonObj = {"type": kind, "status": status, "lastTransitionTime": since or now_rfc3339(),
                     "lastProbeTime": None}
    if reason and not ok:
        cond["reason"] = reason
    return cond


def build_status(pod: JsonObj, view: PodView) -> JsonObj:
    """The `status` to patch onto `pod` (a strategic merge patch; conditions merge by type).

    Ready requires every container ready and every readinessGate condition True.
    """
    old = {c["type"]: c for c in pod.get("status", {}).get("conditions") or []}
    phase = pod_phase(view)
    containers_ready = bool(view.containers) and all(c.ready for c in view.containers) and phase == "Running"
    gates_ok = all(old.get(g["conditionType"], {}).get("status") == "True"
                   for g in pod.get("spec", {}).get("readinessGates") or [])
    not_ready = "PodCompleted" if phase in ("Succeeded", "Failed") else "ContainersNotReady"
    status: JsonObj = {
        "phase": phase,
        "hostIP": view.host_ip,
        "hostIPs": [{"ip": view.host_ip}],
        "startTime": view.start_time,
        "conditions": [
            _condition("PodReadyToStartContainers", view.pod_ip is not None, old),
            _condition("Initialized", True, old),
            _condition("ContainersReady", containers_ready, old, not_ready),
            _condition("Ready", containers_ready and gates_ok, old, not_ready),
        ],
        "containerStatuses": [c.to_status() for c in view.containers],
    }
    if view.pod_ip:
        status["podIP"] = view.pod_ip
        status["podIPs"] = [{"ip": view.pod_ip}]
    if view.failed_reason:
        status["reason"] = view.failed_reason
        status["message"] = view.failed_message
    return status


def same_status(a: JsonObj | None, b: JsonObj) -> bool:
    """Equal apart from timestamps of conditions (which only change along with a status)."""
    if a is None:
        return False

    def strip(s: JsonObj) -> JsonObj:
        return {**s, "conditions": [(c["type"], c["status"]) for c in s.get("conditions", [])]}

    return strip(a) == strip(b)
