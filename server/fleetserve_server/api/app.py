"""The app factory: FastAPI routes over an ``EngineClient``, plus request ids and API-key checks.

``create_app(engine, ...)`` with an engine is ready at once (what the unit
tests do with a fake engine). ``create_app(None, ...)`` starts in the LOADING
phase (every generation route answers 503) and the server attaches the engine
when the model is loaded and warmed up::

    app = create_app(None, served_name="m")
    ...
    app.state.fleetserve.state.attach(engine, tokenizer, model_info)
    app.state.fleetserve.state.mark_ready()
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import re
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from fleetserve_server.api import chat, completions, health, models
from fleetserve_server.api.context import REQUEST_ID_HEADER, APIContext
from fleetserve_server.api.errors import APIError, install_error_handlers
from fleetserve_server.api.logs import RequestLogger
from fleetserve_server.api.state import ModelInfo, ServerState, Tokenizer, engine_version
from fleetserve_server.engine.interfaces import EngineClient, EngineStats
from fleetserve_server.metrics import ServerMetrics

log = logging.getLogger("fleetserve.server")

# A client's id is echoed only if it is a sane header value; otherwise we mint one.
_REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._:/+=@-]{1,128}$")
# Only the OpenAI API needs the key; probes, scrapers and the schema stay open.
_PROTECTED_PREFIX = "/v1/"


def create_app(
    engine: EngineClient | None,
    *,
    served_name: str,
    tokenizer: Tokenizer | None = None,
    model: ModelInfo | None = None,
    api_key: str | None = None,
    log_prompts: bool = False,
    stats_refresh_interval: float = 2.0,
) -> FastAPI:
    """Build the HTTP app; see the module docstring for the two ways to start it."""
    state = ServerState()
    metrics = ServerMetrics(served_name, lambda: _stats_or_none(state))
    ctx = APIContext(state=state, metrics=metrics, request_log=RequestLogger(served_name, log_prompts),
                     api_key=api_key)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # The engine buffers per-step batch sizes until the next snapshot: drain them regularly
        # even when nobody scrapes, so the buffer stays small and the histogram stays complete.
        task = asyncio.create_task(_refresh_loop(metrics, stats_refresh_interval))
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    app = FastAPI(
        title="fleetserve",
        version=engine_version(),
        description="OpenAI-compatible inference server (continuous batching, paged KV cache).",
        lifespan=lifespan,
    )
    app.state.fleetserve = ctx
    install_error_handlers(app, metrics.observe_rejected)
    for module in (chat, completions, models, health):
        app.include_router(module.router)
    # Outermost first: the request id must be on every response, 401s included.
    app.add_middleware(AuthMiddleware, ctx=ctx)
    app.add_middleware(RequestIdMiddleware)
    if engine is not None:
        if tokenizer is None or model is None:
            raise ValueError("create_app(engine, ...) needs tokenizer= and model= as well")
        attach(ctx, engine, tokenizer, model)
        state.mark_ready()
    return app


def attach(ctx: APIContext, engine: EngineClient, tokenizer: Tokenizer, model: ModelInfo,
           *, weights_bytes: int = 0, kv_cache_bytes: int = 0) -> None:
    """Bind the loaded engine to the app and publish its static facts as metrics."""
    ctx.state.attach(engine, tokenizer, model)
    ctx.metrics.set_model(quantization=model.quantization, dtype=model.dtype, max_model_len=model.max_model_len,
                          weights_bytes=weights_bytes, kv_cache_bytes=kv_cache_bytes)


def _stats_or_none(state: ServerState) -> EngineStats | None:
    return state.serving.engine.stats() if state.serving is not None else None


async def _refresh_loop(metrics: ServerMetrics, interval: float) -> None:
    while True:
        await asyncio.sleep(interval)
        try:
            metrics.refresh()
        except Exception:  # a failing snapshot must not kill the loop; /health reports the engine
            log.exception("engine stats snapshot failed")


class RequestIdMiddleware:
    """Every response carries ``X-Request-Id``: the client's if it sent a sane one, else a new one."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        sent = _header(scope, REQUEST_ID_HEADER)
        request_id = sent if sent and _REQUEST_ID_RE.match(sent) else uuid.uuid4().hex
        scope["fleetserve.request_id"] = request_id

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"x-request-id"]
                headers.append((b"x-request-id", request_id.encode()))
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_id)


class AuthMiddleware:
    """With an API key configured, ``/v1/*`` needs ``Authorization: Bearer KEY``.

    /health, /ready, /metrics and /openapi.json stay open: kubelet probes and
    Prometheus carry no key.
    """

    def __init__(self, app: ASGIApp, ctx: APIContext) -> None:
        self.app = app
        self.ctx = ctx

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        key = self.ctx.api_key
        if scope["type"] != "http" or key is None or not scope["path"].startswith(_PROTECTED_PREFIX):
            await self.app(scope, receive, send)
            return
        auth = _header(scope, "authorization") or ""
        scheme, _, token = auth.partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), key.encode()):
            await self.app(scope, receive, send)
            return
        self.ctx.metrics.observe_rejected("unauthorized")
        message = ("missing API key: send the header 'Authorization: Bearer <key>'" if not auth
                   else "invalid API key in the Authorization header")
        response = APIError(401, message, code="invalid_api_key",
                            headers={"WWW-Authenticate": "Bearer"}).response()
        await response(scope, receive, send)


def _header(scope: Scope, name: str) -> str | None:
    wanted = name.encode()
    for key, value in scope.get("headers", []):
        if key.lower() == wanted:
            try:
                return str(value.decode("latin-1"))
            except UnicodeDecodeError:
                return None
    return None


def app_context(app: Any) -> APIContext:
    ctx: APIContext = app.state.fleetserve
    return ctx
