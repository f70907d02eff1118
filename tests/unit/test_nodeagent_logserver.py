"""The node agent's `kubectl logs` endpoint on a real TLS socket with the cluster's real PKI:
it answers only the API server's kubelet-client certificate, listens only on the nodes' addresses,
and serves a pod's own log by exact name (no glob, no path traversal, no symlink followed)."""

from __future__ import annotations

import http.client
import socket
import ssl
from collections.abc import Iterator
from pathlib import Path

import pytest
from fleetserve_devcluster import pki
from fleetserve_devcluster.logserver import LogServer, log_file, tail

ADDRESS = "127.0.0.1"


@pytest.fixture(scope="module")
def cluster_pki(tmp_path_factory: pytest.TempPathFactory) -> pki.PKIPaths:
    return pki.ensure_pki(tmp_path_factory.mktemp("state") / "pki")


@pytest.fixture
def state(tmp_path: Path) -> Path:
    """Two pods' logs, plus host files a request must never reach."""
    for pod_dir, text in (("ns_web_0d1e2f3a-0000-4000-8000-000000000001", "web's log\n"),
                          ("other_db_0d1e2f3a-0000-4000-8000-000000000002", "db's log with a password\n")):
        (tmp_path / "pods" / pod_dir).mkdir(parents=True)
        (tmp_path / "pods" / pod_dir / "echo.log").write_text(text)
    (tmp_path / "kubeconfig").write_text("client-key-data: SECRET\n")
    return tmp_path


@pytest.fixture
def server(state: Path, cluster_pki: pki.PKIPaths) -> Iterator[LogServer]:
    with socket.socket() as s:
        s.bind((ADDRESS, 0))
        port = s.getsockname()[1]
    logs = LogServer(state, port, client_ca=cluster_pki.ca_crt)
    logs.serve_on({ADDRESS})
    try:
        yield logs
    finally:
        logs.close()


def get(server: LogServer, cluster_pki: pki.PKIPaths, path: str, identity: str | None = "apiserver-kubelet-client",
        host: str = ADDRESS) -> tuple[int, str]:
    ctx = ssl._create_unverified_context()  # the API server does not verify the node's serving cert either
    if identity:
        ctx.load_cert_chain(cluster_pki.crt(identity), cluster_pki.key(identity))
    conn = http.client.HTTPSConnection(host, server.port, context=ctx, timeout=5)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read().decode()
    finally:
        conn.close()


def test_the_api_servers_identity_reads_a_pods_log(server: LogServer, cluster_pki: pki.PKIPaths) -> None:
    assert get(server, cluster_pki, "/containerLogs/ns/web/echo") == (200, "web's log\n")
    assert get(server, cluster_pki, "/containerLogs/ns/web/echo?tailLines=x")[0] == 400


@pytest.mark.parametrize("path", [
    "/containerLogs/ns/*/echo",                 # a glob for the pod: another pod's log
    "/containerLogs/*/db/echo",                 # a glob for the namespace
    "/containerLogs/other/d[b]/echo",           # a character class
    "/containerLogs/other/db/ech?",             # a single-character wildcard
    "/containerLogs/ns/web/..%2F..%2F..%2Fkubeconfig",
    "/containerLogs/ns/web/../../kubeconfig",
    "/containerLogs/ns/web_0d1e2f3a-0000-4000-8000-000000000001/echo",
])
def test_globs_and_traversal_are_refused(server: LogServer, cluster_pki: pki.PKIPaths, path: str) -> None:
    status, body = get(server, cluster_pki, path)
    assert status == 404
    assert "password" not in body and "SECRET" not in body


def test_a_symlinked_log_file_is_not_followed(server: LogServer, cluster_pki: pki.PKIPaths, state: Path) -> None:
    pod_dir = state / "pods" / "ns_web_0d1e2f3a-0000-4000-8000-000000000001"
    (pod_dir / "echo.log").unlink()
    (pod_dir / "echo.log").symlink_to(state / "kubeconfig")  # planted by whoever can write the pod's dir
    status, body = get(server, cluster_pki, "/containerLogs/ns/web/echo")
    assert status == 404 and "SECRET" not in body


def test_a_client_without_the_cluster_cas_certificate_gets_nothing(server: LogServer,
                                                                   cluster_pki: pki.PKIPaths,
                                                                   tmp_path: Path) -> None:
    with pytest.raises((ssl.SSLError, ConnectionError)):
        get(server, cluster_pki, "/containerLogs/ns/web/echo", identity=None)
    other = pki.ensure_pki(tmp_path / "other-pki")  # a CA the server does not trust
    ctx = ssl._create_unverified_context()
    ctx.load_cert_chain(other.crt("admin"), other.key("admin"))
    conn = http.client.HTTPSConnection(ADDRESS, server.port, context=ctx, timeout=5)
    with pytest.raises((ssl.SSLError, ConnectionError)):
        conn.request("GET", "/containerLogs/ns/web/echo")
        conn.getresponse().read()
    conn.close()


def test_it_listens_only_on_the_addresses_it_is_given(server: LogServer, cluster_pki: pki.PKIPaths) -> None:
    assert [s.server_address[0] for s in server.servers.values()] == [ADDRESS]
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.2", server.port), timeout=2).close()
    server.serve_on(set())
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((ADDRESS, server.port), timeout=2).close()


def test_log_tail_and_file_choice(tmp_path: Path) -> None:
    import os

    assert tail(b"a\nb\nc\n", 2) == b"b\nc\n" and tail(b"a\nb", None) == b"a\nb" and tail(b"a\n", 0) == b""
    old = tmp_path / "pods" / "ns_web_0d1e2f3a-1" / "echo.log"
    new = tmp_path / "pods" / "ns_web_0d1e2f3a-2" / "echo.log"
    for path in (old, new):
        path.parent.mkdir(parents=True)
        path.write_text(path.parent.name)
    os.utime(old, (1, 1))
    assert log_file(tmp_path, "ns", "web", "echo") == new
    assert log_file(tmp_path, "ns", "web", "other") is None
