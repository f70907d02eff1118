"""Pending prefill: a dispatched request's uncached prompt chunks, counted on its replica until the
replica answers with its first output (scoring.py steers new requests by it).

A request's chunks go on ``Replica.pending_prefill`` when it is dispatched and come off exactly once
(``PendingPrefill.done``): at its first output event for a streamed answer (``FirstEvent``), at the
response headers for any other answer (a non-streamed answer's headers come with the whole answer:
its prompt counts until then), and in any case when the dispatch ends — refused, failed, the client
gone. So the count returns to 0 whenever the router has nothing open on the replica.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from fleetserve_router.scoring import Replica

# A request's time to first output is a sample of its replica's prefill rate only when nothing was
# queued ahead of it and its prompt is long enough that the prefill, not one engine step, dominates.
MIN_SAMPLE_CHUNKS = 8
RATE_SMOOTHING = 0.3  # weight of a new sample in the replica's rate (exponential moving average)


class PrefillQueue:
    """One replica's pending prefill in dispatch order, drained at its measured prefill rate.

    The count of pending chunks (``Replica.pending_prefill``) drops only when a request's first
    output arrives, so a document dispatched seconds ago counts whole even when the replica has
    computed most of it, and a conversation's next turn was sent away from its history to recompute
    it elsewhere, which took longer than waiting would have. The engine computes queued prompts
    roughly first come, first served (chunked prefill fills each step's token budget in arrival
    order), so this drains the oldest requests first at the replica's rate: chunks per second, from
    the time to first output of requests that had nothing ahead of them. Until a first sample there
    is no drain (the whole pending count, as before)."""

    __slots__ = ("_entries", "_at", "rate")

    def __init__(self) -> None:
        self._entries: list[PendingPrefill] = []
        self._at: float | None = None
        self.rate: float | None = None  # chunks per second

    def drain(self, now: float) -> None:
        if self.rate is not None and self._at is not None and now > self._at:
            budget = self.rate * (now - self._at)
            for entry in self._entries:
                if budget <= 0.0:
                    break
                take = min(entry.remaining, budget)
                entry.remaining -= take
                budget -= take
        if self._at is None or now > self._at:
            self._at = now

    def ahead(self, now: float) -> float:
        """Chunks not computed yet by the estimate (never more than the pending count)."""
        self.drain(now)
        return sum(entry.remaining for entry in self._entries)

    def add(self, entry: PendingPrefill, now: float) -> None:
        entry.alone = self.ahead(now) <= 0.0
        self._entries.append(entry)

    def remove(self, entry: PendingPrefill, now: float, first_output: bool) -> None:
        self.drain(now)
        self._entries = [e for e in self._entries if e is not entry]
        if first_output and entry.alone and entry.size >= MIN_SAMPLE_CHUNKS:
            sample = entry.size / max(now - entry.started, 1e-3)
            self.rate = sample if self.rate is None else self.rate + RATE_SMOOTHING * (sample - self.rate)

    def __len__(self) -> int:
        return len(self._entries)


class PendingPrefill:
    """One request's share of its replica's pending prefill. Invariant: ``chunks`` is on
    ``replica.pending_prefill`` (and the request on ``queue``) until ``done()`` (idempotent) takes
    it off."""

    __slots__ = ("replica", "chunks", "size", "remaining", "started", "alone", "_changed", "_queue", "_clock")

    def __init__(self, replica: Replica, chunks: int, changed: Callable[[Replica], None],
                 queue: PrefillQueue | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.replica = replica
        self.chunks = max(chunks, 0)
        self.size = self.remaining = float(self.chunks)
        self.alone = False
        self._changed = changed
        self._clock = clock
        self.started = clock()
        self._queue = queue if self.chunks else None
        if self._queue is not None:
            self._queue.add(self, self.started)
        if self.chunks:
            replica.pending_prefill += self.chunks
            changed(replica)

    def done(self, first_output: bool = False) -> None:
        """``first_output``: the replica's first output for this request has arrived (its prefill is
        computed: a rate sample); otherwise the dispatch ended without one (refused, failed, left)."""
        if self._queue is not None:
            self._queue.remove(self, self._clock(), first_output)
            self._queue = None
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
