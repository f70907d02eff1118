"""The children as the operator's watches last reported them: a reconcile or an autoscaler tick
reads memory instead of sending a GET per child and a LIST of the pods.

The operator watches its Deployments, Services, ConfigMaps, PodDisruptionBudgets and Pods anyway
(server-side selector ``app.kubernetes.io/managed-by=fleetserve``). Its kopf index handlers
:meth:`ChildCache.put` every object those watch streams list or change, and the child event
handlers :meth:`ChildCache.forget` the deleted ones. kopf starts no resource handler before every
kind with an index handler has had its initial listing indexed (``operator_indexed`` in kopf's
``_core/reactor/processing.py``), so the first handler marks the cache :attr:`ChildCache.synced`;
until then, and in a process without the operator running, every read goes to the API server.

What the cache cannot know, and why that is harmless:

* a write the watch has not delivered yet (the operator's own, a moment ago): before the reconcile
  writes a child because of what the cache shows, it GETs that child (``execute._confirm_writes``),
  so a stale entry costs one GET, never a second apply or a duplicate child; a status computed
  from a stale entry is overwritten by the reconcile that the newer object's watch event wakes;
* an object of a child's name without the label (someone else's) is not watched: that same GET
  finds it before anything is created, so it stays a conflict and is never taken over;
* a deletion while a watch re-listed (kopf re-lists after "410 Gone" and never reports what
  vanished meanwhile): the periodic resync reads everything from the API server and drops the
  cached objects it proved gone (:meth:`ChildCache.forget_gone`).
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Iterable, Mapping
from typing import Any


class ChildCache:
    """Watched objects by (kind, namespace) and name; thread-safe.

    Invariant: an object is held from the first watch event that lists or changes it until its
    DELETED event or a fresh read that shows its uid gone. Reads return deep copies, so no caller
    can change what another one reads.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._objects: dict[tuple[str, str], dict[str, dict[str, Any]]] = {}
        self.synced = False

    def clear(self) -> None:
        """Forget everything and read from the API server until synced again (operator start/stop)."""
        with self._lock:
            self._objects.clear()
            self.synced = False

    def put(self, body: Mapping[str, Any]) -> None:
        meta = body.get("metadata") or {}
        obj = {k: v for k, v in body.items() if k != "metadata"}
        # managedFields are the largest part of most objects, and nothing in the operator reads them.
        obj["metadata"] = {k: v for k, v in meta.items() if k != "managedFields"}
        with self._lock:
            self._objects.setdefault((str(body.get("kind")), str(meta.get("namespace"))), {})[meta["name"]] = obj

    def forget(self, body: Mapping[str, Any]) -> None:
        """A DELETED event: drop the object, unless a newer one of that name (another uid) replaced it."""
        meta = body.get("metadata") or {}
        self._drop(str(body.get("kind")), str(meta.get("namespace")), str(meta.get("name")), meta.get("uid"))

    def get(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        with self._lock:
            obj = self._objects.get((kind, namespace), {}).get(name)
        return copy.deepcopy(obj) if obj is not None else None

    def select(self, kind: str, namespace: str, labels: Mapping[str, str]) -> list[dict[str, Any]]:
        """The objects of ``kind`` in ``namespace`` carrying every one of ``labels``, by name."""
        with self._lock:
            found = [obj for name, obj in sorted(self._objects.get((kind, namespace), {}).items())
                     if labels.items() <= ((obj["metadata"].get("labels") or {}).items())]
        return copy.deepcopy(found)

    def forget_gone(self, kind: str, namespace: str, cached: Iterable[dict[str, Any]],
                    live: Iterable[dict[str, Any] | None]) -> None:
        """``cached`` was read here before a GET or LIST answered ``live``: every cached uid missing from
        the answer is gone for good (a deleted object never comes back; a new one gets a new uid).

        Only those uids are dropped, so an object the watch delivered while the read ran stays."""
        alive = {(o.get("metadata") or {}).get("uid") for o in live if o is not None}
        for obj in cached:
            meta = obj["metadata"]
            if meta.get("uid") not in alive:
                self._drop(kind, namespace, meta["name"], meta.get("uid"))

    def _drop(self, kind: str, namespace: str, name: str, uid: str | None) -> None:
        with self._lock:
            objects = self._objects.get((kind, namespace), {})
            held = objects.get(name)
            if held is not None and held["metadata"].get("uid") == uid:
                del objects[name]


CHILDREN = ChildCache()
