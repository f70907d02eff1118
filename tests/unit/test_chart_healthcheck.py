"""`fleetserve healthcheck --url`, which the chart's `helm test` pod runs, against real HTTP servers."""

from __future__ import annotations

import http.server
import threading
from collections.abc import Iterator

import pytest
from fleetserve_cli.main import main


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        self.send_response(200 if self.path == "/healthz" else 503)
        self.end_headers()
        self.wfile.write(b"ok\n")

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def server() -> Iterator[str]:
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_healthy_endpoint_passes(server: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["healthcheck", "--url", f"{server}/healthz", "--timeout", "5"]) == 0
    assert "healthy" in capsys.readouterr().out


def test_unhealthy_endpoint_fails_with_the_reason(server: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["healthcheck", "--url", f"{server}/broken", "--timeout", "1"]) == 1
    assert "HTTP 503" in capsys.readouterr().err


def test_unreachable_endpoint_fails(capsys: pytest.CaptureFixture[str]) -> None:
    # Port 9 (discard) on loopback: nothing listens there.
    assert main(["healthcheck", "--url", "http://127.0.0.1:9/healthz", "--timeout", "1"]) == 1
    assert "unhealthy after 1s" in capsys.readouterr().err
