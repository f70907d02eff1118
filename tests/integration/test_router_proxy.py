"""The router as an HTTP proxy: what the client sends reaches the replica as sent (trace context,
credentials, query, body bytes) with nothing added, and what the replica answers reaches the client as
answered (status, repeated headers, compressed bytes, events one by one) — a real `fleetserve router`
process in front of a header-echoing HTTP server on loopback."""

from __future__ import annotations

import asyncio
import gzip
import http.client
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from fleetserve_server.bench.launch import ServerProcess, free_port
from router_util import start_router

TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


class EchoReplica:
    """An HTTP server on its own thread that answers as much of a replica's surface as the router
    reads (/ready, /metrics) and echoes each /v1 request back: method, target, headers, body."""

    def __init__(self) -> None:
        self.port = free_port()
        self.release_stream = threading.Event()  # the streamed answer's second event waits for this
        self._loop = asyncio.new_event_loop()
        self._started = threading.Event()
        self._runner: web.AppRunner | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        assert self._started.wait(30), "the echo replica did not start"

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        app = web.Application()
        app.add_routes([web.get("/ready", self.ready), web.get("/metrics", self.metrics),
                        web.post("/v1/chat/completions", self.echo), web.post("/v1/completions", self.echo)])
        self._runner = web.AppRunner(app, access_log=None)
        self._loop.run_until_complete(self._runner.setup())
        self._loop.run_until_complete(web.TCPSite(self._runner, "127.0.0.1", self.port).start())
        self._started.set()
        self._loop.run_forever()

    def close(self) -> None:
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    async def ready(self, _: web.Request) -> web.Response:
        return web.Response(text="ready")

    async def metrics(self, _: web.Request) -> web.Response:
        return web.Response(text="fleetserve_requests_running 0\nfleetserve_requests_waiting 0\n"
                                 "fleetserve_kv_cache_usage_ratio 0\n")

    async def echo(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        seen = {"method": request.method, "target": request.raw_path,
                "headers": [[k.decode("latin-1").lower(), v.decode("latin-1")] for k, v in request.raw_headers],
                "body": body.decode()}
        headers = [("x-fleetserve-cache-epoch", "e1"), ("x-fleetserve-cached-tokens", "0"),
                   ("x-echo", "one"), ("x-echo", "two")]
        want = request.headers.get("x-want", "")
        if want == "stream":
            resp = web.StreamResponse(headers=[*headers, ("content-type", "text/event-stream")])
            await resp.prepare(request)
            await resp.write(b"data: " + json.dumps(seen).encode() + b"\n\n")
            # longer than the client's socket timeout: a router that held the first event back until
            # the answer ended would leave the client with nothing to read, and the test fails
            released = await asyncio.get_running_loop().run_in_executor(None, self.release_stream.wait, 120)
            await resp.write(b"data: [DONE]\n\n" if released else b"data: never released\n\n")
            await resp.write_eof()
            return resp
        if want == "gzip":
            return web.Response(body=gzip.compress(json.dumps(seen).encode()),
                                headers=[*headers, ("content-type", "application/json"),
                                         ("content-encoding", "gzip")])
        status = 400 if want == "error" else 200
        return web.Response(body=json.dumps(seen).encode(), status=status,
                            headers=[*headers, ("content-type", "application/json")])


@pytest.fixture
def replica_and_router(tmp_path: Path) -> Iterator[tuple[EchoReplica, ServerProcess]]:
    replica = EchoReplica()
    router = start_router(tmp_path, "--endpoints", f"127.0.0.1:{replica.port}")
    try:
        yield replica, router
    finally:
        replica.release_stream.set()
        code = router.stop()
        replica.close()
        assert code == 0, router.log_tail()


def send(router: ServerProcess, target: str, body: bytes, headers: dict[str, str]) -> http.client.HTTPResponse:
    """A request with exactly these headers (plus Host and Content-Length): http.client adds nothing."""
    host, port = router.base_url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    conn.putrequest("POST", target, skip_accept_encoding=True)
    for name, value in {**headers, "content-length": str(len(body))}.items():
        conn.putheader(name, value)
    conn.endheaders(body)
    return conn.getresponse()


def chat_body(**extra: Any) -> bytes:
    # deliberately not json.dumps' spacing: the replica must get these bytes, not a re-encoding
    return json.dumps({"model": "m", "messages": [{"role": "user", "content": "hé"}], **extra},
                      separators=(", ", " : "), ensure_ascii=False).encode()


def test_the_request_reaches_the_replica_as_the_client_sent_it(
        replica_and_router: tuple[EchoReplica, ServerProcess]) -> None:
    _, router = replica_and_router
    body = chat_body(max_tokens=2)
    client_headers = {"content-type": "application/json", "traceparent": TRACEPARENT, "tracestate": "k=v",
                      "authorization": "Bearer sk-test", "x-request-id": "r-1"}
    resp = send(router, "/v1/chat/completions?a=b%20c&d=%2F", body, client_headers)
    assert resp.status == 200
    seen = json.loads(resp.read())
    assert seen["method"] == "POST" and seen["target"] == "/v1/chat/completions?a=b%20c&d=%2F"
    assert seen["body"].encode() == body
    headers = dict(seen["headers"])
    for name, value in client_headers.items():
        assert headers[name] == value, name
    # nothing the client did not send, but the target's Host and the body's length
    assert set(headers) == {*client_headers, "host", "content-length"}, headers
    assert headers["content-length"] == str(len(body))


def test_the_answer_reaches_the_client_as_the_replica_sent_it(
        replica_and_router: tuple[EchoReplica, ServerProcess]) -> None:
    replica, router = replica_and_router
    resp = send(router, "/v1/chat/completions", chat_body(), {"content-type": "application/json",
                                                              "x-want": "error"})
    data = resp.read()
    assert resp.status == 400 and json.loads(data)["method"] == "POST"
    assert resp.headers.get_all("x-echo") == ["one", "two"]
    assert resp.headers["content-length"] == str(len(data))
    assert resp.headers["x-fleetserve-replica"] == f"127.0.0.1:{replica.port}"
    assert resp.headers["x-fleetserve-route"] in ("prefix", "least_load", "fail_open")

    zipped = send(router, "/v1/chat/completions", chat_body(), {"content-type": "application/json",
                                                                "accept-encoding": "gzip", "x-want": "gzip"})
    assert zipped.status == 200 and zipped.headers["content-encoding"] == "gzip"
    assert json.loads(gzip.decompress(zipped.read()))["target"] == "/v1/chat/completions"  # the bytes as sent


def test_a_stream_is_relayed_event_by_event(replica_and_router: tuple[EchoReplica, ServerProcess]) -> None:
    replica, router = replica_and_router
    resp = send(router, "/v1/chat/completions", chat_body(stream=True),
                {"content-type": "application/json", "x-want": "stream", "traceparent": TRACEPARENT})
    assert resp.status == 200 and resp.headers["content-type"].startswith("text/event-stream")
    first = resp.readline()  # the replica sends the rest only once this test has read the first event
    assert dict(json.loads(first.removeprefix(b"data: ")).get("headers"))["traceparent"] == TRACEPARENT
    replica.release_stream.set()
    assert resp.read() == b"\ndata: [DONE]\n\n"
