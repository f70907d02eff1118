"""The dev cluster's REST client retries only what is safe to repeat.

A real TLS server on loopback that drops the connection after reading a request (as an API server
restarting, or a keep-alive connection it closed, does): the client may resend a GET, but never a
POST, a DELETE or a PATCH without a resourceVersion precondition — it cannot know whether the first
one took effect, and a second TokenRequest, Node or Lease would be created, or a pod deleted twice.
"""

from __future__ import annotations

import json
import socket
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from fleetserve_devcluster import pki
from fleetserve_devcluster.kube import ApiServer, Kube


class DroppingServer:
    """Answers `{}` to every request except the first of each method, whose connection it drops."""

    def __init__(self, paths: pki.PKIPaths) -> None:
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ctx.load_cert_chain(paths.crt("apiserver"), paths.key("apiserver"))
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.seen: list[str] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                raw, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._connection, args=(raw,), daemon=True).start()

    def _connection(self, raw: socket.socket) -> None:
        try:
            conn = self.ctx.wrap_socket(raw, server_side=True)
            reader = conn.makefile("rb")
            while True:
                line = reader.readline()
                if not line:
                    return
                method = line.split()[0].decode()
                length = 0
                while (header := reader.readline()) not in (b"\r\n", b""):
                    if header.lower().startswith(b"content-length:"):
                        length = int(header.split(b":")[1])
                reader.read(length)
                first = method not in self.seen
                self.seen.append(method)
                if first:
                    conn.close()  # request read, no answer: did it take effect? the client cannot know
                    return
                body = b"{}"
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                             + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        except (OSError, ssl.SSLError):
            return

    def close(self) -> None:
        self.sock.close()


@pytest.fixture(scope="module")
def paths(tmp_path_factory: pytest.TempPathFactory) -> pki.PKIPaths:
    return pki.ensure_pki(tmp_path_factory.mktemp("kube") / "pki")


@pytest.fixture
def server(paths: pki.PKIPaths) -> Iterator[DroppingServer]:
    s = DroppingServer(paths)
    yield s
    s.close()


def _client(server: DroppingServer, paths: pki.PKIPaths) -> Kube:
    return Kube(ApiServer("127.0.0.1", server.port, Path(paths.ca_crt).read_bytes(), None, None, None), timeout=5)


def test_a_dropped_get_is_retried_once(server: DroppingServer, paths: pki.PKIPaths) -> None:
    assert _client(server, paths).get("/api/v1/nodes") == {}
    assert server.seen == ["GET", "GET"]


@pytest.mark.parametrize(("method", "call"), [
    ("POST", lambda k: k.create("/api/v1/namespaces/ns/serviceaccounts/default/token", {"kind": "TokenRequest"})),
    ("DELETE", lambda k: k.delete("/api/v1/namespaces/ns/pods/p", {"gracePeriodSeconds": 0})),
    ("PATCH", lambda k: k.patch("/api/v1/nodes/n", {"metadata": {"labels": {"a": "b"}}})),
])
def test_a_dropped_non_idempotent_request_is_not_resent(server: DroppingServer, paths: pki.PKIPaths,
                                                        method: str, call: object) -> None:
    kube = _client(server, paths)
    with pytest.raises(OSError):
        call(kube)  # type: ignore[operator]
    assert server.seen == [method]  # sent once: the caller re-reads and decides, not the transport
    call(kube)  # type: ignore[operator]  # the next call, on a fresh connection, goes through
    assert server.seen == [method, method]


def test_a_patch_with_a_resource_version_precondition_is_retried(server: DroppingServer,
                                                                 paths: pki.PKIPaths) -> None:
    body = {"metadata": {"resourceVersion": "42", "finalizers": None}}
    assert _client(server, paths).patch("/api/v1/nodes/n", body) == {}
    assert server.seen == ["PATCH", "PATCH"]
    assert json.dumps(body)  # unchanged
