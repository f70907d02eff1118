"""The approximate prefix index: which replica probably holds which prompt prefix in its KV cache."""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Iterable


class PrefixIndex:
    """Chained chunk hashes -> the replicas that served them, with the server's idle TTL.

    Invariants:
      * an entry ``(hash, replica)`` exists only if ``replica`` was sent a prompt with that chunk
        hash less than ``ttl_seconds`` ago (``record``) and was not forgotten since (a new cache
        epoch, the replica's removal, or the server's ground truth saying it had nothing);
      * at most ``max_entries`` hashes are kept, least recently used dropped first;
      * because hashes are chained, a replica credited with chunk i of a prompt was also sent
        chunks 0..i-1 — ``match`` counts only leading runs, as the server's cache does.
    """

    def __init__(self, ttl_seconds: float, *, max_entries: int = 500_000,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if ttl_seconds <= 0:
            raise ValueError(f"ttl_seconds must be > 0, got {ttl_seconds}")
        if max_entries < 1:
            raise ValueError(f"max_entries must be >= 1, got {max_entries}")
        self.ttl_seconds = ttl_seconds
        self.max_entries = max_entries
        self.clock = clock
        self._entries: OrderedDict[bytes, dict[str, float]] = OrderedDict()  # LRU first

    def __len__(self) -> int:
        return len(self._entries)

    def match(self, hashes: list[bytes], replicas: Iterable[str] | None = None) -> dict[str, int]:
        """For each replica (of ``replicas`` if given), how many leading chunks of ``hashes`` it holds."""
        now = self.clock()
        alive: set[str] | None = set(replicas) if replicas is not None else None
        counts: dict[str, int] = {}
        for i, h in enumerate(hashes):
            holders = self._entries.get(h)
            if not holders:
                break
            fresh = {r for r, used in holders.items() if now - used < self.ttl_seconds}
            alive = fresh if alive is None else alive & fresh
            if not alive:
                break
            for replica in alive:
                counts[replica] = i + 1
        return counts

    def record(self, replica: str, hashes: list[bytes]) -> None:
        """``replica`` was sent a prompt with these chunks: it will hold them (refreshes their TTL)."""
        now = self.clock()
        for h in hashes:
            holders = self._entries.get(h)
            if holders is None:
                holders = self._entries[h] = {}
            else:
                self._entries.move_to_end(h)
            holders[replica] = now
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    def forget_chain(self, replica: str, hashes: list[bytes], start: int = 0) -> None:
        """The server says ``replica`` does not hold ``hashes[start:]``: drop that credit."""
        for h in hashes[start:]:
            holders = self._entries.get(h)
            if holders is not None:
                holders.pop(replica, None)
                if not holders:
                    del self._entries[h]

    def last_used(self, replica: str, chunk: bytes) -> float | None:
        holders = self._entries.get(chunk)
        return holders.get(replica) if holders else None

    def forget_older(self, replica: str, when: float) -> int:
        """Drop ``replica``'s credit last used at or before ``when``. The server evicts least recently
        used blocks first, so when a prefix used at ``when`` is gone, older ones are gone too."""
        dropped = 0
        for h in list(self._entries):
            holders = self._entries[h]
            used = holders.get(replica)
            if used is not None and used <= when:
                del holders[replica]
                dropped += 1
                if not holders:
                    del self._entries[h]
        return dropped

    def forget_replica(self, replica: str) -> int:
        """Drop everything credited to ``replica`` (its cache restarted or it is gone); returns how many."""
        dropped = 0
        for h in list(self._entries):
            holders = self._entries[h]
            if holders.pop(replica, None) is not None:
                dropped += 1
                if not holders:
                    del self._entries[h]
        return dropped

    def expire(self) -> int:
        """Drop credit older than the TTL; returns how many hashes went away entirely."""
        now = self.clock()
        gone = 0
        for h in list(self._entries):
            holders = self._entries[h]
            for replica in [r for r, used in holders.items() if now - used >= self.ttl_seconds]:
                del holders[replica]
            if not holders:
                del self._entries[h]
                gone += 1
        return gone
