"""Server-Sent Events framing and the OpenAPI response declarations shared by the generation routes."""

from __future__ import annotations

from typing import Any

from fleetserve_server.api.errors import APIError
from fleetserve_server.api.protocol import ErrorResponse

DONE = "data: [DONE]\n\n"

# `stream: true` answers 200 with text/event-stream; declared so that schema
# checkers accept either content type.
STREAM_200: dict[int | str, dict[str, Any]] = {
    200: {"content": {"text/event-stream": {"schema": {"type": "string"}}},
          "description": "JSON, or Server-Sent Events ending in `data: [DONE]` when `stream` is true"},
}

ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse, "description": description}
    for status, description in (
        (400, "invalid request (the message names the parameter)"),
        (401, "missing or wrong API key"),
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
