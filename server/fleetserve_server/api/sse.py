"""Server-Sent Events framing, the streamed answer and the OpenAPI response declarations shared by the
generation routes."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi.responses import StreamingResponse

from fleetserve_server.api.errors import APIError
from fleetserve_server.api.generation import GenerationRun
from fleetserve_server.api.protocol import ErrorResponse, StreamOptions, UsageInfo
from fleetserve_server.engine.interfaces import RequestOutputDelta

DONE = "data: [DONE]\n\n"

# `stream: true` answers 200 with text/event-stream; declared so that schema
# checkers accept either content type. The event-stream schema describes one
# event (schemathesis validates each parsed event against it): its `data` is a
# JSON chunk, an error object, or `[DONE]`.
SSE_EVENT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"data": {"type": "string"}, "event": {"type": "string"}, "id": {"type": "string"},
                   "retry": {"type": "integer"}},
    "required": ["data"],
}
STREAM_200: dict[int | str, dict[str, Any]] = {
    200: {"content": {"text/event-stream": {"schema": SSE_EVENT_SCHEMA}},
          "description": "JSON, or Server-Sent Events ending in `data: [DONE]` when `stream` is true"},
}

ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse, "description": description}
    for status, description in (
        (400, "invalid request (the message names the parameter)"),
        (401, "missing or wrong API key"),
        (413, "the request body is over the server's limit (--max-request-bytes)"),
        (429, "the waiting queue is full; see Retry-After"),
        (500, "internal error (never caused by client input)"),
        (503, "the model is loading or the server is draining"),
    )
}


def sse_event(json_text: str) -> str:
    return f"data: {json_text}\n\n"


def sse_error(exc: APIError) -> str:
    """An error after the stream started: OpenAI's SDK raises on a `data: {"error": ...}` event."""
    body = exc.response().body
    return sse_event(bytes(body).decode())


def stream_response(run: GenerationRun, stream_options: StreamOptions | None, *,
                    delta_event: Callable[[RequestOutputDelta], str], usage_event: Callable[[UsageInfo], str],
                    opening: str | None = None) -> StreamingResponse:
    """The answer to ``stream: true``: SSE comments while the request is still queued (see
    ``GenerationRun.first_pending``), ``opening`` if any, one event per delta that carries text or the
    finish reason, the usage event if ``stream_options.include_usage``, then ``[DONE]``; an engine error
    after the first token becomes an error event followed by ``[DONE]``."""
    include_usage = bool(stream_options and stream_options.include_usage)

    async def events() -> AsyncIterator[str]:
        if run.first_pending:
            # Queued: headers and a comment now, then a comment every few seconds, so proxies with
            # header or idle timeouts keep the stream open (SSE clients ignore comment lines).
            yield ": queued\n\n"
            while not await run.wait_first(run.sse_keepalive_seconds):
                yield ": keep-alive\n\n"
        if opening is not None:
            yield opening
        failed: APIError | None = None
        try:
            # aclosing: whatever ends this loop, the run's iterator is closed now (its request is
            # released and, if unfinished, aborted), not whenever it is garbage-collected.
            async with contextlib.aclosing(run.deltas()) as deltas:
                async for delta in deltas:
                    if failed is None and (delta.text or delta.finish_reason is not None or delta.logprobs):
                        try:
                            event = delta_event(delta)
                        except APIError as exc:  # e.g. the final delta of an aborted request
                            failed = exc  # keep draining: the run then ends normally, engine state freed
                            continue
                        yield event
        except APIError as exc:
            failed = exc
        if failed is not None:
            yield sse_error(failed)
            yield DONE
            return
        if include_usage:
            yield usage_event(run.usage)
        yield DONE

    return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
