"""Detached processes tracked by pid file: start, liveness, stop (process groups), pid reuse."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from fleetserve_devcluster import processes


def _wait_for(pred, timeout: float = 10.0) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.05)
    return False


def _pid_alive(pid: int) -> bool:
    return processes._process_start_time(pid) is not None


def test_start_writes_pid_and_log_and_stop_terminates(tmp_path: Path) -> None:
    proc = processes.start(tmp_path, "sleeper", [sys.executable, "-c", "print('hello', flush=True); "
                                                 "import time; time.sleep(60)"])
    assert processes.read_pid(processes.pid_file(tmp_path, "sleeper")) == proc.pid
    assert processes.is_running(tmp_path, "sleeper")
    assert _wait_for(lambda: "hello" in processes.log_tail(tmp_path, "sleeper"))
    # Its own session: it survives the death of the CLI that started it.
    assert os.getsid(proc.pid) == proc.pid
    killed = processes.stop(processes.tracked(tmp_path), grace_s=5)
    assert killed == []
    assert not processes.is_running(tmp_path, "sleeper")
    assert not processes.pid_file(tmp_path, "sleeper").exists()


def test_stop_kills_the_whole_process_group(tmp_path: Path) -> None:
    marker = tmp_path / "child.pid"
    script = ("import subprocess, sys, time; "
              "c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
              f"open({str(marker)!r}, 'w').write(str(c.pid)); time.sleep(60)")
    processes.start(tmp_path, "parent", [sys.executable, "-c", script])
    assert _wait_for(lambda: marker.exists() and marker.read_text().isdigit())
    child = int(marker.read_text())
    processes.stop(processes.tracked(tmp_path), grace_s=5)
    assert _wait_for(lambda: not _pid_alive(child))


def test_sigterm_ignoring_process_is_killed_after_grace(tmp_path: Path) -> None:
    ready = tmp_path / "ready"
    script = (f"import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
              f"open({str(ready)!r}, 'w').close(); time.sleep(60)")
    processes.start(tmp_path, "stubborn", [sys.executable, "-c", script])
    assert _wait_for(ready.exists)
    assert processes.stop(processes.tracked(tmp_path), grace_s=0.5) == ["stubborn"]
    assert not processes.is_running(tmp_path, "stubborn")


def test_exited_process_is_not_running(tmp_path: Path) -> None:
    proc = processes.start(tmp_path, "oneshot", [sys.executable, "-c", "pass"])
    proc.wait(timeout=30)
    assert not processes.is_running(tmp_path, "oneshot")


def test_reused_pid_is_not_mistaken_for_ours(tmp_path: Path) -> None:
    # A pid file written long before the process with that pid started (pid reuse
    # after a reboot or wrap-around) must not count as our process.
    path = processes.pid_file(tmp_path, "stale")
    path.parent.mkdir(parents=True)
    path.write_text(f"{os.getpid()}\n")
    assert processes.is_running(tmp_path, "stale")
    old = time.time() - 10 * 24 * 3600
    os.utime(path, (old, old))
    assert not processes.is_running(tmp_path, "stale")
    # ...and `stop` leaves it alone (we are that process).
    processes.stop(processes.tracked(tmp_path), grace_s=0.1)
    assert not path.exists()


def test_garbage_pid_file_is_not_running(tmp_path: Path) -> None:
    path = processes.pid_file(tmp_path, "garbage")
    path.parent.mkdir(parents=True)
    path.write_text("not a pid\n")
    [entry] = processes.tracked(tmp_path)
    assert entry.pid is None and not entry.alive()
