"""The status the operator owns, computed from the spec, the fit and the live children.

Pure functions. The operator owns every status key except ``autoscaler``,
the ``ScalingActive`` condition and — while autoscaling is on —
``desiredReplicas``, which the autoscaler writes; :func:`status_patch` only
ever names the keys that changed, so a status that did not change is never
written and concurrent writers do not erase each other's keys.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from ..api.spec import LLMDeploymentSpec
from ..autoscaler.nodes import node_wait, unschedulable_since
from ..events import Event
from ..reconcile.fit import MemoryFit
from ..resources.labels import endpoint, selector_string
from .conditions import Conditions, get_condition, set_condition, sort_conditions

# Container waiting reasons that will not resolve by themselves.
BAD_WAITING_REASONS = frozenset({
    "CrashLoopBackOff", "ImagePullBackOff", "ErrImagePull", "InvalidImageName",
    "CreateContainerConfigError", "CreateContainerError", "RunContainerError",
})
MAX_PODS_IN_MESSAGE = 3
# A container that is not ready and has failed this many times is crash-looping even while running.
CRASH_LOOP_RESTARTS = 2


def _pod_problems(pods: list[dict[str, Any]], waiting_pods: frozenset[str] = frozenset()) -> list[tuple[str, str]]:
    """(reason, message) for each pod that is crash-looping, unschedulable or failed.

    Pods named in ``waiting_pods`` are unschedulable but still within
    ``scheduling.maxNodeProvisionSeconds``: a node may be on its way, so they are no problem yet.
    """
    problems: list[tuple[str, str]] = []
    for pod in pods:
        meta, status = pod.get("metadata") or {}, pod.get("status") or {}
        if meta.get("deletionTimestamp"):
            continue
        name = meta.get("name", "?")
        for cond in status.get("conditions") or []:
            if cond.get("type") == "PodScheduled" and cond.get("status") == "False" and name not in waiting_pods:
                problems.append((cond.get("reason") or "Unschedulable", f"pod {name}: {cond.get('message', '')}"))
        for cs in status.get("containerStatuses") or []:
            waiting = (cs.get("state") or {}).get("waiting") or {}
            restarts = int(cs.get("restartCount") or 0)
            last = (cs.get("lastState") or {}).get("terminated") or {}
            if waiting.get("reason") in BAD_WAITING_REASONS:
                problems.append((waiting["reason"], f"pod {name} container {cs.get('name')} "
                                 f"(restarts: {restarts}): {waiting.get('message', '')}".rstrip(": ")))
            elif restarts >= CRASH_LOOP_RESTARTS and not cs.get("ready") and last.get("exitCode", 0) != 0:
                # Between back-offs a crash-looping container is briefly Running: still degraded,
                # so the condition does not flap with every restart.
                problems.append(("CrashLoopBackOff", f"pod {name} container {cs.get('name')} restarted "
                                 f"{restarts} times; last exit code {last.get('exitCode')} "
                                 f"({last.get('reason') or 'Error'})"))
        if status.get("phase") == "Failed":
            problems.append((status.get("reason") or "PodFailed", f"pod {name}: {status.get('message', 'failed')}"))
    return problems


def _deployment_problems(deployment: dict[str, Any] | None) -> list[tuple[str, str]]:
    problems = []
    for cond in ((deployment or {}).get("status") or {}).get("conditions") or []:
        if cond.get("type") == "Progressing" and cond.get("reason") == "ProgressDeadlineExceeded":
            problems.append(("ProgressDeadlineExceeded", cond.get("message", "")))
        if cond.get("type") == "ReplicaFailure" and cond.get("status") == "True":
            problems.append((cond.get("reason") or "ReplicaFailure", cond.get("message", "")))
    return problems


def _waiting_for_nodes(pods: list[dict[str, Any]], limit_s: int, now: datetime) -> frozenset[str]:
    """Names of the unschedulable pods still inside the node-provisioning limit."""
    return frozenset(str((pod.get("metadata") or {}).get("name")) for pod in pods
                     if unschedulable_since(pod) is not None and node_wait([pod], limit_s, now).waiting)


def compute_status(
    cr: dict[str, Any],
    spec: LLMDeploymentSpec,
    fit: MemoryFit,
    replicas: int,
    *,
    deployment: dict[str, Any] | None,
    pods: list[dict[str, Any]],
    conflicts: list[str],
    rolling: bool,
    now: datetime,
    router: dict[str, Any] | None = None,
    via_router: bool = False,
) -> dict[str, Any]:
    """The operator's part of the status after this reconcile.

    ``rolling`` says the plan is about to change children, so what was
    observed is already out of date and the roll-out is not finished.
    """
    meta = cr["metadata"]
    name, namespace = meta["name"], meta["namespace"]
    generation = int(meta.get("generation") or 0)
    current = cr.get("status") or {}
    dep_status = (deployment or {}).get("status") or {}
    dep_generation = ((deployment or {}).get("metadata") or {}).get("generation") or 0
    pods_now = int(dep_status.get("replicas") or 0)
    ready = int(dep_status.get("readyReplicas") or 0)
    updated = int(dep_status.get("updatedReplicas") or 0)
    desired = replicas if fit.status != "False" else 0

    status: dict[str, Any] = {
        "observedGeneration": generation,
        "replicas": pods_now,
        "readyReplicas": ready,
        "readySummary": f"{ready}/{desired}",
        "selector": selector_string(name),
        "endpoint": endpoint(name, namespace),
        "memory": fit.to_status(),
    }
    if not spec.autoscaling.enabled:
        status["desiredReplicas"] = spec.replicas

    conditions: Conditions = [dict(c) for c in current.get("conditions") or []]

    def put(type_: str, value: str, reason: str, message: str) -> None:
        nonlocal conditions
        conditions = set_condition(conditions, type_, value, reason, message, generation, now)

    put("MemoryFits", fit.status, fit.reason, fit.message)

    settled = (
        deployment is not None and not rolling
        and int(dep_status.get("observedGeneration") or 0) >= int(dep_generation)
        and updated >= desired and ready >= desired and pods_now == desired
    )
    if fit.status == "False":
        put("Ready", "False", "MemoryDoesNotFit", "no replica can run: " + fit.message)
        put("Progressing", "False", "MemoryDoesNotFit", "no Deployment is rolled out until the model fits")
    elif desired == 0:
        if via_router:
            put("Ready", "False", "ScaledToZero", "desired replicas is 0: the router holds requests sent to "
                + endpoint(name, namespace) + " while the autoscaler brings a replica back")
        else:
            put("Ready", "False", "ScaledToZero", "desired replicas is 0; no pod serves " + endpoint(name, namespace))
        put("Progressing", "False" if settled else "True",
            "ScaledToZero" if settled else "ScalingDown", f"{pods_now} pods left")
    else:
        if ready >= desired and deployment is not None:
            put("Ready", "True", "ReplicasReady", f"{ready}/{desired} replicas ready at {endpoint(name, namespace)}")
        else:
            put("Ready", "False", "ReplicasNotReady" if deployment is not None else "Creating",
                f"{ready}/{desired} replicas ready")
        limit_s = spec.scheduling.max_node_provision_seconds
        wait = node_wait(pods, limit_s, now)
        if settled:
            put("Progressing", "False", "RolloutComplete", f"{ready}/{desired} replicas up to date and ready")
        elif wait.unschedulable:
            put("Progressing", "True", "WaitingForNodes",
                f"{ready}/{desired} replicas ready; {wait.describe(limit_s)}")
        else:
            put("Progressing", "True", "RollingOut",
                f"{updated}/{desired} pods updated, {ready} ready, {pods_now} in total")

    if spec.router.enabled:
        put("RouterReady", *router_condition(spec, router, via_router, name, namespace))
    else:
        conditions = [c for c in conditions if c.get("type") != "RouterReady"]

    waiting_pods = _waiting_for_nodes(pods, spec.scheduling.max_node_provision_seconds, now)
    problems = ([("ChildConflict", c) for c in conflicts] + _deployment_problems(deployment)
                + _pod_problems(pods, waiting_pods))
    if problems:
        reason = problems[0][0]
        message = "; ".join(m for _, m in problems[:MAX_PODS_IN_MESSAGE])
        if len(problems) > MAX_PODS_IN_MESSAGE:
            message += f"; and {len(problems) - MAX_PODS_IN_MESSAGE} more"
        put("Degraded", "True", reason, message)
    else:
        put("Degraded", "False", "AsExpected", "no pod is crash-looping, unschedulable or failed")
    status["conditions"] = sort_conditions(conditions)
    return status


def router_condition(spec: LLMDeploymentSpec, router: dict[str, Any] | None, via_router: bool, name: str,
                     namespace: str) -> tuple[str, str, str]:
    """(status, reason, message) of ``RouterReady``: whether Service ``<name>`` routes (and holds)
    through ready router pods."""
    wanted = spec.router.replicas
    ready = int(((router or {}).get("status") or {}).get("readyReplicas") or 0)
    for cond in ((router or {}).get("status") or {}).get("conditions") or []:
        if cond.get("type") == "Progressing" and cond.get("reason") == "ProgressDeadlineExceeded":
            return "False", "ProgressDeadlineExceeded", f"router Deployment {name}-router: {cond.get('message', '')}"
    if router is None:
        return "False", "Creating", f"creating the router Deployment {name}-router"
    if ready == 0:
        return "False", "RouterNotReady", (f"0/{wanted} router pods ready; Service {name} still selects the "
                                           f"server pods until one is" if not via_router else
                                           f"0/{wanted} router pods ready: requests to Service {name} fail")
    how = (f"Service {name} routes through {ready}/{wanted} ready router pods to the servers of Service "
           f"{name}-servers; requests are held up to {spec.router.hold_timeout_seconds} s while no server "
           f"is ready (at most {spec.router.max_held_requests} per router pod)")
    if not via_router:
        return "False", "Switching", how
    return "True", "RouterAvailable" if ready >= wanted else "PartiallyAvailable", how


def invalid_spec_status(current: dict[str, Any], message: str, generation: int, now: datetime) -> dict[str, Any]:
    """Status for a spec the operator cannot use (only possible when the CRD is older than the operator)."""
    conditions: Conditions = [dict(c) for c in current.get("conditions") or []]
    conditions = set_condition(conditions, "Ready", "False", "InvalidSpec", message, generation, now)
    conditions = set_condition(conditions, "Progressing", "False", "InvalidSpec",
                               "fix the spec; nothing is rolled out", generation, now)
    return {"observedGeneration": generation, "conditions": conditions}


def status_patch(current: dict[str, Any], new: dict[str, Any]) -> dict[str, Any] | None:
    """The keys of ``new`` whose values differ from ``current`` (a merge patch), or None."""
    patch = {k: v for k, v in new.items() if current.get(k) != v}
    if "memory" in patch and isinstance(current.get("memory"), dict):
        # Merge-patch semantics: a key that disappeared must be nulled explicitly.
        for key in current["memory"]:
            patch["memory"].setdefault(key, None)
    return patch or None


def status_events(current: dict[str, Any], new: dict[str, Any]) -> list[Event]:
    """Events for the condition transitions between two statuses."""
    old_c, new_c = current.get("conditions") or [], new.get("conditions") or []
    events: list[Event] = []

    def changed(type_: str) -> dict[str, Any] | None:
        before, after = get_condition(old_c, type_), get_condition(new_c, type_)
        if after is None:
            return None
        if before is None or (before.get("status"), before.get("reason")) != (after["status"], after["reason"]):
            return after
        return None

    fits = changed("MemoryFits")
    if fits is not None and fits["status"] == "False":
        events.append(Event("Warning", "MemoryDoesNotFit", fits["message"]))
    elif fits is not None and fits["status"] == "Unknown":
        events.append(Event("Normal", "MemoryFitUnknown", fits["message"]))
    ready = changed("Ready")
    if ready is not None and ready["reason"] == "InvalidSpec":
        events.append(Event("Warning", "InvalidSpec", ready["message"]))
    progressing = changed("Progressing")
    if progressing is not None and progressing["reason"] == "RolloutComplete":
        events.append(Event("Normal", "RolloutComplete", progressing["message"]))
    degraded = changed("Degraded")
    if degraded is not None and degraded["status"] == "True":
        events.append(Event("Warning", degraded["reason"], degraded["message"]))
    return events
