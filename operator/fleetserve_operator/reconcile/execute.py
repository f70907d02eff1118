"""Observe the cluster for one LLMDeployment, plan, and carry the plan out.

:func:`reconcile` is the one entry point the handlers call. It is idempotent:
the plan applies only children whose applied-hash differs and patches only
status keys that changed, so calling it on every event costs reads, not writes; and once the
operator's watches have listed the children (:mod:`.cache`), the reads are the LLMDeployment's
GET and those of the unwatched kinds (the router's account objects, the monitoring objects).
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
from ..resources.labels import LABEL_MANAGED_BY, MANAGED_BY, selector_labels
from ..status.conditions import get_condition
from ..status.monitoring import MonitoringFailure, monitoring_status
from .cache import CHILDREN, ChildCache
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


# Child kinds the operator watches (handlers.CHILD_WATCHES, with the pods): a synced cache answers for them.
WATCHED_KINDS = frozenset({"ConfigMap", "Service", "Deployment", "PodDisruptionBudget"})


def observe(kube: Kube, cr: dict[str, Any], cache: ChildCache | None = None, fresh: bool = False) -> Observed:
    """Read every child by name, the server pods by label, and which monitoring kinds exist.

    With a synced ``cache`` the watched kinds and the pods come from it, without a request; only
    the router's account objects and the monitoring kinds are read by GET. ``fresh`` (the resync:
    the safety net must not trust what it repairs) reads everything from the API server, and drops
    the cached objects those reads prove gone.
    """
    meta = cr["metadata"]
    name, namespace = meta["name"], meta["namespace"]
    kinds = monitoring_cache.get(kube)
    router = _router_children_possible(cr)
    wanted = [k for k in CHILD_KINDS if (k not in MONITORING_KINDS or k in kinds) and (router or k not in ROUTER_SLOTS)]
    pod_labels = {**selector_labels(name), LABEL_MANAGED_BY: MANAGED_BY}  # the server pods, not the router's
    synced = cache is not None and cache.synced
    watched = [k for k in wanted if slot_kind(k) in WATCHED_KINDS] if synced else []
    known = {slot: cache.get(slot_kind(slot), namespace, child_name(slot, name)) for slot in watched} if cache else {}
    known_pods = cache.select("Pod", namespace, pod_labels) if cache and synced else []
    cached = frozenset() if fresh else frozenset(watched)
    # The reads are independent: issue them together (one round trip of latency, not six).
    futures = {slot: _readers.submit(kube.get, slot_kind(slot), namespace, child_name(slot, name))
               for slot in wanted if slot not in cached}
    listed = None if synced and not fresh else _readers.submit(
        kube.list, "Pod", namespace, ",".join(f"{k}={v}" for k, v in pod_labels.items()))
    children: dict[str, dict[str, Any] | None] = {kind: None for kind in CHILD_KINDS}
    children.update({slot: known[slot] for slot in cached})
    unreadable: dict[str, tuple[int, str, str]] = {}
    for kind, future in futures.items():
        try:
            children[kind] = future.result()
        except KubeError as exc:
            if kind not in MONITORING_KINDS:
                raise
            unreadable[kind] = (exc.status, exc.reason, exc.message)  # optional: never blocks the rest
    pods = listed.result() if listed is not None else known_pods
    if cache is not None and fresh:
        for slot, obj in known.items():
            cache.forget_gone(slot_kind(slot), namespace, [obj] if obj else [], [children[slot]])
        cache.forget_gone("Pod", namespace, known_pods, pods)
    return Observed(children=children, pods=pods, monitoring_kinds=kinds, unreadable=unreadable, cached=cached)


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
    kube: Kube, namespace: str, name: str, now: datetime | None = None, coalesce: bool = False,
    fresh: bool = False, cache: ChildCache | None = CHILDREN,
) -> Plan | None:
    """Bring one LLMDeployment's children and status in line with its spec.

    Returns the plan that was executed, or None when the object is gone or
    being deleted (garbage collection removes the children) — or, with
    ``coalesce``, when another reconcile of it is already waiting to run. Raises
    :class:`KubeError` for API failures; the caller decides about retries.
    The children come from ``cache`` when it is synced, from the API server with
    ``fresh`` (see :func:`observe`).
    """
    with coalescing_lock(namespace, name) if coalesce else _held(cr_lock(namespace, name)) as held:
        if not held:
            return None
        cr = kube.get("LLMDeployment", namespace, name)
        if cr is None or (cr.get("metadata") or {}).get("deletionTimestamp"):
            return None
        observed = observe(kube, cr, cache, fresh)
        now = now or datetime.now(UTC)
        result = plan(cr, observed, now)
        if _confirm_writes(kube, cr, observed, result):
            result = plan(cr, observed, now)
        execute(kube, cr, result, now)
        export_metrics(cr, result)
        return result


def _confirm_writes(kube: Kube, cr: dict[str, Any], observed: Observed, result: Plan) -> bool:
    """GET each cached child the plan would write (create, update or delete): the cache answers for
    a settled fleet, the API server for a write. It may show the write is not needed (our own
    write the watch has not delivered yet: no second apply, no second event), or an object the
    watches never see (someone else's, unlabelled, of a child's name: a conflict, never taken over).
    Puts what it read into ``observed``; True when anything differed from the cache."""
    meta = cr["metadata"]
    touched = {(obj["kind"], obj["metadata"]["name"]) for obj in (*result.apply, *result.delete)}
    differed = False
    for slot in observed.cached:
        kind, name = slot_kind(slot), child_name(slot, meta["name"])
        if (kind, name) in touched:
            live = kube.get(kind, meta["namespace"], name)
            differed = differed or _version(live) != _version(observed.children.get(slot))
            observed.children[slot] = live
    return differed


def _version(obj: dict[str, Any] | None) -> tuple[str, str] | None:
    return None if obj is None else (obj["metadata"].get("uid"), obj["metadata"].get("resourceVersion"))
