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
        # Nothing of the machine: no file read or write, no environment (it runs as root on the host).
        assert _get(f"{base}/file?path=/etc/hostname")[0] == 404
        assert _get(f"{base}/env?name=HOSTNAME")[0] == 404
        write = urllib.request.Request(f"{base}/write?path={tmp_path / 'planted'}", method="POST", data=b"")
        try:
            urllib.request.urlopen(write, timeout=5)
        except urllib.error.HTTPError as exc:
            assert exc.code == 404
        assert not (tmp_path / "planted").exists()
        # Only the pod's address: not loopback's 127.0.0.1 on the same port.
        with socket.socket() as probe:
            assert probe.connect_ex(("127.0.0.1", port)) != 0
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    finally:
        proc.kill()
    events = [line.rsplit(" ", 1)[0] for line in record.read_text().splitlines()]
    assert events == [f"start {proc.pid}", "prestop", "signal SIGTERM", "exit 0"]


def test_echo_exit_after_uses_the_exit_code(tmp_path: Path) -> None:
    env = {**os.environ, "FLEETSERVE_HOST": "127.0.0.78", "PYTHONPATH": os.pathsep.join(sys.path)}
    out = subprocess.run([sys.executable, "-m", "fleetserve_cli.main", "dev-cluster", "echo",
                          "--port", str(_free_port("127.0.0.78")), "--exit-after", "0.2", "--exit-code", "3"],
                         env=env, timeout=30, capture_output=True)
    assert out.returncode == 3


def test_echo_runs_only_on_a_pods_own_address() -> None:
    for host in (None, "", "0.0.0.0", "::"):
        env = {k: v for k, v in os.environ.items() if k != "FLEETSERVE_HOST"}
        env["PYTHONPATH"] = os.pathsep.join(sys.path)
        if host is not None:
            env["FLEETSERVE_HOST"] = host
        out = subprocess.run([sys.executable, "-m", "fleetserve_cli.main", "dev-cluster", "echo", "--port", "8400"],
                             env=env, timeout=30, capture_output=True, text=True)
        assert out.returncode == 2, host
        assert "runs only as a dev-cluster pod" in out.stderr
    assert subprocess.run([sys.executable, "-m", "fleetserve_cli.main", "dev-cluster", "echo", "--host", "0.0.0.0"],
                          env=env, timeout=30, capture_output=True).returncode == 2  # no --host option at all


def test_echo_is_not_in_the_product_cli_listing() -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    out = subprocess.run([sys.executable, "-m", "fleetserve_cli.main", "dev-cluster", "--help"],
                         env=env, timeout=30, capture_output=True, text=True)
    assert out.returncode == 0 and "up" in out.stdout
    assert "echo" not in out.stdout
