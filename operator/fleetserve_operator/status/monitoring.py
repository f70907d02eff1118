"""The ``MonitoringReady`` condition: how the optional children (ServiceMonitor,
PrometheusRule) fared, apart from everything that serves.

``True/Applied`` when every requested object exists as planned;
``True/NotRequested`` when ``spec.monitoring`` turns both off;
``False/PrometheusOperatorNotInstalled`` when their CRDs are absent (no event:
a normal cluster); ``False`` with the API server's own reason (``Forbidden``,
``NotFound``, ``Invalid``, ``Conflict``, ...) when a write failed, or
``Conflict`` when an object of that name belongs to someone else — with a
Warning event on the transition.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

from ..events import Event
from .conditions import get_condition, set_condition

if TYPE_CHECKING:
    from ..reconcile.plan import MonitoringPlan

MONITORING_READY = "MonitoringReady"
EVENT_REASON = "MonitoringFailed"


@dataclass(frozen=True)
class MonitoringFailure:
    """One refused write of an optional child, as the API server answered it."""

    kind: str
    name: str
    verb: str
    status: int
    reason: str
    message: str

    def describe(self) -> str:
        hint = ""
        if self.status == 403:
            hint = (" (grant the operator's service account get/create/patch/delete on "
                    f"monitoring.coreos.com {self.kind.lower()}s, e.g. the chart's monitoring RBAC)")
        return f"{self.verb} {self.kind} {self.name}: HTTP {self.status} {self.reason}: {self.message}{hint}"


def _condition(monitoring: MonitoringPlan, failures: list[MonitoringFailure]) -> tuple[str, str, str]:
    if failures:
        first = failures[0]
        reason = first.reason or f"HTTP{first.status}"
        text = "; ".join([*(f.describe() for f in failures), *monitoring.conflicts])
        return "False", reason, f"{text}. Serving is not affected; the operator retries on every resync"
    if monitoring.conflicts:
        return "False", "Conflict", "; ".join(monitoring.conflicts) + "; delete it or turn it off in spec.monitoring"
    if not monitoring.requested:
        return "True", "NotRequested", "spec.monitoring turns off the ServiceMonitor and the PrometheusRule"
    missing = [k for k in monitoring.requested if k not in monitoring.wanted]
    if missing and not monitoring.wanted:
        return ("False", "PrometheusOperatorNotInstalled",
                f"no {' or '.join(missing)} CRD in the cluster (monitoring.coreos.com/v1): nothing to create")
    applied = ", ".join(monitoring.wanted)
    extra = f"; no {' or '.join(missing)} CRD in the cluster" if missing else ""
    return "True", "Applied", f"{applied} in place{extra}"


def monitoring_status(cr: dict[str, Any], monitoring: MonitoringPlan, failures: list[MonitoringFailure],
                      patch: dict[str, Any] | None, now: datetime) -> tuple[dict[str, Any] | None, Event | None]:
    """``patch`` (the plan's status patch) with MonitoringReady set, and the Warning for a new failure."""
    current = cr.get("status") or {}
    generation = int(cr["metadata"].get("generation") or 0)
    base = (patch or {}).get("conditions", current.get("conditions") or [])
    status, reason, message = _condition(monitoring, failures)
    conditions = set_condition(base, MONITORING_READY, status, reason, message, generation, now)
    before = get_condition(current.get("conditions"), MONITORING_READY) or {}
    out = dict(patch or {})
    if conditions != (current.get("conditions") or []):
        out["conditions"] = conditions
    event = None
    failed = status == "False" and reason != "PrometheusOperatorNotInstalled"
    if failed and (before.get("status"), before.get("reason")) != (status, reason):
        event = Event("Warning", EVENT_REASON, message)
    return out or None, event
