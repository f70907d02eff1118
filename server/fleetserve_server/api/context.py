"""Per-app objects the routes reach through ``request.app.state``."""

from __future__ import annotations

from dataclasses import dataclass

from starlette.requests import Request

from fleetserve_server.api.logs import RequestLogger
from fleetserve_server.api.state import ServerState
from fleetserve_server.metrics import ServerMetrics

REQUEST_ID_HEADER = "x-request-id"


@dataclass
class APIContext:
    state: ServerState
    metrics: ServerMetrics
    request_log: RequestLogger
    api_key: str | None = None
    # streamed answers: how long to wait for the first output before the headers and an SSE
    # comment go out, and the interval of keep-alive comments while a request is still queued
    first_output_grace: float = 0.25
    sse_keepalive_seconds: float = 5.0


def get_context(request: Request) -> APIContext:
    ctx: APIContext = request.app.state.fleetserve
    return ctx


def request_id_of(request: Request) -> str:
    """The X-Request-Id the middleware settled on (the client's, or a fresh one)."""
    return str(request.scope.get("fleetserve.request_id", ""))
