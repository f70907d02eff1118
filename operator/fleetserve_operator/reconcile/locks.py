"""One lock per LLMDeployment, shared by every writer of its status in this process.

Kopf serializes handlers per object, but the operator also reconciles an
LLMDeployment from its children's events and the autoscaler writes the same
status; holding :func:`cr_lock` around read-compute-write keeps them from
erasing each other's condition changes. Sync handlers only (they run in
kopf's thread pool); async code must use ``asyncio.to_thread``.
"""

from __future__ import annotations

import threading

_guard = threading.Lock()
_locks: dict[tuple[str, str], threading.Lock] = {}


def cr_lock(namespace: str, name: str) -> threading.Lock:
    """The lock of one LLMDeployment (created on first use, kept for the process's life)."""
    with _guard:
        lock = _locks.get((namespace, name))
        if lock is None:
            lock = _locks[(namespace, name)] = threading.Lock()
        return lock


def forget(namespace: str, name: str) -> None:
    """Drop the lock of a deleted LLMDeployment."""
    with _guard:
        _locks.pop((namespace, name), None)
