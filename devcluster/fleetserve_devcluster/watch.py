"""An informer for the node agent and the service proxy: list once, then watch, as client-go's reflector does.

`Informer` lists a collection (keeping the list's resourceVersion), then holds one
streaming watch from that version (`watch=1&allowWatchBookmarks=true&timeoutSeconds=...`)
on a connection of its own, and applies each event to a local cache keyed by
`namespace/name`: ADDED and MODIFIED store the object, DELETED drops it, BOOKMARK only
advances the resourceVersion (so a re-watch after the server's timeout starts from a
recent version without listing again).  It lists again when the version has expired
(HTTP 410, or an ERROR event with code 410: etcd compacted it away) and after any
other failure (a dropped connection, an ERROR event, a socket timeout), with a backoff.
A watch the server ends at its timeout is simply resumed from the last version.

Consumers read the cache (`items()`, `get()`) and wait on a `Changes` counter that
every informer sharing it bumps after its cache changed, so they react within
milliseconds instead of listing everything several times a second.  `ObjectCache`
keeps single objects (the ConfigMaps and Secrets of pods' volumes and env) the same way.
"""

from __future__ import annotations

import http.client
import json
import logging
import threading
import time
from collections import Counter
from typing import Any

from .kube import Kube, KubeError, ns_path

JsonObj = dict[str, Any]
log = logging.getLogger("fleetserve.devcluster.watch")
WATCH_TIMEOUT_S = 300  # the server ends each watch after this; the informer resumes from its version
READ_SLACK_S = 60  # a watch that sends nothing (not even a bookmark) this long past its timeout is dead
BACKOFF_S = (0.2, 5.0)  # first and longest wait before listing again after a failure


class Changes:
    """A counter that informers bump after their cache changed; consumers wait for it to move.

    `wait(seen, timeout)` returns at once when the counter is no longer `seen`, so a change
    that lands while the consumer works is never missed (unlike clearing an Event).
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self.count = 0

    def bump(self) -> None:
        with self._cond:
            self.count += 1
            self._cond.notify_all()

    def wait(self, seen: int, timeout: float) -> int:
        """Block until the count differs from `seen` or `timeout` passed; return the count."""
        with self._cond:
            self._cond.wait_for(lambda: self.count != seen, timeout)
            return self.count


def object_key(obj: JsonObj) -> str:
    meta = obj.get("metadata") or {}
    return f"{meta['namespace']}/{meta['name']}" if meta.get("namespace") else str(meta["name"])


class Expired(Exception):
    """The watch's resourceVersion is too old (410): the informer must list again."""


