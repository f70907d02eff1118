"""Observe the cluster for one LLMDeployment, plan, and carry the plan out.

:func:`reconcile` is the one entry point the handlers call. It is idempotent:
the plan applies only children whose applied-hash differs and patches only
status keys that changed, so calling it on every event costs reads, not writes.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from pydantic import ValidationError

from .. import metrics
from ..api.spec import spec_from_body
from ..kube import Kube, KubeError
from ..resources.labels import LABEL_MANAGED_BY, MANAGED_BY, selector_string
from ..status.conditions import get_condition
from ..status.monitoring import MonitoringFailure, monitoring_status
from .locks import coalescing_lock, cr_lock
from .plan import (
    CHILD_KINDS,
    MONITORING_KINDS,
    ROUTER_SLOTS,
    MonitoringPlan,
    Observed,
    Plan,
    child_name,
    plan,
    slot_kind,
)

log = logging.getLogger(__name__)

MONITORING_GROUP = "monitoring.coreos.com/v1"
MONITORING_CACHE_SECONDS = 60.0


@dataclass
class _MonitoringCache:
    """Whether the Prometheus Operator CRDs exist, re-checked at most once a minute."""

    kinds: frozenset[str] = frozenset()
    checked_at: float = -1e9
    lock: threading.Lock = field(default_factory=threading.Lock)

    def get(self, kube: Kube) -> frozenset[str]:
        with self.lock:
            if time.monotonic() - self.checked_at > MONITORING_CACHE_SECONDS:
                self.kinds = kube.served_kinds(MONITORING_GROUP) & MONITORING_KINDS
                self.checked_at = time.monotonic()
            return self.kinds


monitoring_cache = _MonitoringCache()
_readers = ThreadPoolExecutor(max_workers=16, thread_name_prefix="observe")


def _router_children_possible(cr: dict[str, Any]) -> bool:
    """Whether the router's children may exist: it is on, or it was (RouterReady is in the status
    until the reconcile that deletes them). Otherwise their reads are skipped."""
    router = (cr.get("spec") or {}).get("router") or {}
    return bool(router.get("enabled")) or get_condition(
        (cr.get("status") or {}).get("conditions"), "RouterReady") is not None


def observe(kube: Kube, cr: dict[str, Any]) -> Observed:
    """Read every child by name, the server pods by label, and which monitoring kinds exist."""
    meta = cr["metadata"]
    name, namespace = meta["name"], meta["namespace"]
    kinds = monitoring_cache.get(kube)
    router = _router_children_possible(cr)
    wanted = [k for k in CHILD_KINDS if (k not in MONITORING_KINDS or k in kinds) and (router or k not in ROUTER_SLOTS)]
    # The reads are independent: issue them together (one round trip of latency, not six).
    futures = {slot: _readers.submit(kube.get, slot_kind(slot), namespace, child_name(slot, name)) for slot in wanted}
    # The server pods only (the router's pods carry another app.kubernetes.io/name).
    pods = _readers.submit(kube.list, "Pod", namespace, f"{selector_string(name)},{LABEL_MANAGED_BY}={MANAGED_BY}")
    children: dict[str, dict[str, Any] | None] = {kind: None for kind in CHILD_KINDS}
    unreadable: dict[str, tuple[int, str, str]] = {}
    for kind, future in futures.items():
        try:
            children[kind] = future.result()
        except KubeError as exc:
            if kind not in MONITORING_KINDS:
                raise
            unreadable[kind] = (exc.status, exc.reason, exc.message)  # optional: never blocks the rest
    return Observed(children=children, pods=pods.result(), monitoring_kinds=kinds, unreadable=unreadable)


def execute(kube: Kube, cr: dict[str, Any], result: Plan, now: datetime | None = None) -> None:
    """Apply, delete, the optional children, patch status, post events — in that order, so
    status describes what exists.

    A failure of a core child raises (the caller retries or reports it); a failure of an
    optional child (ServiceMonitor, PrometheusRule: a 403 where the chart grants no monitoring
    verbs, a 404 when their CRD just went, a conflict, an admission webhook's refusal) only
    becomes ``MonitoringReady=False`` with the API's reason and a Warning event: monitoring
    never blocks serving, nor the rest of the status.
    """
    meta = cr["metadata"]
    for obj in result.apply:
        kube.apply(obj)
        log.info("applied %s %s/%s", obj["kind"], meta["namespace"], obj["metadata"]["name"])
    for obj in result.delete:
        kube.delete(obj)
        log.info("deleted %s %s/%s", obj["kind"], meta["namespace"], obj["metadata"]["name"])
    if result.monitoring is not None and not result.invalid:
        failures = _execute_monitoring(kube, cr, result.monitoring)
        patch, event = monitoring_status(cr, result.monitoring, failures, result.status, now or datetime.now(UTC))
        result.status = patch
        if event is not None:
            result.events.append(event)
    if result.status is not None:
        kube.patch_status("LLMDeployment", meta["namespace"], meta["name"], result.status)
    for event in result.events:
        try:
            kube.post_event(cr, event.type, event.reason, event.message)
        except KubeError as exc:  # an event lost is not worth a failed reconcile
            log.warning("could not post event %s: %s", event.reason, exc)


def _execute_monitoring(kube: Kube, cr: dict[str, Any], monitoring: MonitoringPlan) -> list[MonitoringFailure]:
    meta = cr["metadata"]
    failures = [MonitoringFailure(kind, meta["name"], "get", status, reason, message)
                for kind, (status, reason, message) in monitoring.unreadable.items()]
    for verb, objs in (("apply", monitoring.apply), ("delete", monitoring.delete)):
        for obj in objs:
            try:
                kube.apply(obj) if verb == "apply" else kube.delete(obj)
            except KubeError as exc:
                log.warning("%s %s %s/%s failed (monitoring is optional; serving goes on): %s",
                            verb, obj["kind"], meta["namespace"], obj["metadata"]["name"], exc)
                failures.append(MonitoringFailure(obj["kind"], obj["metadata"]["name"], verb, exc.status,
                                                  exc.reason, exc.message))
            else:
                log.info("%s %s %s/%s", "applied" if verb == "apply" else "deleted", obj["kind"],
                         meta["namespace"], obj["metadata"]["name"])
    return failures


def export_metrics(cr: dict[str, Any], result: Plan) -> None:
    """Set the LLMDeployment's status series from the status as patched by ``result``.

    Runs after every executed plan, also a converged one (no patch), so a
    restarted operator exports every fleet on its first reconcile.
    ``desired_replicas`` is spec.replicas only with autoscaling off: with it on,
    the autoscaler sets the same series from its decision. An invalid spec
    updates readiness and conditions, not the spec-derived series.
    """
    meta = cr["metadata"]
    status = {**(cr.get("status") or {}), **(result.status or {})}
    conditions = {
        str(c["type"]): str(c.get("status") or "Unknown")
        for c in status.get("conditions") or [] if isinstance(c, dict) and c.get("type")
    }
    max_replicas = desired = None
    if not result.invalid:
        try:
            spec = spec_from_body(cr)
        except ValidationError:  # plan() validated the same body; kept for safety, not expected
            spec = None
        if spec is not None:
            auto = spec.autoscaling
            max_replicas = auto.max_replicas if auto.enabled else spec.replicas
            desired = None if auto.enabled else spec.replicas
    metrics.export_fleet(
        meta["namespace"], meta["name"],
        ready_replicas=int(status.get("readyReplicas") or 0),
        conditions=conditions, max_replicas=max_replicas, desired_replicas=desired,
    )


@contextlib.contextmanager
def _held(lock: threading.Lock) -> Iterator[bool]:
    with lock:
        yield True


def reconcile(
    kube: Kube, namespace: str, name: str, now: datetime | None = None, coalesce: bool = False
) -> Plan | None:
    """Bring one LLMDeployment's children and status in line with its spec.

    Returns the plan that was executed, or None when the object is gone or
    being deleted (garbage collection removes the children) — or, with
    ``coalesce``, when another reconcile of it is already waiting to run. Raises
    :class:`KubeError` for API failures; the caller decides about retries.
    """
    with coalescing_lock(namespace, name) if coalesce else _held(cr_lock(namespace, name)) as held:
        if not held:
            return None
        cr = kube.get("LLMDeployment", namespace, name)
        if cr is None or (cr.get("metadata") or {}).get("deletionTimestamp"):
            return None
        observed = observe(kube, cr)
        now = now or datetime.now(UTC)
        result = plan(cr, observed, now)
        execute(kube, cr, result, now)
        export_metrics(cr, result)
        return result
