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
cluster) is left alone; only empty directories and empty regular files are
removed, never anything that got contents on the host.

Standard library only: the container launcher imports it.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

RECORD = "mountpoints"


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


def remove_created(record_file: Path) -> list[str]:
    """Remove the recorded mount points that are empty and mounted nowhere; return what was removed."""
    try:
        lines = record_file.read_text().splitlines()
    except FileNotFoundError:
        return []
    entries = sorted({tuple(line.split("\t", 1)) for line in lines if "\t" in line},
                     key=lambda e: -len(e[1]))  # deepest first
    mounted = _mounted_paths()
    removed: list[str] = []
    for top, target in entries:
        if _busy(top, mounted):
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
    return removed
