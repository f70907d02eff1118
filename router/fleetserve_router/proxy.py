"""The router's HTTP layer: a raw ASGI app (full control over streaming and disconnects).

One request: read the body -> prefix hashes -> pick a replica (or hold while none is ready) ->
forward -> relay the answer chunk by chunk. A client that goes away cancels the request's task,
which closes the upstream connection: the server sees the disconnect and aborts the request.
A replica that refuses the connection or answers 503 (draining/loading) before any byte reached
the client is skipped and the request goes elsewhere (or is held), so a request that arrives
during scale-down is not lost.

Pending prefill (scoring.py): a request's uncached prompt chunks count on its replica from dispatch
to the first output event of its stream (the response headers for other answers), and come off in
any case when the dispatch ends; a stream's first output is also a sample of its replica's prefill
rate (prefill.PrefillQueue).

Streams: a streamed answer's cached-token ground truth is read from its final usage event when the
server's headers lack it (usage.py); the router asks for that event when the client did not and
drops it from what it relays, so the client gets the server's own bytes (passed on event by event).

Per-request cost (issue 16: added p99 <= 5 ms at 500 requests/s on one core): upstream requests go
through one aiohttp session (C HTTP parser, keep-alive pool, no cookie jar, no decompression, no
headers of its own: the client's headers go as they came, minus hop-by-hop ones), and uvicorn runs
on uvloop with httptools (cli.py). httpx cost several times as much per request.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass
from typing import Any

import aiohttp
from starlette.types import Message, Receive, Scope, Send
from yarl import URL

from fleetserve_router.fleet import Fleet
from fleetserve_router.hold import HoldFull, HoldQueue, Waiter
from fleetserve_router.metrics import RouterMetrics
from fleetserve_router.prefill import FirstEvent, PendingPrefill
from fleetserve_router.prompt import ChunkHasher, render_request
from fleetserve_router.scoring import Decision
from fleetserve_router.usage import UsageTap, ask_for_usage

log = logging.getLogger("fleetserve.router")

_HOP_BY_HOP = frozenset({b"connection", b"keep-alive", b"proxy-authenticate", b"proxy-authorization", b"te",
                         b"trailer", b"transfer-encoding", b"upgrade", b"host", b"content-length", b"server",
                         b"date"})
_KEEPALIVE = b": keep-alive\n\n"
# Headers aiohttp would add on its own: a transparent proxy sends only what the client sent.
_NO_AUTO_HEADERS = ("Accept", "Accept-Encoding", "User-Agent", "Content-Type")
# Below the servers' own idle keep-alive (uvicorn's 5 s): a pooled connection is never reused just
# as the server closes it (that would read as a refused request and mark the replica down).
_POOL_IDLE_SECONDS = 4.0


@dataclass
class RouterConfig:
    hold_timeout: float = 900.0
    keepalive_seconds: float = 5.0
    max_request_bytes: int = 16 << 20
    chunk_chars: int = 64
    retry_after_seconds: int = 5
    max_attempts: int = 8


class ClientGone(Exception):
    pass


def _error_body(status: int, message: str, code: str) -> bytes:
    kind = "invalid_request_error" if status < 500 and status != 429 else "server_error"
    return json.dumps({"error": {"message": message, "type": kind, "param": None, "code": code}}).encode()


class RouterApp:
    """ASGI app. ``draining`` (SIGTERM) makes /ready 503 and new requests 503; in-flight ones finish."""

    def __init__(self, fleet: Fleet, hold: HoldQueue, metrics: RouterMetrics, config: RouterConfig, *,
                 health: Any = None) -> None:
        self.fleet = fleet
        self.hold = hold
        self.metrics = metrics
        self.config = config
        self.health = health or (lambda: (True, "ok"))
        self.draining = False
        self.inflight = 0
        self.idle = asyncio.Event()
        self.idle.set()
        self.hasher = ChunkHasher(config.chunk_chars)
        self._upstream: aiohttp.ClientSession | None = None

    @property
    def upstream(self) -> aiohttp.ClientSession:
        """One keep-alive pool for every replica (created on first use, inside the running loop)."""
        if self._upstream is None:
            connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=_POOL_IDLE_SECONDS, ttl_dns_cache=None)
            self._upstream = aiohttp.ClientSession(
                connector=connector, timeout=aiohttp.ClientTimeout(total=None, sock_connect=10.0),
                cookie_jar=aiohttp.DummyCookieJar(), auto_decompress=False, skip_auto_headers=_NO_AUTO_HEADERS)
        return self._upstream

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        if scope["type"] != "http":
            return
        path, method = scope["path"], scope["method"]
        if path in ("/health", "/healthz"):
            ok, why = self.health()
            await _plain(send, 200 if ok else 503, why)
        elif path == "/ready":
            await _plain(send, 503 if self.draining else 200, "draining" if self.draining else "ready")
        elif path == "/metrics":
            await _plain(send, 200, self.metrics.render().decode(), "text/plain; version=0.0.4")
        elif path.startswith("/v1/"):
            await self._handle(scope, receive, send, path, method)
        else:
            await _json(send, 404, _error_body(404, f"no route {method} {path}", "not_found"))

    async def _handle(self, scope: Scope, receive: Receive, send: Send, path: str, method: str) -> None:
        if self.draining:
            self.metrics.rejected.labels(reason="draining").inc()
            await _json(send, 503, _error_body(503, "the router is draining; retry", "draining"),
                        {"retry-after": "1"})
            return
        self.inflight += 1
        self.idle.clear()
        try:
            body = await _read_body(receive, self.config.max_request_bytes)
            if body is None:
                self.metrics.rejected.labels(reason="invalid").inc()
                await _json(send, 413, _error_body(413, f"the request body is over the router's limit of "
                                                        f"{self.config.max_request_bytes} bytes",
                                                   "request_too_large"))
                return
            # The request runs in this task; a watcher cancels it if the client goes away, and the
            # cancellation closes the upstream connection (the server aborts the request).
            task = asyncio.current_task()
            assert task is not None
            gone = asyncio.get_running_loop().create_task(_cancel_on_disconnect(receive, task))
            try:
                await self._proxy(scope, path, method, body, send)
            except asyncio.CancelledError:
                if not gone.done() or gone.cancelled():
                    raise  # cancelled from elsewhere (shutdown): not ours to swallow
                task.uncancel()  # the client left: this request ends here
            finally:
                gone.cancel()
        except ClientGone:
            pass  # the client left while sending its body
        finally:
            self.inflight -= 1
            if self.inflight == 0:
                self.idle.set()

    async def _proxy(self, scope: Scope, path: str, method: str, body: bytes, send: Send) -> None:
        parsed: Any = None
        if body:
            try:
                parsed = json.loads(body)
            except ValueError:
                parsed = None  # the server answers the 400
        stream = isinstance(parsed, dict) and parsed.get("stream") is True
        hashes = self.hasher.hashes(render_request(path, parsed)) if method == "POST" else []
        # A streamed answer's cached-token count comes in its usage event when the headers lack it:
        # ask for that event if the client did not (it is dropped from what the client gets).
        with_usage = ask_for_usage(path, parsed) if method == "POST" else None
        strip_usage = with_usage is not None
        if with_usage is not None:
            body = with_usage
        # uvicorn lower-cases header names; traceparent, authorization & co. go on as they came
        headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in scope["headers"] if k not in _HOP_BY_HOP]
        raw_path = scope.get("raw_path") or path.encode()
        query = scope.get("query_string")
        url_path = (raw_path + b"?" + query if query else raw_path).decode("latin-1")
        deadline = time.monotonic() + self.config.hold_timeout
        started = False  # a held stream answered 200 already and sends keep-alive comments
        waiter: Waiter | None = None
        held_since: float | None = None
        tried: set[str] = set()
        while True:
            decision = self.fleet.choose(hashes, tried) if len(tried) < self.config.max_attempts else None
            if decision is None:
                if tried and not self.fleet.ready_keys():
                    tried.clear()  # everything we tried is down: wait for any replica again
                if self.draining:  # SIGTERM: nothing new is held; the client retries another router
                    self.metrics.rejected.labels(reason="draining").inc()
                    await self._fail(send, started, 503, "the router is shutting down with no ready replica; "
                                     "retry", "draining", {"retry-after": "1"})
                    return
                try:
                    waiter = self.hold.enter(waiter)
                except HoldFull as exc:
                    self.metrics.rejected.labels(reason="hold_full").inc()
                    await self._fail(send, started, 429, f"too many requests are waiting for a replica ({exc}); "
                                     "retry later", "hold_full", {"retry-after": str(self.config.retry_after_seconds)})
                    return
                if held_since is None:
                    held_since = time.monotonic()
                if stream and not started:
                    await _start(send, 200, [("content-type", "text/event-stream"), ("cache-control", "no-cache")])
                    await send({"type": "http.response.body", "body": b": held\n\n", "more_body": True})
                    started = True
                self.metrics.held.set(len(self.hold))

                async def keepalive(streaming: bool = started) -> None:
                    if streaming:
                        await send({"type": "http.response.body", "body": _KEEPALIVE, "more_body": True})

                # Replicas we tried and marked down come back after fleet.down_seconds: look again then.
                until = min(deadline, time.monotonic() + self.fleet.down_seconds) if tried else deadline
                try:
                    released = await self.hold.wait(waiter, until, tick=self.config.keepalive_seconds,
                                                     on_tick=keepalive)
                finally:
                    self.metrics.held.set(len(self.hold))
                if not released and time.monotonic() < deadline:
                    tried.clear()
                    continue
                if not released:
                    self.metrics.hold_seconds.observe(time.monotonic() - held_since)
                    self.metrics.rejected.labels(reason="hold_timeout").inc()
                    await self._fail(send, started, 503, f"no replica became ready within the hold timeout of "
                                     f"{self.config.hold_timeout:g} s; retry later", "no_replica",
                                     {"retry-after": str(self.config.retry_after_seconds)})
                    return
                continue
            if held_since is not None:
                self.metrics.hold_seconds.observe(time.monotonic() - held_since)
                held_since = None
            tap = UsageTap(strip=strip_usage) if stream else None
            if await self._forward(decision, url_path, method, headers, body, hashes, send, started, tap):
                return
            tried.add(decision.replica.key)

    async def _forward(self, decision: Decision, url_path: str, method: str, headers: list[tuple[str, str]],
                       body: bytes, hashes: list[bytes], send: Send, started: bool,
                       tap: UsageTap | None = None) -> bool:
        """Send to one replica and relay its answer; False if it failed before any response (retry).
        ``tap`` (streamed requests) reads the cached-token count from the stream's usage event when
        the response headers lack it, and drops that event if the router asked for it."""
        key = decision.replica.key
        replica = decision.replica
        replica.inflight += 1
        prefill = self.fleet.start_prefill(decision)
        try:
            try:
                resp = await self.upstream.request(method, URL(f"http://{key}{url_path}", encoded=True),
                                                   headers=headers, data=body or None, allow_redirects=False)
            except (aiohttp.ClientConnectionError, aiohttp.ClientResponseError) as exc:
                # refused, reset, or closed before an answer: the request did not reach a live server
                self.metrics.upstream_errors.labels(reason="connect").inc()
                log.warning("replica %s refused the request (%r); trying another", key, exc)
                self.fleet.mark_down(key)
                return False
            relayed = False
            try:
                if resp.status == 503 and resp.headers.get("retry-after") is not None:
                    # draining or loading: this replica is going away or not there yet
                    self.metrics.upstream_errors.labels(reason="unavailable").inc()
                    self.fleet.mark_down(key)
                    return False
                self.metrics.routed[decision.route].inc()
                cached: int | None = None
                if resp.status == 200:
                    cached = self.fleet.observe_response(key, resp.headers, hashes, decision)
                plain = resp.headers.get("content-encoding", "identity").lower() == "identity"
                if not plain:
                    tap = None  # not plain bytes to read (no fleetserve server compresses its streams)
                events = resp.headers.get("content-type", "").startswith("text/event-stream")
                watch = prefill if resp.status == 200 and events and plain else None
                if watch is None:
                    prefill.done()  # a whole answer or an error: no prompt of this request is computed any more
                out_headers = [(k.lower(), v) for k, v in resp.raw_headers if k.lower() not in _HOP_BY_HOP]
                out_headers += [(b"x-fleetserve-route", decision.route.encode()),
                                (b"x-fleetserve-replica", key.encode())]
                if started:
                    await self._relay_into_stream(resp, send, tap, watch)
                elif events:
                    await send({"type": "http.response.start", "status": resp.status, "headers": out_headers})
                    await _relay_events(resp, send, tap, watch)
                else:
                    data = await resp.read()
                    out_headers.append((b"content-length", str(len(data)).encode()))
                    await send({"type": "http.response.start", "status": resp.status, "headers": out_headers})
                    await send({"type": "http.response.body", "body": data, "more_body": False})
                relayed = True
                if resp.status == 200 and cached is None and tap is not None and tap.cached_tokens is not None:
                    self.fleet.observe_cached(key, tap.cached_tokens, hashes, decision)
                return True
            finally:
                if relayed:
                    resp.release()  # read to the end: the connection goes back to the pool
                else:
                    resp.close()  # cancelled (the client left) or failed: the server sees the disconnect
        finally:
            prefill.done()  # refused, failed, cancelled (the client left) or relayed: never left pending
            replica.inflight -= 1

    async def _relay_into_stream(self, resp: aiohttp.ClientResponse, send: Send, tap: UsageTap | None,
                                 prefill: PendingPrefill | None) -> None:
        """The client already has a 200 event stream (it was held): pass the replica's events, or turn
        its error answer into an error event, as the server itself does after a stream started."""
        if resp.status == 200:
            await _relay_events(resp, send, tap, prefill)
            return
        data = await resp.read()
        await send({"type": "http.response.body", "body": b"data: " + data.replace(b"\n", b"") + b"\n\n"
                    + b"data: [DONE]\n\n", "more_body": False})

    async def _fail(self, send: Send, started: bool, status: int, message: str, code: str,
                    headers: dict[str, str]) -> None:
        body = _error_body(status, message, code)
        if started:
            await send({"type": "http.response.body", "body": b"data: " + body + b"\n\ndata: [DONE]\n\n",
                        "more_body": False})
        else:
            await _json(send, status, body, headers)

    def start_drain(self) -> None:
        """SIGTERM: /ready turns 503, new requests get 503, held ones are answered 503 now (they
        could outlive the drain grace); requests already on a replica finish."""
        self.draining = True
        self.hold.release()

    async def aclose(self) -> None:
        if self._upstream is not None:
            await self._upstream.close()


async def _relay_events(resp: aiohttp.ClientResponse, send: Send, tap: UsageTap | None,
                        prefill: PendingPrefill | None = None) -> None:
    """Pass an event stream on chunk by chunk, as the bytes arrive (through ``tap`` when there is one);
    ``prefill`` is done at the first event that is not a comment (the request's first output)."""
    first = FirstEvent() if prefill is not None else None
    async for chunk in resp.content.iter_any():
        if first is not None and prefill is not None and first.feed(chunk):
            prefill.done(first_output=True)
            first = None
        data = tap.feed(chunk) if tap is not None else chunk
        if data:
            await send({"type": "http.response.body", "body": data, "more_body": True})
    rest = tap.close() if tap is not None else b""
    await send({"type": "http.response.body", "body": rest, "more_body": False})


async def _read_body(receive: Receive, limit: int) -> bytes | None:
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone()
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


async def _cancel_on_disconnect(receive: Receive, task: asyncio.Task[Any]) -> None:
    while True:
        message: Message = await receive()
        if message["type"] == "http.disconnect":
            task.cancel()
            return


async def _start(send: Send, status: int, headers: list[tuple[str, str]]) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers]})


async def _json(send: Send, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
    await _start(send, status, [("content-type", "application/json"), ("content-length", str(len(body))),
                                *(headers or {}).items()])
    await send({"type": "http.response.body", "body": body, "more_body": False})


async def _plain(send: Send, status: int, text: str, content_type: str = "text/plain") -> None:
    data = text.encode()
    await _start(send, status, [("content-type", content_type), ("content-length", str(len(data)))])
    await send({"type": "http.response.body", "body": data, "more_body": False})
