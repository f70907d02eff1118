"""Hold, don't drop; the cap; disconnects and SIGTERM — the router in front of real servers on loopback."""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
from fleetserve_server.bench.launch import ServerProcess, fleetserve_argv, free_port, start_server
from router_util import address, router_metric, start_router
from serve_util import COMMON_FLAGS, MODEL, SERVER_ENV, metric, server_factory, tiny_model, wait_for  # noqa: F401

MESSAGES = [{"role": "user", "content": "Write a long story about the sea."}]


def body(**extra: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": MESSAGES, "max_tokens": 8, "temperature": 0, **extra}


class Streamer(threading.Thread):
    """A streamed chat request read line by line on a thread (``lines`` grows as events arrive)."""

    def __init__(self, base: str, **extra: Any) -> None:
        super().__init__(daemon=True)
        self.base, self.extra = base, extra
        self.lines: list[str] = []
        self.status: int | None = None
        self.stop_after: int | None = None

    def run(self) -> None:
        with httpx.stream("POST", self.base + "/v1/chat/completions", json=body(stream=True, **self.extra),
                          timeout=120) as resp:
            self.status = resp.status_code
            for line in resp.iter_lines():
                if not line:
                    continue  # the blank line that ends each event
                self.lines.append(line)
                if self.stop_after is not None and sum(1 for x in self.lines if x.startswith("data:")) >= \
                        self.stop_after:
                    return  # leaving the block closes the connection: the client is gone


def post_in_thread(base: str, results: list[httpx.Response | BaseException], **extra: Any) -> threading.Thread:
    def run() -> None:
        try:
            results.append(httpx.post(base + "/v1/chat/completions", json=body(**extra), timeout=120))
        except BaseException as exc:
            results.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_hold_then_dispatch_when_a_replica_turns_ready(tiny_model: Path, tmp_path: Path) -> None:  # noqa: F811
    port = free_port()
    router = start_router(tmp_path, "--endpoints", f"127.0.0.1:{port}", "--keepalive-seconds", "0.3")
    server: ServerProcess | None = None
    try:
        results: list[httpx.Response | BaseException] = []
        threads = [post_in_thread(router.base_url, results) for _ in range(2)]
        stream = Streamer(router.base_url)
        stream.start()
        wait_for(lambda: router_metric(router.base_url, "fleetserve_router_requests_held") == 3, 10,
                 "3 requests held")
        wait_for(lambda: ": keep-alive" in stream.lines, 10, "an SSE keep-alive comment while held")
        assert stream.status == 200 and stream.lines[0] == ": held"
        assert not results  # nothing answered, nothing dropped
        server = start_server("late", fleetserve_argv(str(tiny_model), port, COMMON_FLAGS), port=port,
                              ready_path="/ready", log_dir=tmp_path, timeout=300, env=SERVER_ENV)
        for t in [*threads, stream]:
            t.join(60)
        assert [r.status_code for r in results if isinstance(r, httpx.Response)] == [200, 200], results
        assert results[0].json()["choices"][0]["message"]["content"] is not None  # type: ignore[union-attr]
        assert stream.lines[-1] == "data: [DONE]" and any('"content"' in x for x in stream.lines)
        assert router_metric(router.base_url, "fleetserve_router_requests_held") == 0
        assert router_metric(router.base_url, "fleetserve_router_hold_seconds_count") == 3
        assert router_metric(router.base_url, "fleetserve_router_pending_prefill_tokens") == 0
    finally:
        assert router.stop() == 0, router.log_tail()
        if server is not None:
            server.stop()


def test_over_the_cap_gets_429_and_a_gone_client_frees_its_place(tmp_path: Path) -> None:
    router = start_router(tmp_path, "--endpoints", f"127.0.0.1:{free_port()}", "--max-held", "1",
                          "--keepalive-seconds", "0.2")
    try:
        stream = Streamer(router.base_url)
        stream.stop_after = 0  # leaves at the first line it reads (": held"): a client that gives up
        stream.start()
        stream.join(10)
        extra = Streamer(router.base_url)
        extra.start()
        wait_for(lambda: router_metric(router.base_url, "fleetserve_router_requests_held") == 1, 10, "1 held")
        refused = httpx.post(router.base_url + "/v1/chat/completions", json=body(), timeout=30)
        assert refused.status_code == 429
        assert int(refused.headers["retry-after"]) > 0
        assert "waiting for a replica" in refused.json()["error"]["message"]
        assert router_metric(router.base_url, "fleetserve_router_requests_rejected_total", reason="hold_full") == 1
    finally:
        assert router.stop() == 0, router.log_tail()


def test_hold_timeout_answers_503_with_a_named_reason(tmp_path: Path) -> None:
    router = start_router(tmp_path, "--endpoints", f"127.0.0.1:{free_port()}", "--hold-timeout", "0.5")
    try:
        resp = httpx.post(router.base_url + "/v1/chat/completions", json=body(), timeout=30)
        assert resp.status_code == 503 and resp.json()["error"]["code"] == "no_replica"
        assert "hold timeout" in resp.json()["error"]["message"]
    finally:
        assert router.stop() == 0, router.log_tail()


def test_client_disconnect_aborts_the_request_upstream(server_factory: Callable[..., ServerProcess],  # noqa: F811
                                                       tmp_path: Path) -> None:
    srv = server_factory()
    router = start_router(tmp_path, "--endpoints", address(srv))
    try:
        long = {"max_tokens": 1900, "ignore_eos": True}
        stream = Streamer(router.base_url, **long)
        stream.stop_after = 2  # the opening event and one token, then gone
        stream.start()
        stream.join(60)
        wait_for(lambda: metric(srv.base_url, "fleetserve_requests", finish_reason="abort") == 1, 15,
                 "the server to abort the streamed request whose client left")
        try:
            httpx.post(router.base_url + "/v1/chat/completions", json=body(**long), timeout=1.0)
        except httpx.ReadTimeout:
            pass  # the client gave up on a non-streamed answer
        wait_for(lambda: metric(srv.base_url, "fleetserve_requests", finish_reason="abort") == 2, 15,
                 "the server to abort the non-streamed request whose client left")
        wait_for(lambda: metric(srv.base_url, "fleetserve_requests_running") == 0, 10, "no request running")
        assert metric(srv.base_url, "fleetserve_requests", finish_reason="length") == 0
    finally:
        assert router.stop() == 0, router.log_tail()


def test_sigterm_drains_in_flight_requests(server_factory: Callable[..., ServerProcess],  # noqa: F811
                                           tmp_path: Path) -> None:
    srv = server_factory()
    router = start_router(tmp_path, "--endpoints", address(srv))
    stream = Streamer(router.base_url, max_tokens=300, ignore_eos=True)
    stream.start()
    wait_for(lambda: any(x.startswith("data:") for x in stream.lines), 30, "the stream to start")
    router.process.send_signal(signal.SIGTERM)
    wait_for(lambda: httpx.get(router.base_url + "/ready").status_code == 503, 5, "/ready 503 while draining")
    stream.join(60)
    assert stream.lines[-1] == "data: [DONE]"
    assert router.process.wait(30) == 0
