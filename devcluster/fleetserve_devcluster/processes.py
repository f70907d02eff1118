"""Long-running processes of the dev cluster: started detached, tracked by pid file.

Contract shared by every component (control plane, node agent, service proxy):

* ``<state>/pids/<name>.pid`` holds the decimal pid (and a newline);
* ``<state>/logs/<name>.log`` receives the process's stdout and stderr;
* the process runs in its own session (``start_new_session``), so it survives
  the CLI that started it and ``down`` can signal its whole process group.

A pid file whose process has exited, or whose pid was reused by a process that
started after the file was written, counts as "not running" — so a stale
state dir never makes ``down`` signal an unrelated process.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

# Clock ticks per second of /proc/<pid>/stat's start time.
_CLK_TCK = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Tracked:
    """One pid file and what it says."""

    name: str
    pid_file: Path
    pid: int | None  # None: the file is unreadable or empty

    def alive(self) -> bool:
        return self.pid is not None and _same_process(self.pid, self.pid_file)


def pid_file(state_dir: Path, name: str) -> Path:
    return state_dir / "pids" / f"{name}.pid"


def log_file(state_dir: Path, name: str) -> Path:
    return state_dir / "logs" / f"{name}.log"


def _boot_time() -> float:
    with open("/proc/stat") as f:
        for line in f:
            if line.startswith("btime "):
                return float(line.split()[1])
    return 0.0


def _process_start_time(pid: int) -> float | None:
    """Wall-clock start time of ``pid``, or None when there is no such (non-zombie) process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # The command name (field 2) may contain spaces and parentheses: split after the last ')'.
    fields = stat[stat.rindex(")") + 2:].split()
    if fields[0] == "Z":  # a zombie has exited already
        return None
    return _boot_time() + int(fields[19]) / _CLK_TCK


def _same_process(pid: int, pidfile: Path) -> bool:
    started = _process_start_time(pid)
    if started is None:
        return False
    try:
        written = pidfile.stat().st_mtime
    except FileNotFoundError:
        return True
    # The pid file is written right after the process starts; a process that
    # started later than that (plus clock-tick slack) reuses the pid.
    return started <= written + 2.0


def read_pid(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except FileNotFoundError:
        return None
    return int(text) if text.isdigit() else None


def tracked(state_dir: Path) -> list[Tracked]:
    """Every pid file under ``<state>/pids``, sorted by name."""
    pids_dir = state_dir / "pids"
    if not pids_dir.is_dir():
        return []
    return [Tracked(p.stem, p, read_pid(p)) for p in sorted(pids_dir.glob("*.pid"))]


def is_running(state_dir: Path, name: str) -> bool:
    path = pid_file(state_dir, name)
    pid = read_pid(path)
    return pid is not None and _same_process(pid, path)


def start(state_dir: Path, name: str, argv: Sequence[str], env: Mapping[str, str] | None = None,
          cwd: Path | None = None) -> subprocess.Popen[bytes]:
    """Start ``argv`` detached, logging to ``logs/<name>.log`` and recording ``pids/<name>.pid``.

    The log is appended to (a restart keeps the previous run's lines, marked).
    """
    log = log_file(state_dir, name)
    log.parent.mkdir(parents=True, exist_ok=True)
    pid_file(state_dir, name).parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        out.write(f"\n=== {time.strftime('%Y-%m-%dT%H:%M:%S')} starting {name}: {' '.join(argv)}\n".encode())
        out.flush()
        proc = subprocess.Popen(list(argv), stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                env=dict(env) if env is not None else None, cwd=cwd, start_new_session=True)
    tmp = pid_file(state_dir, name).with_suffix(".tmp")
    tmp.write_text(f"{proc.pid}\n")
    tmp.replace(pid_file(state_dir, name))
    return proc


def log_tail(state_dir: Path, name: str, lines: int = 25) -> str:
    try:
        text = log_file(state_dir, name).read_text(errors="replace")
    except FileNotFoundError:
        return "(no log written)"
    return "\n".join(text.rstrip("\n").splitlines()[-lines:])


def _signal(pid: int, sig: signal.Signals) -> None:
    try:
        # A session leader's process group holds its children too (e.g. pods of the node agent).
        if os.getpgid(pid) == pid:
            os.killpg(pid, sig)
        else:
            os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _reap(pid: int) -> None:
    """Collect ``pid`` if it is our child (started by this very process), so it is no zombie."""
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def stop(entries: Iterable[Tracked], grace_s: float = 10.0) -> list[str]:
    """SIGTERM every live entry, wait up to ``grace_s``, then SIGKILL the rest.

    Returns the names that had to be killed.  Pid files are removed.
    """
    entries = list(entries)
    live = {t.name: (t, t.pid) for t in entries if t.pid is not None and t.alive()}
    for _, pid in live.values():
        _signal(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    remaining = dict(live)
    while remaining and time.monotonic() < deadline:
        time.sleep(0.1)
        for _, pid in remaining.values():
            _reap(pid)
        remaining = {n: (t, pid) for n, (t, pid) in remaining.items() if t.alive()}
    for _, pid in remaining.values():
        _signal(pid, signal.SIGKILL)
    end = time.monotonic() + 5.0
    while any(t.alive() for t, _ in remaining.values()) and time.monotonic() < end:
        for _, pid in remaining.values():
            _reap(pid)
        time.sleep(0.05)
    for t in entries:
        t.pid_file.unlink(missing_ok=True)
    return sorted(remaining)
