"""The operator's own /metrics and /healthz, served on ``--metrics-port`` (default 8080).

Only this module imports prometheus_client. The HTTP server runs on kopf's
event loop (aiohttp, which kopf already depends on), so a wedged loop also
fails the liveness probe.
"""

from __future__ import annotations

import logging
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

log = logging.getLogger(__name__)

DEFAULT_METRICS_PORT = 8080

REGISTRY = CollectorRegistry(auto_describe=True)
RECONCILES = Counter(
    "fleetserve_operator_reconciles_total",
    "Reconciles of LLMDeployments, by what triggered them and how they ended",
    ["trigger", "result"], registry=REGISTRY,
)
ERRORS = Counter(
    "fleetserve_operator_reconcile_errors_total",
    "Failed reconciles, by error class (retriable API errors, permanent errors, bugs)",
    ["error"], registry=REGISTRY,
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
MANAGED = Gauge(
    "fleetserve_operator_managed_llmdeployments",
    "LLMDeployments this operator currently watches",
    registry=REGISTRY,
)

# The built-in autoscaler's series (fed by fleetserve_operator.autoscaler.controller);
# `namespace`/`name` name the LLMDeployment, one series per fleet.
AUTOSCALER_DESIRED_REPLICAS = Gauge(
    "fleetserve_operator_desired_replicas",
    "Replicas the autoscaler last decided on",
    ["namespace", "name"], registry=REGISTRY,
)
AUTOSCALER_QUEUE_LENGTH = Gauge(
    "fleetserve_operator_observed_queue_length",
    "Waiting + running requests over the fleet's ready pods at the last scrape",
    ["namespace", "name"], registry=REGISTRY,
)
AUTOSCALER_KV_CACHE_USAGE = Gauge(
    "fleetserve_operator_observed_kv_cache_usage",
    "Mean KV-cache usage (0..1) of the fleet's ready pods at the last scrape",
    ["namespace", "name"], registry=REGISTRY,
)
AUTOSCALER_SCALE_EVENTS = Counter(
    "fleetserve_operator_scale_events_total",
    "Fleet size changes made by the autoscaler, by direction (up, down)",
    ["namespace", "name", "direction"], registry=REGISTRY,
)
AUTOSCALER_SCRAPE_ERRORS = Counter(
    "fleetserve_operator_scrape_errors_total",
    "Pod /metrics scrapes that gave no usable numbers, by reason "
    "(timeout, connection, http_status, parse, missing_metric)",
    ["namespace", "name", "reason"], registry=REGISTRY,
)


def render() -> bytes:
    return generate_latest(REGISTRY)


async def start_http_server(port: int, host: str = "0.0.0.0") -> Any:
    """Serve /healthz and /metrics; returns the aiohttp runner (call ``cleanup()`` to stop)."""
    from aiohttp import web

    async def healthz(_: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def metrics(_: web.Request) -> web.Response:
        return web.Response(body=render(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    log.info("operator /healthz and /metrics on %s:%d", host, port)
    return runner
