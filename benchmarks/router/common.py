"""Small helpers shared by the router benchmarks (processes, ports, percentiles)."""

from __future__ import annotations

import math
import socket
import subprocess
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def percentile(values: Sequence[float], p: float) -> float | None:
    """Nearest-rank percentile (the value below which p % of the samples fall), rounded to 3 places."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(p / 100 * len(ordered)))
    return round(ordered[rank - 1], 3)


def start_process(name: str, argv: list[str], ready_url: str, log_dir: Path,
                  timeout: float = 120.0, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    """Start ``argv`` with its output in ``log_dir/name.log`` and wait until ``ready_url`` answers 200."""
    log = open(log_dir / f"{name}.log", "wb")  # noqa: SIM115 - the child keeps it
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited {proc.returncode}: {(log_dir / f'{name}.log').read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(ready_url, timeout=2) as resp:
                if resp.status == 200:
                    return proc
        except OSError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise TimeoutError(f"{name} not ready at {ready_url} after {timeout:g} s")


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 30.0) -> int:
    if proc.poll() is None:
        proc.terminate()
        try:
            return proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
    return proc.wait()
