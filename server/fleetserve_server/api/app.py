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
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from fleetserve_server.api import chat, completions, health, models
from fleetserve_server.api.context import REQUEST_ID_HEADER, APIContext
from fleetserve_server.api.errors import APIError, install_error_handlers
from fleetserve_server.api.generation import CACHED_TOKENS_SCOPE_KEY
from fleetserve_server.api.logs import RequestLogger
from fleetserve_server.api.state import ModelInfo, ServerState, Tokenizer, engine_version
from fleetserve_server.capture import SampleCapture
from fleetserve_server.engine.interfaces import EngineClient, EngineStats
from fleetserve_server.metrics import ServerMetrics
from fleetserve_server.tracing import Tracing, TracingMiddleware

log = logging.getLogger("fleetserve.server")

# A client's id is echoed only if it is a sane header value; otherwise we mint one.
_REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._:/+=@-]{1,128}$")
# Only the OpenAI API needs the key; probes, scrapers and the schema stay open.
_PROTECTED_PREFIX = "/v1/"

# The default request body limit: room for a max_model_len prompt written the costliest way JSON
# allows (\uXXXX escapes of multi-character tokens, or token ids with separators) plus the other fields.
REQUEST_BYTES_PER_TOKEN = 32
REQUEST_BYTES_HEADROOM = 1 << 20


def default_max_request_bytes(max_model_len: int) -> int:
    """The body limit when none is configured: 1 MiB + 32 bytes per token of context (1.06 MiB at 2048)."""
    return REQUEST_BYTES_HEADROOM + REQUEST_BYTES_PER_TOKEN * max_model_len


def create_app(
    engine: EngineClient | None,
    *,
    served_name: str,
    tokenizer: Tokenizer | None = None,
    model: ModelInfo | None = None,
    api_key: str | None = None,
    log_prompts: bool = False,
    stats_refresh_interval: float = 2.0,
    max_request_bytes: int | None = None,
    first_output_grace: float = 0.25,
    sse_keepalive_seconds: float = 5.0,
    capture: SampleCapture | None = None,
    tracing: Tracing | None = None,
) -> FastAPI:
    """Build the HTTP app; see the module docstring for the two ways to start it.

    ``max_request_bytes`` bounds request bodies (413 beyond it; None = no limit). A streamed
    answer's headers go out with its first output or after ``first_output_grace`` seconds,
    whichever is first, then an SSE comment every ``sse_keepalive_seconds`` until the first token.
    ``capture`` writes a sample of finished requests (--capture-path); ``tracing`` adds a span per
    request (--otlp-endpoint); both are off (None) by default and then cost nothing.
    """
    state = ServerState()
    metrics = ServerMetrics(served_name, lambda: _stats_or_none(state))
    ctx = APIContext(state=state, metrics=metrics, request_log=RequestLogger(served_name, log_prompts, capture),
                     api_key=api_key, first_output_grace=first_output_grace,
                     sse_keepalive_seconds=sse_keepalive_seconds)

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
    from fleetserve_server.api import debug

    if debug.enabled():  # FLEETSERVE_DEBUG_MEMORY: /debug/memory for finding growth (off by default)
        debug.start_tracing()
        app.include_router(debug.router)
    # Outermost first: the request id must be on every response, 401s and 413s included;
    # an unauthenticated client must not make us read its body.
    if max_request_bytes is not None:
        app.add_middleware(BodyLimitMiddleware, ctx=ctx, max_bytes=max_request_bytes)
    app.add_middleware(AuthMiddleware, ctx=ctx)
    app.add_middleware(CacheHeadersMiddleware, ctx=ctx)
    if tracing is not None:  # inside the request id (its span carries it), around everything else
        app.add_middleware(TracingMiddleware, tracing=tracing)
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


class CacheHeadersMiddleware:
    """Every response carries ``x-fleetserve-cache-epoch`` (changes when this process's prefix cache
    starts empty: a restart or a new engine); generation responses also carry
    ``x-fleetserve-cached-tokens`` (prompt tokens found in the prefix cache) when it is known as the
    headers go out (always for non-streamed answers; for streams once the first output came within
    the first-output grace). The router corrects its prefix index from both; for a stream that
    started without the count it reads ``usage.prompt_tokens_details.cached_tokens`` from the final
    usage event instead (asking for it with ``stream_options.include_usage``)."""

    def __init__(self, app: ASGIApp, ctx: APIContext) -> None:
        self.app = app
        self.ctx = ctx

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_cache(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                headers.append((b"x-fleetserve-cache-epoch", self.ctx.state.cache_epoch.encode()))
                cached = scope.get(CACHED_TOKENS_SCOPE_KEY)
                if cached is not None:
                    headers.append((b"x-fleetserve-cached-tokens", str(int(cached)).encode()))
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_cache)


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


class BodyTooLarge(StarletteHTTPException):
    """A request body over the limit, found while reading it (FastAPI re-raises HTTPExceptions
    from body reading as they are, so the app's handler answers it in OpenAI's shape)."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, body_too_large_message(limit))


def body_too_large_message(limit: int, length: int | None = None) -> str:
    size = f" ({length} bytes)" if length is not None else ""
    return (f"the request body{size} is over this server's limit of {limit} bytes; send a shorter prompt "
            "(the limit follows --max-model-len and is set with --max-request-bytes)")


class BodyLimitMiddleware:
    """413 for a request body over ``max_bytes``: at once from ``Content-Length`` (the body is
    never read), or as soon as a chunked body's running total passes the limit."""

    def __init__(self, app: ASGIApp, ctx: APIContext, max_bytes: int) -> None:
        self.app = app
        self.ctx = ctx
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _header(scope, "content-length")
        length = int(declared) if declared and declared.strip().isdigit() else None
        if length is not None and length > self.max_bytes:
            await self._reject(scope, receive, send, length)
            return
        total = 0
        started = False

        async def limited_receive() -> Message:
            nonlocal total
            message = await receive()
            if message["type"] == "http.request":
                total += len(message.get("body", b""))
                if total > self.max_bytes:
                    raise BodyTooLarge(self.max_bytes)
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except BodyTooLarge:
            if started:
                raise
            await self._reject(scope, receive, send, None)

    async def _reject(self, scope: Scope, receive: Receive, send: Send, length: int | None) -> None:
        self.ctx.metrics.observe_rejected("invalid")
        response = APIError(413, body_too_large_message(self.max_bytes, length), param=None,
                            code="request_too_large", headers={"Connection": "close"}).response()
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
