"""`fleetserve serve --tensor-parallel-size 2` on CPU (gloo): it serves, and a rank that dies takes
the server down cleanly — /health fails, requests fail instead of hanging, SIGTERM still stops
it — while a dead rank 0 leaves no orphaned worker behind."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

import httpx
from fleetserve_server.bench.launch import ServerProcess
from serve_util import MODEL, server_factory, tiny_model, wait_for  # noqa: F401

TP_FLAGS = ("--tensor-parallel-size", "2", "--threads", "1", "--kv-cache-tokens", "4096")


def _children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in path.read_text().split()] if path.exists() else []


def _workers(server: ServerProcess) -> list[int]:
    """The server's tensor-parallel worker processes (its children running tp_worker)."""
    out = []
    for pid in _children(server.process.pid):
        try:
            if b"fleetserve_server.runner.tp_worker" in Path(f"/proc/{pid}/cmdline").read_bytes():
                out.append(pid)
        except FileNotFoundError:
            pass
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def _complete(base: str, timeout: float = 60) -> httpx.Response:
    return httpx.post(base + "/v1/completions", json={"model": MODEL, "prompt": "hello there", "max_tokens": 8,
                                                      "temperature": 0}, timeout=timeout)


def test_a_dead_worker_fails_health_and_requests_and_sigterm_still_stops_the_server(
    server_factory: Callable[..., ServerProcess],  # noqa: F811
) -> None:
    server = server_factory(*TP_FLAGS)
    base = server.base_url
    assert _complete(base).status_code == 200
    [worker] = _workers(server)
    assert httpx.get(base + "/health", timeout=10).status_code == 200

    os.kill(worker, signal.SIGKILL)
    wait_for(lambda: httpx.get(base + "/health", timeout=10).status_code == 503, 30, "/health to fail")
    health = httpx.get(base + "/health", timeout=10).json()
    assert "tensor-parallel worker rank 1" in health["detail"] and "signal 9" in health["detail"], health
    assert httpx.get(base + "/ready", timeout=10).status_code == 503
    started = time.monotonic()
    response = _complete(base, timeout=60)  # fails, does not hang
    assert response.status_code >= 500, response.text
    assert time.monotonic() - started < 60

    code = server.stop(timeout=30)  # SIGTERM; SIGKILL only past 30 s
    assert code != -signal.SIGKILL, f"SIGTERM did not stop the server:\n{server.log_tail()}"


def test_a_dead_rank_0_leaves_no_worker_behind(server_factory: Callable[..., ServerProcess]) -> None:  # noqa: F811
    server = server_factory(*TP_FLAGS)
    assert _complete(server.base_url).status_code == 200
    [worker] = _workers(server)
    server.process.kill()
    server.process.wait(timeout=10)
    wait_for(lambda: not _alive(worker), 30, f"worker {worker} to exit after rank 0 died")
