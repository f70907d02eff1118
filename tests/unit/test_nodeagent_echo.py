"""The echo helper as a real process: binds $FLEETSERVE_HOST, readiness flips, records signals, drains."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_echo_binds_the_pod_ip_and_records_sigterm(tmp_path: Path) -> None:
    host = "127.0.0.77"
    port = _free_port(host)
    record = tmp_path / "events"
    env = {**os.environ, "FLEETSERVE_HOST": host, "HOSTNAME": "pod-a", "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen([sys.executable, "-m", "fleetserve_cli.main", "dev-cluster", "echo", "--port", str(port),
                             "--record", str(record), "--drain-seconds", "0.5"], env=env)
    try:
        deadline = time.monotonic() + 30
        while not record.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        base = f"http://{host}:{port}"
        assert json.loads(_get(f"{base}/")[1])["pod"] == "pod-a"
        assert _get(f"{base}/ready") == (200, "ok")
        urllib.request.urlopen(urllib.request.Request(f"{base}/control/ready?value=false", method="POST", data=b""))
        assert _get(f"{base}/ready")[0] == 503
        assert _get(f"{base}/prestop") == (200, "ok")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    finally:
        proc.kill()
    events = [line.rsplit(" ", 1)[0] for line in record.read_text().splitlines()]
    assert events == [f"start {proc.pid}", "prestop", "signal SIGTERM", "exit 0"]


def test_echo_exit_after_uses_the_exit_code(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    out = subprocess.run([sys.executable, "-m", "fleetserve_cli.main", "dev-cluster", "echo", "--host", "127.0.0.78",
                          "--port", str(_free_port("127.0.0.78")), "--exit-after", "0.2", "--exit-code", "3"],
                         env=env, timeout=30, capture_output=True)
    assert out.returncode == 3
