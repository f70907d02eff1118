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
