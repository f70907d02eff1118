"""One lock per LLMDeployment, shared by every writer of its status in this process.

Kopf serializes handlers per object, but the operator also reconciles an
LLMDeployment from its children's events and the autoscaler writes the same
status; holding :func:`cr_lock` around read-compute-write keeps them from
erasing each other's condition changes. Sync handlers only (they run in
kopf's thread pool); async code must use ``asyncio.to_thread``.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

_guard = threading.Lock()
_locks: dict[tuple[str, str], threading.Lock] = {}


def cr_lock(namespace: str, name: str) -> threading.Lock:
    """The lock of one LLMDeployment (created on first use, kept for the process's life)."""
    with _guard:
        lock = _locks.get((namespace, name))
        if lock is None:
            lock = _locks[(namespace, name)] = threading.Lock()
        return lock


_waiting: dict[tuple[str, str], int] = {}


@contextlib.contextmanager
def coalescing_lock(namespace: str, name: str) -> Iterator[bool]:
    """Hold the LLMDeployment's lock, unless another caller is already waiting for it.

    Yields True with the lock held, or False (without it) when a waiter exists:
    that waiter reads the cluster only after it gets the lock, so it sees
    everything this caller would have seen — a burst of child events costs
    one extra reconcile instead of one per event.
    """
    key = (namespace, name)
    lock = cr_lock(namespace, name)
    if not lock.acquire(blocking=False):
        with _guard:
            if _waiting.get(key, 0) > 0:
                yield False
                return
            _waiting[key] = _waiting.get(key, 0) + 1
        try:
            lock.acquire()
        finally:
            with _guard:
                _waiting[key] -= 1
    try:
        yield True
    finally:
        lock.release()


def forget(namespace: str, name: str) -> None:
    """Drop the lock of a deleted LLMDeployment."""
    with _guard:
        _locks.pop((namespace, name), None)
