"""Hold, don't drop: requests wait here while no replica is ready, and leave in arrival order."""

from __future__ import annotations

import asyncio
import bisect
import itertools
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field


class HoldFull(Exception):
    """More requests are held than the cap allows; the caller answers 429 with Retry-After."""


@dataclass(order=True)
class Waiter:
    seq: int
    arrival: float = field(compare=False)
    event: asyncio.Event = field(compare=False, default_factory=asyncio.Event)


class HoldQueue:
    """Requests waiting for a ready replica.

    Invariants: ``len(self) <= max_held``; waiters are kept sorted by arrival (``seq``), and
    ``release`` wakes them in that order, so the first to arrive is the first to be dispatched;
    a waiter that is woken but finds no replica again re-enters at its original place.
    """

    def __init__(self, max_held: int, clock: Callable[[], float] = time.monotonic) -> None:
        if max_held < 0:
            raise ValueError(f"max_held must be >= 0, got {max_held}")
        self.max_held = max_held
        self.clock = clock
        self._waiters: list[Waiter] = []
        self._seq = itertools.count()

    def __len__(self) -> int:
        return len(self._waiters)

    def enter(self, waiter: Waiter | None = None) -> Waiter:
        """Join the queue (a re-entering ``waiter`` keeps its place); HoldFull over the cap."""
        if waiter is None:
            if len(self._waiters) >= self.max_held:
                raise HoldFull(f"{len(self._waiters)} requests are already held (the cap is {self.max_held})")
            waiter = Waiter(next(self._seq), self.clock())
        waiter.event.clear()
        bisect.insort(self._waiters, waiter)
        return waiter

    def leave(self, waiter: Waiter) -> None:
        try:
            self._waiters.remove(waiter)
        except ValueError:
            pass

    def release(self) -> int:
        """A replica turned ready: wake every held request, oldest first. Returns how many."""
        woken, self._waiters = self._waiters, []
        for waiter in woken:
            waiter.event.set()
        return len(woken)

    async def wait(self, waiter: Waiter, deadline: float, *, tick: float = 5.0,
                   on_tick: Callable[[], Awaitable[None]] | None = None) -> bool:
        """Wait until released (True) or ``deadline`` on this queue's clock passes (False, and the
        waiter has left). ``on_tick`` runs every ``tick`` seconds meanwhile (SSE keep-alives)."""
        try:
            while True:
                remaining = deadline - self.clock()
                if remaining <= 0:
                    return False
                try:
                    await asyncio.wait_for(waiter.event.wait(), timeout=min(tick, remaining))
                    return True
                except TimeoutError:
                    if on_tick is not None and deadline - self.clock() > 0:
                        await on_tick()
        finally:
            if not waiter.event.is_set():
                self.leave(waiter)
