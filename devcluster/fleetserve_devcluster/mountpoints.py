"""Mount points the container launcher had to create on the host, and their removal.

A container's volumes are bind-mounted in its own mount namespace, but a bind
mount needs a mount point, and the "image" is the host's filesystem: a
mountPath that does not exist (say `/etc/fleetserve`) is created on the host
as an empty directory (or an empty file).  The launcher records each one it
created in `<pod dir>/mountpoints` (`<topmost created path>\t<mountPath>`), and
the pod worker removes them when the pod's processes are gone.

Removal is careful: Linux lets `rmdir` remove a directory that is a mount
point in *another* mount namespace and silently detaches that mount, so a
path still mounted in any namespace on the machine (another pod, another dev
cluster) is left alone -- compared by its resolved path, as mountinfo names
it (a pod's token at /var/run/secrets/... is mounted at /run/secrets/...); only empty directories and empty regular files are
removed, never anything that got contents on the host.

Creation and removal exclude each other through one flock for the whole
machine (`mountpoints.lock` in the dev cluster's lock directory, see locks.py):
a launcher holds it from its first mount point's creation until its last bind
mount is made, a removal from its scan of the mount namespaces until its last
`rmdir`.  Without it a pod's cleanup could scan the namespaces, then a new pod's
launcher bind onto the same (shared) directory, then the cleanup remove it --
silently detaching the new pod's mount (its service-account token gone).

Standard library only: the container launcher imports it.
"""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Iterator
from pathlib import Path

from . import locks

RECORD = "mountpoints"
LOCK = "mountpoints.lock"
PENDING = "mountpoints.pending"


@contextlib.contextmanager
def exclusive() -> Iterator[None]:
    """Hold the machine's mount-point lock (creation and removal of mount points, every dev cluster)."""
    path = locks.private_dir(locks.lock_dir()) / LOCK
    fd = locks.acquire(path)
    assert fd is not None  # blocking
    try:
        yield
    finally:
        locks.release(fd, path)


def first_missing(path: Path) -> Path | None:
    """The topmost component of `path` that does not exist yet (None when `path` exists)."""
    if os.path.lexists(path):
        return None
    top = path
    while not os.path.lexists(top.parent) and top.parent != top:
        top = top.parent
    return top


def record(record_file: str | None, top: Path | None, target: str) -> None:
    if record_file and top is not None:
        with open(record_file, "a") as f:
            f.write(f"{top}\t{target}\n")


def _mounted_paths() -> set[str]:
    """Every mount point of every mount namespace on the machine (one mountinfo per namespace)."""
    seen: set[str] = set()
    points: set[str] = set()
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            ns = os.readlink(f"/proc/{pid}/ns/mnt")
            if ns in seen:
                continue
            seen.add(ns)
            with open(f"/proc/{pid}/mountinfo") as f:
                for line in f:
                    # field 5 is the mount point, octal-escaped (\040 for a space)
                    points.add(line.split(" ")[4].encode().decode("unicode_escape"))
        except OSError:
            continue
    return points


def _busy(path: str, mounted: set[str]) -> bool:
    prefix = path.rstrip("/") + "/"
    return any(p == path or p.startswith(prefix) for p in mounted)


def _entries(text: str) -> set[tuple[str, str]]:
    return {(e[0], e[1]) for e in (line.split("\t", 1) for line in text.splitlines()) if len(e) == 2}


def remove_created(record_file: Path) -> list[str]:
    """Remove the recorded mount points that are empty and mounted nowhere; return what was removed.

    One still mounted elsewhere (a pod started while this one ran found it there, so did not record
    it) is handed over to the machine's pending list (`mountpoints.pending` beside the lock), which
    every later call retries: the last pod using it removes it.
    """
    try:
        entries = _entries(record_file.read_text())
    except FileNotFoundError:
        entries = set()
    with exclusive():  # no launcher creates or binds a mount point between the scan and the rmdirs
        pending = locks.private_dir(locks.lock_dir()) / PENDING
        try:
            fd = os.open(pending, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            with os.fdopen(fd) as f:
                entries |= _entries(f.read())
        except FileNotFoundError:
            pass
        if not entries:
            return []
        removed, busy = _remove(sorted(entries, key=lambda e: -len(e[1])), _mounted_paths())  # deepest first
        if busy:
            fd = os.open(pending, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            with os.fdopen(fd, "w") as f:
                f.writelines(f"{top}\t{target}\n" for top, target in sorted(busy))
        else:
            with contextlib.suppress(FileNotFoundError):
                pending.unlink()
        return removed


def _remove(entries: list[tuple[str, str]], mounted: set[str]) -> tuple[list[str], list[tuple[str, str]]]:
    """Remove what is mounted nowhere; (what was removed, the entries still mounted somewhere)."""
    busy: list[tuple[str, str]] = []
    removed: list[str] = []
    for top, target in entries:
        # mountinfo names the resolved path: /var/run/secrets is mounted as /run/secrets (/var/run -> /run)
        if _busy(top, mounted) or _busy(os.path.realpath(top), mounted):
            busy.append((top, target))
            continue
        path = Path(target)
        try:
            st = os.lstat(path)
            if stat.S_ISREG(st.st_mode) and st.st_size == 0:
                path.unlink()
                removed.append(str(path))
                path = path.parent
            # Empty directories from the mount point up to the topmost one the launcher created.
            while path.is_relative_to(top):
                path.rmdir()
                removed.append(str(path))
                if path == Path(top):
                    break
                path = path.parent
        except OSError:
            continue  # not empty (someone wrote into it on the host), or gone already: leave it
    return removed, busy
