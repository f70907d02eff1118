"""Node agent: probe thresholds, HTTP/TCP checks against a real local server, and the proxy's endpoint choice."""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from fleetserve_devcluster.probes import Probe, ProbeTracker, resolve_port, run_action
from fleetserve_devcluster.proxy import Listener, ServiceProxy, primary_port, proxy_backends, ready_backends


def no_exec(argv: list[str], timeout: float) -> tuple[bool, str]:
    raise AssertionError("no exec expected")


class _Handler(BaseHTTPRequestHandler):
    status = 200

    def do_GET(self) -> None:
        code = 200 if self.path == "/ok" else 503
        body = f"{self.server.server_address[0]}:{self.server.server_address[1]}".encode()
        self.send_response(code)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def http_server() -> Iterator[tuple[str, int]]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address[0], server.server_address[1]
    server.shutdown()


def test_tracker_thresholds() -> None:
    probe = Probe.from_spec({"httpGet": {"port": 1}, "periodSeconds": 2, "failureThreshold": 2,
                             "successThreshold": 2, "initialDelaySeconds": 5})
    t = ProbeTracker(probe, result=False, started_at=100.0)
    assert not t.due(104.9) and t.due(105.0)
    t.record(True, "", 105.0)
    assert not t.result and t.next_at == 107.0
    t.record(True, "", 107.0)
    assert t.result
    t.record(False, "boom", 109.0)
    assert t.result  # one failure is below the threshold
    t.record(False, "boom", 111.0)
    assert not t.result and t.message == "boom"


def test_probe_defaults_match_the_api() -> None:
    p = Probe.from_spec({"tcpSocket": {"port": 80}})
    assert (p.initial_delay, p.period, p.timeout, p.success_threshold, p.failure_threshold) == (0, 10, 1, 1, 3)


def test_http_and_tcp_checks(http_server: tuple[str, int]) -> None:
    host, port = http_server
    container = {"ports": [{"name": "http", "containerPort": port}]}
    assert run_action({"httpGet": {"path": "/ok", "port": "http"}}, host, container, no_exec, 1)[0]
    ok, message = run_action({"httpGet": {"path": "/bad", "port": port}}, host, container, no_exec, 1)
    assert not ok and "503" in message
    assert run_action({"tcpSocket": {"port": port}}, host, container, no_exec, 1)[0]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    assert not run_action({"tcpSocket": {"port": closed}}, host, container, no_exec, 1)[0]
    ok, message = run_action({"grpc": {"port": 1}}, host, container, no_exec, 1)
    assert not ok and "grpc" in message
    with pytest.raises(ValueError, match="no container port has that name"):
        resolve_port("metrics", container)


def test_ready_backends_skip_unready_and_match_port_names() -> None:
    slices = [{"ports": [{"name": "http", "port": 8000, "protocol": "TCP"}, {"name": "metrics", "port": 9090}],
               "endpoints": [
                   {"addresses": ["127.0.10.3"], "conditions": {"ready": True}},
                   {"addresses": ["127.0.10.2"], "conditions": {}},  # unset means ready
                   {"addresses": ["127.0.11.2"], "conditions": {"ready": False, "terminating": True}},
               ]}]
    assert ready_backends(slices, "http") == [("127.0.10.2", 8000), ("127.0.10.3", 8000)]
    assert ready_backends(slices, "metrics") == [("127.0.10.2", 9090), ("127.0.10.3", 9090)]
    assert ready_backends(slices, "") == []
    # Terminating endpoints only when none is ready, and only those still serving (ProxyTerminatingEndpoints).
    assert proxy_backends(slices, "http") == ready_backends(slices, "http")
    draining = [{"ports": [{"name": "http", "port": 8000}], "endpoints": [
        {"addresses": ["127.0.11.2"], "conditions": {"ready": False, "serving": True, "terminating": True}},
        {"addresses": ["127.0.11.3"], "conditions": {"ready": False, "serving": False, "terminating": True}},
        {"addresses": ["127.0.11.4"], "conditions": {"ready": False, "serving": False}}]}]
    assert proxy_backends(draining, "http") == [("127.0.11.2", 8000)]
    assert proxy_backends(draining + slices, "http") == ready_backends(slices, "http")
    svc = {"spec": {"ports": [{"name": "metrics", "port": 9090}, {"name": "http", "port": 80}]}}
    assert primary_port(svc)["name"] == "http"


def test_proxy_listener_round_robins_over_backends() -> None:
    """The data path: real listener, real backends; empty backends refuse; changes apply to new connections."""
    servers = [ThreadingHTTPServer(("127.0.0.1", 0), _Handler) for _ in range(2)]
    for s in servers:
        threading.Thread(target=s.serve_forever, daemon=True).start()
    proxy = ServiceProxy.__new__(ServiceProxy)  # the data path only: no API server involved
    proxy.loop = asyncio.new_event_loop()
    proxy._connections = set()
    io_thread = threading.Thread(target=proxy.loop.run_forever, daemon=True)
    io_thread.start()
    try:
        listener: Listener = proxy._run(proxy._open("ns/svc/http", 0))

        def get() -> str:
            data = b""
            # A reset can come as early as the connect: the proxy resets at once, and with a timeout the
            # client's connect() reads the socket's error after the RST has already arrived.
            try:
                with socket.create_connection(("127.0.0.1", listener.port), timeout=5) as c:
                    c.sendall(b"GET /ok HTTP/1.0\r\n\r\n")
                    c.shutdown(socket.SHUT_WR)
                    while chunk := c.recv(4096):
                        data += chunk
            except (ConnectionResetError, BrokenPipeError):
                return "reset"
            return data.decode().rsplit("\r\n\r\n", 1)[-1] if data else "closed"

        assert get() in ("reset", "closed")  # no ready endpoint: the connection is refused at once
        listener.backends = sorted(s.server_address for s in servers)
        seen = [get() for _ in range(4)]
        expected = [f"{h}:{p}" for h, p in listener.backends]
        assert seen == expected * 2
        listener.backends = [servers[1].server_address]
        assert {get() for _ in range(3)} == {f"{servers[1].server_address[0]}:{servers[1].server_address[1]}"}
        # A backend that refuses fails the connection that went to it: one backend per connection, no retry
        # on another (kube-proxy cannot retry either).
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            refusing = s.getsockname()
        alive = f"{servers[0].server_address[0]}:{servers[0].server_address[1]}"
        listener.backends = sorted([servers[0].server_address, refusing])
        listener.turn = 0
        seen = [get() for _ in range(4)]
        assert sorted(seen) == sorted([alive, alive, "reset", "reset"]), seen
        proxy.retry_next_backend = True  # `up --proxy-retry-next-backend`: the old, forgiving behaviour
        assert [get() for _ in range(4)] == [alive] * 4
    finally:
        async def drain() -> None:  # let the last connection's handler finish before the loop stops
            listener.server.close()
            await asyncio.sleep(0.2)

        proxy._run(drain())
        proxy.loop.call_soon_threadsafe(proxy.loop.stop)
        io_thread.join(5)
        proxy.loop.close()
        for s in servers:
            s.shutdown()
