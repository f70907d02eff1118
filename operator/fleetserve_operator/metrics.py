"""The operator's own /metrics, /healthz and /readyz, served on ``--metrics-port`` (default 8080).

Only this module imports prometheus_client. The HTTP server runs on kopf's
event loop (aiohttp, which kopf already depends on), so a wedged loop also
fails the liveness probe.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

if TYPE_CHECKING:
    from .health import Health

log = logging.getLogger(__name__)

DEFAULT_METRICS_PORT = 8080

REGISTRY = CollectorRegistry(auto_describe=True)

_M = TypeVar("_M", Gauge, Counter)

# Every series keyed by an LLMDeployment (`namespace`/`name`), with its label names
# in declaration order (the order remove() takes); forget_fleet drops them all.
_PER_FLEET: list[tuple[Gauge | Counter, tuple[str, ...]]] = []


def _per_fleet(kind: type[_M], name: str, documentation: str, *extra_labels: str) -> _M:
    """Declare a series labelled ``namespace``, ``name`` (the LLMDeployment), then ``extra_labels``."""
    labelnames = ("namespace", "name", *extra_labels)
    metric = kind(name, documentation, labelnames, registry=REGISTRY)
    _PER_FLEET.append((metric, labelnames))
    return metric


RECONCILES = Counter(
    "fleetserve_operator_reconciles_total",
    "Reconciles of LLMDeployments, by what triggered them and how they ended",
    ["trigger", "result"], registry=REGISTRY,
)
ERRORS = _per_fleet(
    Counter, "fleetserve_operator_reconcile_errors_total",
    "Failed reconciles of one LLMDeployment (`namespace`/`name`), by error class "
    "(api_retriable, api_rejected)",
    "error",
)
DURATION = Histogram(
    "fleetserve_operator_reconcile_duration_seconds",
    "Wall time of one reconcile (reads, plan, writes)",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10), registry=REGISTRY,
)
APPLIES = Counter(
    "fleetserve_operator_applies_total",
    "Server-side applies of child objects, by kind",
    ["kind"], registry=REGISTRY,
)
LEADER = Gauge(
    "fleetserve_operator_leader",
    "1 while this operator process reconciles (it holds the leader Lease, or runs without leader "
    "election), 0 while it waits as a standby",
    registry=REGISTRY,
)
MANAGED = Gauge(
    "fleetserve_operator_managed_llmdeployments",
    "LLMDeployments this operator currently watches",
    registry=REGISTRY,
)

# What the last reconcile saw of each LLMDeployment (set by
# fleetserve_operator.reconcile.execute after the status patch). The alert rules
# and the dashboard read these.
READY_REPLICAS = _per_fleet(
    Gauge, "fleetserve_operator_ready_replicas", "Pods of the fleet passing /ready (status.readyReplicas)"
)
MAX_REPLICAS = _per_fleet(
    Gauge, "fleetserve_operator_max_replicas",
    "Most replicas the fleet may have: autoscaling.maxReplicas, or spec.replicas with autoscaling off",
)
CONDITION = _per_fleet(
    Gauge, "fleetserve_operator_condition",
    "1 for each status condition's current status, 0 for its other statuses (True, False, Unknown)",
    "type", "status",
)
CONDITION_STATUSES = ("True", "False", "Unknown")

# The built-in autoscaler's series (fed by fleetserve_operator.autoscaler.controller),
# one series per fleet.
AUTOSCALER_DESIRED_REPLICAS = _per_fleet(
    Gauge, "fleetserve_operator_desired_replicas", "Replicas the autoscaler last decided on"
)
AUTOSCALER_QUEUE_LENGTH = _per_fleet(
    Gauge, "fleetserve_operator_observed_queue_length",
    "Waiting + running requests over the fleet's ready pods at the last scrape",
)
AUTOSCALER_KV_CACHE_USAGE = _per_fleet(
    Gauge, "fleetserve_operator_observed_kv_cache_usage",
    "Mean KV-cache usage (0..1) of the fleet's ready pods at the last scrape",
)
AUTOSCALER_SCALE_EVENTS = _per_fleet(
    Counter, "fleetserve_operator_scale_events_total",
    "Fleet size changes made by the autoscaler, by direction (up, down)",
    "direction",
)
AUTOSCALER_SCRAPE_ERRORS = _per_fleet(
    Counter, "fleetserve_operator_scrape_errors_total",
    "Pod /metrics scrapes that gave no usable numbers, by reason "
    "(timeout, connection, http_status, parse, missing_metric)",
    "reason",
)


def export_fleet(namespace: str, name: str, *, ready_replicas: int,
                 conditions: Mapping[str, str], max_replicas: int | None = None,
                 desired_replicas: int | None = None) -> None:
    """Set one LLMDeployment's status series.

    ``conditions`` maps condition type -> status. Every type gets all three
    statuses, the current one 1 and the others 0, so a transition never leaves
    a stale 1 behind (``max by (...) (... {status="False"}) == 1`` stays exact).
    ``max_replicas``/``desired_replicas`` None leaves those series as they are
    (an invalid spec says nothing new about them; with autoscaling on the
    autoscaler owns ``desired_replicas``).
    """
    READY_REPLICAS.labels(namespace, name).set(ready_replicas)
    for type_, current in conditions.items():
        for status in CONDITION_STATUSES:
            CONDITION.labels(namespace, name, type_, status).set(1 if status == current else 0)
    if max_replicas is not None:
        MAX_REPLICAS.labels(namespace, name).set(max_replicas)
    if desired_replicas is not None:
        AUTOSCALER_DESIRED_REPLICAS.labels(namespace, name).set(desired_replicas)


def forget_fleet(namespace: str, name: str) -> None:
    """Drop every per-LLMDeployment series of a deleted LLMDeployment (no dead series linger)."""
    for metric, labelnames in _PER_FLEET:
        # The label sets come from the registry's own samples: condition types and error
        # classes need no list kept in step here. A counter's _total and _created samples
        # share one label set, hence the set.
        stale = {
            tuple(sample.labels[n] for n in labelnames)
            for family in metric.collect() for sample in family.samples
            if sample.labels.get("namespace") == namespace and sample.labels.get("name") == name
        }
        for labels in stale:
            try:
                metric.remove(*labels)
            except KeyError:  # removed meanwhile by another thread
                pass


def render() -> bytes:
    return generate_latest(REGISTRY)


async def start_http_server(port: int, host: str = "0.0.0.0", health: Health | None = None) -> Any:
    """Serve /healthz, /readyz and /metrics; returns the aiohttp runner (call ``cleanup()`` to stop).

    Without ``health`` (kopf's test runner) both probes answer 200 while the event loop runs.
    """
    from aiohttp import web

    async def healthz(_: web.Request) -> web.Response:
        problems = health.problems() if health is not None else []
        if problems:
            return web.Response(status=503, text="".join(f"unhealthy: {p}\n" for p in problems))
        return web.Response(text="ok\n")

    async def readyz(_: web.Request) -> web.Response:
        ready, why = health.readiness() if health is not None else (True, "ok")
        return web.Response(status=200 if ready else 503, text=f"{why}\n")

    async def metrics(_: web.Request) -> web.Response:
        return web.Response(body=render(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    log.info("operator /healthz, /readyz and /metrics on %s:%d", host, port)
    return runner
