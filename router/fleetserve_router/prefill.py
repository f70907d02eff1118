"""Pending prefill: a dispatched request's uncached prompt chunks, counted on its replica until the
replica answers with its first output (scoring.py steers new requests by it).

A request's chunks go on ``Replica.pending_prefill`` when it is dispatched and come off exactly once
(``PendingPrefill.done``): at its first output event for a streamed answer (``FirstEvent``), at the
response headers for any other answer (a non-streamed answer's headers come with the whole answer:
its prompt counts until then), and in any case when the dispatch ends — refused, failed, the client
gone. So the count returns to 0 whenever the router has nothing open on the replica.
"""

from __future__ import annotations

from collections.abc import Callable

from fleetserve_router.scoring import Replica


class PendingPrefill:
    """One request's share of its replica's pending prefill. Invariant: ``chunks`` is on
    ``replica.pending_prefill`` until ``done()`` (idempotent) takes it off."""

    __slots__ = ("replica", "chunks", "_changed")

    def __init__(self, replica: Replica, chunks: int, changed: Callable[[Replica], None]) -> None:
        self.replica = replica
        self.chunks = max(chunks, 0)
        self._changed = changed
        if self.chunks:
            replica.pending_prefill += self.chunks
            changed(replica)

    def done(self) -> None:
        if self.chunks:
            self.replica.pending_prefill -= self.chunks
            self.chunks = 0
            self._changed(self.replica)


class FirstEvent:
    """Reads an event stream's bytes as they arrive and says when the first event that is not a
    comment begins. A fleetserve server opens a queued request's stream with SSE comments
    (``: queued``, ``: keep-alive``) and sends its first ``data:`` event with the first output."""

    __slots__ = ("_at_line_start",)

    def __init__(self) -> None:
        self._at_line_start = True

    def feed(self, chunk: bytes) -> bool:
        """True once a line that is neither blank nor a comment has started (this chunk or before)."""
        if not chunk:
            return False
        lines = chunk.split(b"\n")
        for i, line in enumerate(lines):
            if i > 0 or self._at_line_start:
                if line.rstrip(b"\r") and not line.startswith(b":"):
                    return True
        self._at_line_start = chunk.endswith(b"\n")
        return False
