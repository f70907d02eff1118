"""The autoscaler's part of ``LLMDeployment.status``, computed purely.

The autoscaler owns ``desiredReplicas`` (while autoscaling is on),
``autoscaler{lastScaleTime, lastDecision, observed}`` and the
``ScalingActive`` condition (see :mod:`fleetserve_operator.api.status`); the
patch built here names only those keys, and only when they changed, so the
operator's own status writes and these never erase each other.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from fleetserve_operator.api.status import observed_metrics
from fleetserve_operator.status.conditions import Conditions, get_condition, rfc3339, set_condition

from .types import Decision, FleetObservation, Limit

SCALING_ACTIVE = "ScalingActive"
REASON_DISABLED = "AutoscalingDisabled"
REASON_NO_DEPLOYMENT = "NoDeployment"
REASON_MEMORY = "MemoryDoesNotFit"


def decision_status(current: dict[str, Any], observation: FleetObservation, decision: Decision,
                    generation: int | None, now: datetime, scrape_summary: str = "",
                    waiting_for_nodes: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """The merge patch after one decision, or None when nothing changed.

    ``lastScaleTime`` and ``lastDecision`` move only when the size changes;
    ``observed`` follows every scrape (``queueLength`` is per ready replica,
    as the Queue printer column shows it; stale numbers are removed when no
    pod answered); ``waitingForNodes`` is present exactly while pods wait for a node.
    """
    auto_now: dict[str, Any] = dict(current.get("autoscaler") or {})
    auto_new = dict(auto_now)
    queue, kv = observation.queue_length, observation.kv_cache_usage
    per_replica = queue / observation.ready if queue is not None and observation.ready else None
    auto_new["observed"] = observed_metrics(per_replica, kv, observation.answered, observation.held)
    if waiting_for_nodes is not None:
        auto_new["waitingForNodes"] = waiting_for_nodes
    elif auto_now.get("waitingForNodes") is not None:
        auto_new["waitingForNodes"] = None  # merge patch: null removes it
    else:
        auto_new.pop("waitingForNodes", None)
    if decision.direction != "none":
        auto_new["lastScaleTime"] = rfc3339(now)
        auto_new["lastDecision"] = {"from": decision.current, "to": decision.desired, "reason": decision.reason}

    message = decision.reason + (f"; {scrape_summary}" if scrape_summary else "")
    active = "True" if decision.metrics_ok else "False"
    conditions = _with_condition(current, active, decision.limit.value, message, generation, now)

    patch: dict[str, Any] = {}
    if current.get("desiredReplicas") != decision.desired:
        patch["desiredReplicas"] = decision.desired
    if auto_new != auto_now:
        observed_old = auto_now.get("observed") or {}
        # merge-patch: keys that vanished from `observed` must be nulled explicitly
        auto_new["observed"] = {**{k: None for k in observed_old}, **auto_new["observed"]}
        patch["autoscaler"] = auto_new
    if conditions is not None:
        patch["conditions"] = conditions
    return patch or None


def inactive_status(current: dict[str, Any], reason: str, message: str, generation: int | None,
                    now: datetime, desired: int | None = None) -> dict[str, Any] | None:
    """``ScalingActive=False`` with ``reason`` (autoscaling off, no Deployment yet, the model does
    not fit), and ``desiredReplicas`` when ``desired`` is given; None if already so."""
    conditions = _with_condition(current, "False", reason, message, generation, now)
    patch: dict[str, Any] = {"conditions": conditions} if conditions is not None else {}
    if desired is not None and current.get("desiredReplicas") != desired:
        patch["desiredReplicas"] = desired
    return patch or None


def scaling_event(decision: Decision) -> tuple[str, str, str]:
    """(type, reason, message) of the Event for a size change."""
    reason = "ScaledUp" if decision.direction == "up" else "ScaledDown"
    return "Normal", reason, f"{decision.current} → {decision.desired} replicas: {decision.reason}"


def condition_event(current: dict[str, Any], patch: dict[str, Any] | None) -> tuple[str, str, str] | None:
    """A Warning when ScalingActive turns False because the metrics went missing."""
    if not patch or "conditions" not in patch:
        return None
    before = get_condition(current.get("conditions"), SCALING_ACTIVE) or {}
    after = get_condition(patch["conditions"], SCALING_ACTIVE) or {}
    lost = (after.get("reason") in (Limit.METRICS_UNAVAILABLE.value, Limit.ROUTER_METRICS_UNAVAILABLE.value)
            and (before.get("status"), before.get("reason")) != (after.get("status"), after.get("reason")))
    return ("Warning", str(after["reason"]), str(after.get("message", ""))) if lost else None


def _with_condition(current: dict[str, Any], status: str, reason: str, message: str, generation: int | None,
                    now: datetime) -> Conditions | None:
    old: Conditions = [dict(c) for c in current.get("conditions") or []]
    new = set_condition(old, SCALING_ACTIVE, status, reason, message, generation, now)
    return None if new == old else new
