"""GET /health (liveness), /ready (readiness), /metrics (Prometheus). Never behind the API key."""

from __future__ import annotations

import logging

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse

from fleetserve_server.api.context import get_context
from fleetserve_server.api.protocol import HealthStatus
from fleetserve_server.api.state import Phase
from fleetserve_server.metrics import CONTENT_TYPE

router = APIRouter()
log = logging.getLogger("fleetserve.server")


@router.get("/health", response_model=HealthStatus, responses={503: {"model": HealthStatus}})
async def health(request: Request) -> JSONResponse:
    """200 while the process is up and, once loaded, the engine loop is alive.

    Loading and draining are healthy (restarting would not help); a dead engine
    loop or a failed load is not.
    """
    state = get_context(request).state
    if state.load_error is not None:
        return JSONResponse(HealthStatus(status="unhealthy", detail=state.load_error).model_dump(), 503)
    if state.serving is not None:
        try:
            await state.serving.engine.check_health()
        except Exception as exc:
            log.error("health check failed: %s", exc)
            return JSONResponse(HealthStatus(status="unhealthy", detail=f"engine: {exc}").model_dump(), 503)
    return JSONResponse(HealthStatus(status="ok", detail=state.phase.value).model_dump())


@router.get("/ready", response_model=HealthStatus, responses={503: {"model": HealthStatus}})
async def ready(request: Request) -> JSONResponse:
    """200 only when the model is loaded and warmed up and the server is not draining."""
    state = get_context(request).state
    if state.phase is Phase.READY and state.serving is not None:
        try:
            await state.serving.engine.check_health()
        except Exception as exc:
            return JSONResponse(HealthStatus(status="not ready", detail=f"engine: {exc}").model_dump(), 503)
        return JSONResponse(HealthStatus(status="ready").model_dump())
    return JSONResponse(HealthStatus(status="not ready", detail=state.phase.value).model_dump(), 503)


@router.get("/metrics", response_class=Response,
            responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}},
                             "description": "Prometheus text exposition"}})
async def metrics(request: Request) -> Response:
    return Response(get_context(request).metrics.render(), media_type=CONTENT_TYPE)
