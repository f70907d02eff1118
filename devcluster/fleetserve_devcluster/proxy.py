"""The dev cluster's service proxy, in kube-proxy's role.

Every Service port (TCP, any type but ExternalName) gets a listener on
127.0.0.1:<port>, stable for the Service's lifetime and across agent restarts
(remembered in `<state>/proxy.json`).  Like kube-proxy, each connection goes to
exactly one backend, chosen (round-robin) among the *ready* endpoints of the
Service's EndpointSlices; only when none is ready, among the serving endpoints
that are terminating (kube-proxy's ProxyTerminatingEndpoints); with neither, the
connection is refused, as kube-proxy's REJECT rule does.  A backend that refuses
or does not answer the connect fails that client connection (reset): it is never
retried on another backend, since kube-proxy cannot do that either and a retry
would hide a server that drops connections while it drains.  The old retry on the
next backend is kept only behind `up --proxy-retry-next-backend`.  The
Service's own address is written on it as the annotation
`fleetserve.io/proxy-address` (the port named `http`, else the first port).
Services and EndpointSlices come from informers (watch.py), as kube-proxy's do: a
change is applied as soon as its watch event arrives, and an idle proxy sends
nothing to the API server.
On a real cluster kube-proxy (or the CNI) does this on the ClusterIP.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import struct
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .kube import Kube, KubeError, ns_path
from .watch import Changes, Informer

JsonObj = dict[str, Any]
log = logging.getLogger("fleetserve.devcluster.proxy")
ANNOTATION = "fleetserve.io/proxy-address"
ANNOTATION_ALL = "fleetserve.io/proxy-addresses"
RESYNC_SECONDS = 1.0  # a pass from the caches (no API request) also runs this often: retries a failed patch
CONNECT_TIMEOUT = 2.0
PROXY_HOST = "127.0.0.1"


def port_key(port: JsonObj) -> str:
    """How a Service port is named in keys and annotations: its name, else its number."""
    return str(port.get("name") or port["port"])


def ready_backends(slices: list[JsonObj], port_name: str) -> list[tuple[str, int]]:
    """The (ip, port) of every ready endpoint for the Service port called `port_name` ("" if unnamed).

    `conditions.ready` unset counts as ready (the API's documented meaning); terminating
    endpoints are never ready.  The result is sorted, so round-robin order is stable.
    """
    out: set[tuple[str, int]] = set()
    for s in slices:
        ports = [p for p in s.get("ports") or [] if (p.get("name") or "") == port_name
                 and p.get("protocol", "TCP") == "TCP" and p.get("port")]
        for ep in s.get("endpoints") or []:
            if (ep.get("conditions") or {}).get("ready") is False or not ep.get("addresses"):
                continue
            for p in ports:
                out.add((ep["addresses"][0], int(p["port"])))
    return sorted(out)


def terminating_backends(slices: list[JsonObj], port_name: str) -> list[tuple[str, int]]:
    """The (ip, port) of every endpoint that is terminating but still serving (`conditions.serving`)."""
    out: set[tuple[str, int]] = set()
    for s in slices:
        ports = [p for p in s.get("ports") or [] if (p.get("name") or "") == port_name
                 and p.get("protocol", "TCP") == "TCP" and p.get("port")]
        for ep in s.get("endpoints") or []:
            cond = ep.get("conditions") or {}
            if cond.get("terminating") and cond.get("serving") and ep.get("addresses"):
                out.update((ep["addresses"][0], int(p["port"])) for p in ports)
    return sorted(out)


def proxy_backends(slices: list[JsonObj], port_name: str) -> list[tuple[str, int]]:
    """kube-proxy's choice: the ready endpoints; if there are none, the serving terminating ones."""
    return ready_backends(slices, port_name) or terminating_backends(slices, port_name)


def primary_port(service: JsonObj) -> JsonObj | None:
    ports = [p for p in service.get("spec", {}).get("ports") or [] if p.get("protocol", "TCP") == "TCP"]
    named = [p for p in ports if p.get("name") == "http"]
    return (named or ports or [None])[0]


@dataclass
class Listener:
    """One listening socket; `backends` is replaced whole by the sync thread (atomic in Python)."""

    key: str
    port: int
    server: asyncio.base_events.Server
    backends: list[tuple[str, int]] = field(default_factory=list)
    turn: int = 0


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()  # pass a half-close on, so request/response protocols finish
    except (ConnectionError, OSError):
        pass


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close the client's connection with a RST, as a connection to a refusing backend ends."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.close()


class ServiceProxy:
    """Listeners for all Services, kept in sync with the Service and EndpointSlice informers.

    Invariant: `listeners` has exactly the TCP ports of the existing Services (after a sync).
    """

    retry_next_backend = False  # kube-proxy's behaviour; True only with `up --proxy-retry-next-backend`

    def __init__(self, kube: Kube, state_dir: Path, retry_next_backend: bool = False) -> None:
        self.retry_next_backend = retry_next_backend
        self.kube = kube
        self.changes = Changes()
        self.services = Informer(kube, "/api/v1/services", changes=self.changes, name="services")
        self.slices = Informer(kube, "/apis/discovery.k8s.io/v1/endpointslices", changes=self.changes,
                               name="endpointslices")
        self.state_file = state_dir / "proxy.json"
        self.loop = asyncio.new_event_loop()
        self.listeners: dict[str, Listener] = {}
        self._connections: set[asyncio.Task[None]] = set()  # live client connections (see _open)
        self.remembered: dict[str, str] = self._load()
        self._thread = threading.Thread(target=self.loop.run_forever, name="proxy-io", daemon=True)

    def _load(self) -> dict[str, str]:
        try:
            return dict(json.loads(self.state_file.read_text()))
        except (OSError, ValueError):
            return {}

    def start(self) -> None:
        self._thread.start()

    # ------------------------------------------------------------------ data path
    async def _handle(self, listener: Listener, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        backends = listener.backends
        upstream = None
        for _ in range(len(backends) if self.retry_next_backend else min(len(backends), 1)):
            host, port = backends[listener.turn % len(backends)]
            listener.turn += 1
            try:
                upstream = await asyncio.wait_for(asyncio.open_connection(host, port), CONNECT_TIMEOUT)
                break
            except (OSError, TimeoutError):
                continue
        if upstream is None:
            _reset(writer)
            return
        up_reader, up_writer = upstream
        await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))
        for w in (up_writer, writer):
            with contextlib.suppress(Exception):
                w.close()

    async def _open(self, key: str, wanted_port: int) -> Listener:
        holder: dict[str, Listener] = {}

        async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            # Hold the connection's task strongly while it runs: asyncio keeps only
            # weak references to tasks, and while both directions wait with reading
            # paused (flow control) nothing else in the loop refers to this
            # connection, so the garbage collector destroyed pending handlers
            # ("Task was destroyed but it is pending!") and cut live requests.
            task = asyncio.current_task()
            if task is not None:
                self._connections.add(task)
            try:
                await self._handle(holder["l"], r, w)
            finally:
                self._connections.discard(task)  # type: ignore[arg-type]

        try:
            server = await asyncio.start_server(handle, PROXY_HOST, wanted_port)
        except OSError:
            server = await asyncio.start_server(handle, PROXY_HOST, 0)  # the remembered port is taken
        port = server.sockets[0].getsockname()[1]
        holder["l"] = Listener(key, port, server)
        return holder["l"]

    def _run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=10)

    # ------------------------------------------------------------------ control path
    def sync(self) -> None:
        """Make the listeners and annotations match the informers' caches (both must have synced)."""
        services = self.services.items()
        slices = self.slices.items()
        by_service: dict[tuple[str, str], list[JsonObj]] = {}
        for s in slices:
            owner = (s.get("metadata", {}).get("labels") or {}).get("kubernetes.io/service-name")
            if owner:
                by_service.setdefault((s["metadata"]["namespace"], owner), []).append(s)
        wanted: set[str] = set()
        for svc in services:
            if svc.get("spec", {}).get("type") == "ExternalName":
                continue
            ns, name = svc["metadata"]["namespace"], svc["metadata"]["name"]
            addresses: dict[str, str] = {}
            for port in svc["spec"].get("ports") or []:
                if port.get("protocol", "TCP") != "TCP":
                    continue
                key = f"{ns}/{name}/{port_key(port)}"
                wanted.add(key)
                listener = self.listeners.get(key)
                if listener is None:
                    remembered = self.remembered.get(key, ":0").rsplit(":", 1)[1]
                    listener = self.listeners[key] = self._run(self._open(key, int(remembered)))
                    log.info("service %s/%s port %s: listening on %s:%d", ns, name, port_key(port),
                             PROXY_HOST, listener.port)
                listener.backends = proxy_backends(by_service.get((ns, name), []), port.get("name") or "")
                addresses[port_key(port)] = f"{PROXY_HOST}:{listener.port}"
            self._annotate(svc, addresses)
        for key in set(self.listeners) - wanted:
            listener = self.listeners.pop(key)
            listener.server.close()
            log.info("service port %s removed: closed %s:%d", key, PROXY_HOST, listener.port)
        current = {k: f"{PROXY_HOST}:{v.port}" for k, v in self.listeners.items()}
        if current != self.remembered:
            self.remembered = current
            tmp = self.state_file.with_suffix(".tmp")
            tmp.write_text(json.dumps(current, indent=1, sort_keys=True))
            tmp.replace(self.state_file)

    def _annotate(self, svc: JsonObj, addresses: dict[str, str]) -> None:
        primary = primary_port(svc)
        if primary is None:
            return
        want = {ANNOTATION: addresses[port_key(primary)],
                ANNOTATION_ALL: ",".join(f"{k}={v}" for k, v in sorted(addresses.items()))}
        have = svc["metadata"].get("annotations") or {}
        if all(have.get(k) == v for k, v in want.items()):
            return
        path = ns_path(svc["metadata"]["namespace"], "services", svc["metadata"]["name"])
        try:
            self.kube.patch(path, {"metadata": {"annotations": want}})
        except KubeError as exc:
            if exc.status != 404:
                raise

    def run(self, stop: threading.Event) -> None:
        """Sync on every change of either informer (and every RESYNC_SECONDS) until `stop` is set."""
        self.services.start()
        self.slices.start()
        seen = self.changes.count
        try:
            while not stop.is_set():
                # Not before both caches are filled: an empty cache would close every listener.
                if self.services.synced.is_set() and self.slices.synced.is_set():
                    try:
                        self.sync()
                    except (KubeError, OSError) as exc:
                        log.warning("proxy sync failed (retrying): %s", exc)
                seen = self.changes.wait(seen, RESYNC_SECONDS)
        finally:
            self.services.stop(wait=False)
            self.slices.stop(wait=False)

    def close(self) -> None:
        for listener in self.listeners.values():
            self.loop.call_soon_threadsafe(listener.server.close)
        self.loop.call_soon_threadsafe(self.loop.stop)


def proxy_addresses(state_dir: str | Path) -> dict[str, str]:
    """`namespace/service/port` -> `127.0.0.1:PORT`, as the running proxy last wrote it."""
    try:
        return dict(json.loads((Path(state_dir) / "proxy.json").read_text()))
    except (OSError, ValueError):
        return {}
