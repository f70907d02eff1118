"""Kubernetes-style conditions as plain camelCase dicts, ready to patch.

Invariants: at most one condition per ``type``; ``lastTransitionTime``
changes only when ``status`` changes (a new reason or message alone keeps
it), so ``kubectl describe`` says since when something has been true. The
autoscaler reuses :func:`set_condition` for ``ScalingActive``.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

Conditions = list[dict[str, Any]]

# Order in which conditions are listed (unknown types go last, in their order).
CONDITION_ORDER = ("Ready", "Progressing", "MemoryFits", "ScalingActive", "Degraded", "MonitoringReady")


def rfc3339(now: datetime | str) -> str:
    """``2026-01-02T03:04:05Z`` (seconds, UTC): the form the API server stores."""
    if isinstance(now, str):
        return now
    return now.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def get_condition(conditions: Conditions | None, type_: str) -> dict[str, Any] | None:
    """The condition of ``type_``, or None."""
    for condition in conditions or []:
        if condition.get("type") == type_:
            return condition
    return None


def set_condition(
    conditions: Conditions | None,
    type: str,  # noqa: A002 - the field is called type in every Kubernetes API
    status: str,
    reason: str,
    message: str,
    generation: int | None,
    now: datetime | str,
) -> Conditions:
    """A new list with ``type`` set; the input is not modified.

    ``status`` is "True", "False" or "Unknown" (Python booleans are accepted).
    """
    if isinstance(status, bool):
        status = "True" if status else "False"
    if status not in ("True", "False", "Unknown"):
        raise ValueError(f"condition status must be True, False or Unknown, got {status!r}")
    previous = get_condition(conditions, type)
    transition = rfc3339(now)
    if previous is not None and previous.get("status") == status and previous.get("lastTransitionTime"):
        transition = previous["lastTransitionTime"]
    new: dict[str, Any] = {
        "type": type,
        "status": status,
        "reason": reason,
        "message": message,
        "lastTransitionTime": transition,
    }
    if generation is not None:
        new["observedGeneration"] = generation
    out = [dict(c) for c in conditions or [] if c.get("type") != type]
    out.append(new)
    return sort_conditions(out)


def sort_conditions(conditions: Conditions) -> Conditions:
    """Stable, well-known order so that equal sets compare equal."""
    def key(c: dict[str, Any]) -> int:
        t = c.get("type", "")
        return CONDITION_ORDER.index(t) if t in CONDITION_ORDER else len(CONDITION_ORDER)

    return sorted(conditions, key=key)


def is_true(conditions: Conditions | None, type_: str) -> bool:
    condition = get_condition(conditions, type_)
    return condition is not None and condition.get("status") == "True"
