"""HTTP errors in OpenAI's shape, and the mapping from engine errors to status codes.

Client input never produces a 500: pydantic validation errors, engine
``RequestValidationError`` and unsupported parameters are 400s naming the
parameter; a full queue is 429 with ``Retry-After``; loading, draining and a
dead engine are 503.
"""

from __future__ import annotations

import logging
import math
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError as FastAPIValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from fleetserve_server.api.protocol import HARMLESS_FIELDS, ErrorInfo, ErrorResponse
from fleetserve_server.engine import errors as engine_errors

log = logging.getLogger("fleetserve.server")

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "internal_server_error",
    503: "service_unavailable",
}


class APIError(Exception):
    """An error response; ``reject_reason`` (if set) is counted in fleetserve_requests_rejected_total."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
        reject_reason: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers or {}
        self.reject_reason = reject_reason

    def response(self) -> JSONResponse:
        body = ErrorResponse(error=ErrorInfo(message=self.message, type=_TYPES.get(self.status, "error"),
                                             param=self.param, code=self.code))
        return JSONResponse(body.model_dump(), status_code=self.status, headers=self.headers)


def invalid(message: str, param: str | None = None, code: str = "invalid_value") -> APIError:
    return APIError(400, message, param=param, code=code, reject_reason="invalid")


def from_engine_error(exc: Exception) -> APIError:
    """Map an exception raised by the engine client to the response the client should see."""
    if isinstance(exc, engine_errors.RequestValidationError):
        return invalid(str(exc), param=exc.param)
    if isinstance(exc, engine_errors.RequestFailedError):
        # The engine failed this request alone; its own input (param named) or a server-side fault.
        if exc.param is not None:
            return invalid(str(exc), param=exc.param)
        return APIError(500, f"the request failed in the engine: {exc}", code="internal_error")
    if isinstance(exc, engine_errors.QueueFullError):
        retry = max(1, math.ceil(exc.retry_after))
        return APIError(429, f"{exc} (the waiting queue is full; retry after {retry}s)",
                        code="queue_full", headers={"Retry-After": str(retry)}, reject_reason="queue_full")
    if isinstance(exc, engine_errors.EngineDrainingError):
        return APIError(503, "the server is draining and admits no new requests; retry on another replica",
                        code="draining", headers={"Retry-After": "1"}, reject_reason="draining")
    if isinstance(exc, engine_errors.EngineDeadError):
        return APIError(503, f"the engine has stopped: {exc}", code="engine_dead")
    if isinstance(exc, ValueError):
        # SamplingParams and other constructors raise ValueError naming the field.
        return invalid(str(exc))
    log.exception("unexpected engine error", exc_info=exc)
    return APIError(500, f"internal error: {type(exc).__name__}", code="internal_error")


def _param_from_loc(loc: tuple[Any, ...]) -> str:
    # Drop the "body" prefix FastAPI adds; pydantic's union branch names ("str", "list[int]") too.
    parts = [str(p) for p in loc if p != "body"]
    cleaned = [p for p in parts if not any(ch in p for ch in "[]") and p not in ("str", "int", "float", "bool")]
    return ".".join(cleaned) or "body"


def install_error_handlers(app: FastAPI, on_reject: Any) -> None:
    """Register handlers so every error leaves as ``{"error": {...}}``.

    ``on_reject(reason)`` is called for errors that count as rejected requests.
    """

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        if exc.reject_reason:
            on_reject(exc.reject_reason)
        return exc.response()

    @app.exception_handler(FastAPIValidationError)
    async def _validation_error(request: Request, exc: FastAPIValidationError) -> JSONResponse:
        errors = exc.errors()
        first = errors[0] if errors else {"loc": ("body",), "msg": "invalid request body"}
        param = _param_from_loc(tuple(first.get("loc", ())))
        message = f"{param}: {first.get('msg', 'invalid value')}"
        if first.get("type") == "extra_forbidden":
            message = (f"{param} is not a parameter fleetserve supports; remove it (fields accepted and "
                       f"ignored: {', '.join(sorted(HARMLESS_FIELDS))})")
        if len(errors) > 1:
            message += f" (and {len(errors) - 1} more problem(s))"
        on_reject("invalid")
        return invalid(message, param=param).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 413:  # the body limit, found while reading a chunked body
            on_reject("invalid")
            return APIError(413, str(exc.detail), code="request_too_large",
                            headers={"Connection": "close"}).response()
        return APIError(exc.status_code, str(exc.detail), code=None,
                        headers=dict(exc.headers or {})).response()

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s", request.url.path, exc_info=exc)
        return APIError(500, f"internal error: {type(exc).__name__}", code="internal_error").response()
