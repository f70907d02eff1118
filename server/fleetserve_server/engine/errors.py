"""Errors the engine raises to its callers (the offline API and the HTTP layer).

The HTTP layer maps them onto status codes: ``RequestValidationError`` -> 400,
``QueueFullError`` -> 429 with ``Retry-After``, ``EngineDrainingError`` and
``EngineDeadError`` -> 503.
"""

from __future__ import annotations


class RequestValidationError(ValueError):
    """A request the engine can never serve as given.

    ``param`` names the offending field (OpenAI's ``error.param``), and the
    message names that field, the limit and the way out.
    """

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class QueueFullError(Exception):
    """The waiting queue is at ``max_queue_length``; retry after ``retry_after`` seconds."""

    def __init__(self, message: str, retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class EngineDeadError(RuntimeError):
    """The engine loop has stopped (a crash or a shutdown); no request can be served."""


class EngineDrainingError(RuntimeError):
    """The engine is draining (shutdown requested) and admits no new requests."""
