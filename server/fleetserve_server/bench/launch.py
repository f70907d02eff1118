"""Start a server process on loopback, wait until it answers, stop it (SIGTERM, then SIGKILL)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


@dataclass
class ServerProcess:
    """A server subprocess whose combined output goes to ``log_path``."""

    name: str
    process: subprocess.Popen[bytes]
    base_url: str
    log_path: Path

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM (a fleetserve server drains), SIGKILL if it outlives ``timeout``. Returns the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return int(self.process.returncode)


def wait_ready(url: str, process: subprocess.Popen[bytes], timeout: float, log_path: Path) -> None:
    """Poll ``url`` until it returns 200; fail early if the process exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with code {process.returncode} before it was ready:\n"
                               + log_path.read_text(errors="replace")[-3000:])
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            pass
        time.sleep(0.25)
    raise TimeoutError(f"{url} not ready after {timeout:.0f}s:\n" + log_path.read_text(errors="replace")[-3000:])


def start_server(name: str, argv: list[str], *, port: int, ready_path: str, log_dir: Path,
                 timeout: float = 600.0, env: dict[str, str] | None = None,
                 host: str = "127.0.0.1") -> ServerProcess:
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{name}.log"
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(argv, stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   env={**os.environ, **(env or {})})
    server = ServerProcess(name, process, f"http://{host}:{port}", log_path)
    try:
        wait_ready(server.base_url + ready_path, process, timeout, log_path)
    except BaseException:
        server.stop(timeout=5)
        raise
    return server


def fleetserve_argv(model: str, port: int, extra: list[str] | None = None, host: str = "127.0.0.1") -> list[str]:
    return [sys.executable, "-m", "fleetserve_cli.main", "serve", "--model", model, "--host", host,
            "--port", str(port), *(extra or [])]