class Informer:
    """A cache of one collection (`path`, e.g. `/api/v1/pods`), kept current by a watch.

    Invariant: once `synced` is set, the cache equals the collection at `resource_version`
    (as the server sent it), and `resource_version` only moves forward, except when a list
    replaces the whole cache.
    """

    def __init__(self, kube: Kube, path: str, *, field_selector: str = "", label_selector: str = "",
                 changes: Changes | None = None, timeout_s: int = WATCH_TIMEOUT_S, name: str = "") -> None:
        self.kube, self.path, self.timeout_s = kube, path, timeout_s
        self.selectors = {k: v for k, v in (("fieldSelector", field_selector),
                                            ("labelSelector", label_selector)) if v}
        self.name = name or path
        self.changes = changes or Changes()
        self.resource_version = ""
        self.synced = threading.Event()
        # lists (the first one included), watches started, events applied, bookmarks, expired (410s), errors
        self.stats: Counter[str] = Counter()
        self._items: dict[str, JsonObj] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._conn: http.client.HTTPSConnection | None = None
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ reading
    def items(self) -> list[JsonObj]:
        with self._lock:
            return list(self._items.values())

    def get(self, key: str) -> JsonObj | None:
        """The cached object `namespace/name` (or `name` when cluster-scoped)."""
        with self._lock:
            return self._items.get(key)

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> Informer:
        self._stop.clear()
        self._thread = threading.Thread(target=self.run, name=f"informer {self.name}", daemon=True)
        self._thread.start()
        return self

    def stop(self, wait: bool = True) -> None:
        """End the watch (its connection is shut down, so a blocked read returns at once)."""
        self._stop.set()
        self.drop_connection()
        if wait and self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=10)

    def drop_connection(self) -> None:
        """Cut the watch's connection, as a network failure would (the informer lists again)."""
        conn = self._conn
        sock = getattr(conn, "sock", None)
        if sock is not None:
            try:
                sock.shutdown(2)  # SHUT_RDWR: wakes the thread blocked in readline
            except OSError:
                pass

    def run(self) -> None:
        """List, then watch, until stopped: re-watch after a timeout, list again after 410 or a failure."""
        need_list = not self.resource_version
        backoff = BACKOFF_S[0]
        while not self._stop.is_set():
            try:
                if need_list:
                    self._list()
                    need_list = False
                self._watch()
                backoff = BACKOFF_S[0]
            except Expired as exc:
                self.stats["expired"] += 1
                log.info("%s: %s; listing again", self.name, exc)
                need_list = True
            except (KubeError, OSError, http.client.HTTPException, ValueError, KeyError) as exc:
                if self._stop.is_set():
                    break
                self.stats["errors"] += 1
                log.warning("%s: watch failed (listing again in %.1fs): %r", self.name, backoff, exc)
                need_list = True
                self._stop.wait(backoff)
                backoff = min(backoff * 2, BACKOFF_S[1])

    # ------------------------------------------------------------------ list and watch
    def _list(self) -> None:
        answer = self.kube.get(self.path, **self.selectors)
        fresh = {object_key(obj): obj for obj in answer.get("items") or []}
        with self._lock:
            changed = _versions(fresh) != _versions(self._items) or not self.synced.is_set()
            self._items = fresh
            self.resource_version = str(answer["metadata"]["resourceVersion"])
        self.stats["lists"] += 1
        self.synced.set()
        if changed:
            self.changes.bump()

    def _watch(self) -> None:
        """One watch, until the server ends it (its timeout: return) or it fails (raise)."""
        query = {"watch": "1", "allowWatchBookmarks": "true", "resourceVersion": self.resource_version,
                 "timeoutSeconds": str(self.timeout_s), **self.selectors}
        conn, resp = self.kube.open_watch(self.path, query, read_timeout=self.timeout_s + READ_SLACK_S)
        self._conn = conn
        try:
            if self._stop.is_set():
                return
            if resp.status == 410:
                raise Expired(f"HTTP 410 for resourceVersion {self.resource_version}")
            if resp.status >= 300:
                raise KubeError(resp.status, "WATCH", self.path, resp.read().decode(errors="replace"))
            self.stats["watches"] += 1
            pending = b""
            while not self._stop.is_set():
                # read1, not readline: readline reports a connection cut mid-stream as a clean end
                # (http.client's peek swallows the IncompleteRead); read1 raises it.
                data = resp.read1(65536)
                if not data:
                    return  # the server ended the stream (its timeout): resume from the version we have
                pending += data
                *lines, pending = pending.split(b"\n")
                for line in lines:
                    if line.strip():
                        self._apply(json.loads(line))
        finally:
            self._conn = None
            conn.close()

    def _apply(self, event: JsonObj) -> None:
        kind, obj = event.get("type"), event.get("object") or {}
        if kind == "ERROR":
            if obj.get("code") == 410:
                raise Expired(f"{obj.get('reason', 'Expired')}: {obj.get('message', '')}")
            raise KubeError(int(obj.get("code") or 500), "WATCH", self.path, json.dumps(obj))
        version = str((obj.get("metadata") or {}).get("resourceVersion") or "")
        if kind == "BOOKMARK":
            self.stats["bookmarks"] += 1
            if version:
                self.resource_version = version
            return
        key = object_key(obj)
        with self._lock:
            if kind in ("ADDED", "MODIFIED"):
                self._items[key] = obj
            elif kind == "DELETED":
                self._items.pop(key, None)
            else:
                raise ValueError(f"{self.name}: unknown watch event type {kind!r}")
            if version:
                self.resource_version = version
        self.stats["events"] += 1
        self.changes.bump()


def _versions(items: dict[str, JsonObj]) -> dict[str, str]:
    return {key: str((obj.get("metadata") or {}).get("resourceVersion")) for key, obj in items.items()}


class ObjectCache:
    """Single objects (a ConfigMap, a Secret) by name, each kept current by an informer of its own.

    What a kubelet's watch-based ConfigMap and Secret managers do for the volumes and env of its
    pods: the first `get` of an object starts an informer on it (`fieldSelector=metadata.name=<name>`
    in its namespace) and waits for its first list; later gets read the cache, so a pod worker
    that re-reads its volumes' sources every few seconds costs the API server nothing while they
    do not change.  An informer nobody asked for in `idle_s` seconds is stopped.
    """

    def __init__(self, kube: Kube, idle_s: float = 120.0, sync_timeout_s: float = 10.0) -> None:
        self.kube, self.idle_s, self.sync_timeout_s = kube, idle_s, sync_timeout_s
        self._informers: dict[tuple[str, str, str], tuple[Informer, float]] = {}
        self._lock = threading.Lock()

    def get(self, resource: str, namespace: str, name: str) -> JsonObj | None:
        """The object (None when it does not exist), as of the informer's cache."""
        key = (resource, namespace, name)
        now = time.monotonic()
        with self._lock:
            entry = self._informers.get(key)
            informer = entry[0] if entry else Informer(
                self.kube, ns_path(namespace, resource), field_selector=f"metadata.name={name}",
                name=f"{resource} {namespace}/{name}").start()
            self._informers[key] = (informer, now)
            idle = [k for k, (_, used) in self._informers.items() if now - used > self.idle_s]
            stale = [self._informers.pop(k)[0] for k in idle]
        for old in stale:
            old.stop(wait=False)
        if not informer.synced.wait(self.sync_timeout_s):
            # No list yet (the API server is slow or away): ask directly, so the caller sees its error.
            return self.kube.get_or_none(ns_path(namespace, resource, name))
        return informer.get(f"{namespace}/{name}")

    def close(self) -> None:
        with self._lock:
            informers = [i for i, _ in self._informers.values()]
            self._informers.clear()
        for informer in informers:
            informer.stop(wait=False)
