"""Errors the engine raises to its callers (the offline API and the HTTP layer).

The HTTP layer maps them onto status codes: ``RequestValidationError`` -> 400,
``QueueFullError`` -> 429 with ``Retry-After``, ``EngineDrainingError`` and
``EngineDeadError`` -> 503; ``RequestFailedError`` -> 400 when the request's own
input caused it (``param`` set), else 500.

Fault isolation: the model runner (its sampler above all) raises
``SequenceError`` for a failure that belongs to some rows of a batch; the
engine fails those requests alone and keeps serving the others. Any other
exception from a step cannot be attributed and stops the engine.
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


class SequenceError(Exception):
    """A failure that belongs to the sequences ``seq_ids`` of a batch, not to the batch.

    Raised by the model runner (e.g. the sampler cannot seed a row's generator)
    *before* it consumed any per-row randomness, so the engine may run the
    step again without those rows and the others sample exactly what they would
    have. ``param`` names the request field at fault when it was the client's
    input (the HTTP layer answers 400 naming it); None means a server-side
    fault confined to those rows (500).
    """

    def __init__(self, seq_ids: list[int], cause: BaseException | str, *, param: str | None = None) -> None:
        self.seq_ids = list(seq_ids)
        self.cause = cause
        self.param = param
        detail = f"{type(cause).__name__}: {cause}" if isinstance(cause, BaseException) else cause
        super().__init__(f"sequence(s) {self.seq_ids}: {detail}")

    @property
    def reason(self) -> str:
        """The cause in words, without the sequence ids (what the client is told)."""
        return str(self.cause)


class GrammarError(Exception):
    """A request's ``response_format`` grammar refused its next token or reached a dead end.

    The engine fails that request alone (a server-side fault: the sampler masks the
    logits with the same grammar, so a valid run never gets here).
    """


class RequestFailedError(Exception):
    """One request failed inside the engine after admission; the engine itself is fine.

    ``param`` is set when the request's own input caused it (-> 400), else None (-> 500).
    """

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param
