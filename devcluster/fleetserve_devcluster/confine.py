"""What the container launcher does to its own process before it execs the container (Linux only).

All of it runs in the container's private mount namespace, as root, in the
launcher process (never in the threaded agent), in this order:

1. ``mask``: the host's installation is the image, and part of it may lie in a
   directory other users cannot enter (``/root/.pyenv/...`` under the 0700
   ``/root``).  Each such directory is covered with an empty tmpfs, and only the
   image's directories inside it are bound back, so a container running as any
   user reaches its program, and none reaches the rest (the dev cluster's state,
   the CA key, caches) — whatever its uid.
2. ``protect_kernel_files``: ``/sys`` and ``/proc/sys`` read-only unless
   ``privileged``, as runc mounts them.
3. ``read_only_root``: every mount but the volumes, ``/proc`` and ``/dev``
   remounted read-only (``readOnlyRootFilesystem``); per mount, so only this
   namespace sees it.
4. ``drop_privileges``: the capability bounding set cut to the container's,
   ambient and inheritable sets cleared, supplementary groups, gid and uid set,
   ``no_new_privs`` when asked.  A non-root uid keeps no capability (as with
   containerd); root keeps the bounding set across execve.

Standard library only: the launcher imports it.
"""

from __future__ import annotations

import ctypes
import errno
import os
from collections.abc import Iterable

MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_REMOUNT = 32
MS_NOATIME = 1024
MS_NODIRATIME = 2048
MS_BIND = 4096
MS_REC = 16384
MS_RELATIME = 1 << 21
# statvfs f_flag bit -> the MS_ flag a bind remount must repeat to keep it
_KEPT_FLAGS = {os.ST_NOSUID: MS_NOSUID, os.ST_NODEV: MS_NODEV, os.ST_NOEXEC: MS_NOEXEC,
               os.ST_NOATIME: MS_NOATIME, os.ST_NODIRATIME: MS_NODIRATIME, os.ST_RELATIME: MS_RELATIME}
PR_CAPBSET_DROP = 24
PR_SET_NO_NEW_PRIVS = 38
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4
_CAP_VERSION_3 = 0x20080522


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def _check(result: int, what: str) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _prctl(option: int, *args: int) -> int:
    values = [*args, 0, 0, 0, 0][:4]
    return int(_libc().prctl(ctypes.c_int(option), *(ctypes.c_ulong(v) for v in values)))


def _encode(text: str | None) -> bytes | None:
    return text.encode() if text is not None else None


def mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    enc = _encode
    _check(_libc().mount(enc(source), target.encode(), enc(fstype), flags, enc(data)), f"mount {target}")


def under(path: str, directory: str) -> bool:
    return path == directory or path.startswith(directory.rstrip("/") + "/")


def unreachable_dirs(paths: Iterable[str]) -> list[str]:
    """For each path, the outermost ancestor that other users may not enter (no o+x), outermost only."""
    found: set[str] = set()
    for path in paths:
        parts = [p for p in os.path.realpath(path).split("/") if p]
        for i in range(1, len(parts)):
            ancestor = "/" + "/".join(parts[:i])
            try:
                if not os.stat(ancestor).st_mode & 0o001:
                    found.add(ancestor)
                    break
            except OSError:
                break
    return [d for d in sorted(found) if not any(under(d, o) and d != o for o in found)]


def mask(directory: str, image_fds: dict[str, int], read_only: Iterable[str] = ()) -> None:
    """Cover `directory` with an empty tmpfs, then bind back the image paths (opened before) inside it;
    those in `read_only` read-only."""
    mount("tmpfs", directory, "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755,size=16m")
    read_only = set(read_only)
    for path, fd in sorted(image_fds.items()):
        if under(path, directory) and path != directory:
            os.makedirs(path, mode=0o755, exist_ok=True)
            mount(f"/proc/self/fd/{fd}", path, None, MS_BIND | MS_REC)
            if path in read_only:
                remount_read_only(path)


def mount_points() -> list[str]:
    """This namespace's mount points, in mount order (/proc/self/mountinfo field 5, unescaped)."""
    with open("/proc/self/mountinfo") as f:
        return [line.split(" ")[4].encode().decode("unicode_escape") for line in f]


def remount_read_only(path: str) -> bool:
    """Make the mount at `path` read-only, keeping its other flags; False when nothing is mounted there
    in this view (a mount hidden under a later one) or it already is read-only."""
    try:
        flags = os.statvfs(path).f_flag
    except OSError:
        return False
    if flags & os.ST_RDONLY:
        return False
    kept = 0
    for st, ms in _KEPT_FLAGS.items():
        if flags & st:
            kept |= ms
    try:
        mount(None, path, None, MS_REMOUNT | MS_BIND | MS_RDONLY | kept)
    except OSError as exc:
        if exc.errno in (errno.EINVAL, errno.ENOENT):  # not a mount point in this view
            return False
        raise
    return True


def protect_kernel_files() -> None:
    """/sys (with the cgroup mounts under it) and /proc/sys read-only, as runc does for a container."""
    mount("/proc/sys", "/proc/sys", None, MS_BIND | MS_REC)
    for point in mount_points():
        if under(point, "/sys") or under(point, "/proc/sys"):
            remount_read_only(point)


def read_only_root(writable: Iterable[str], image: Iterable[str]) -> None:
    """Every mount read-only except the volumes at `writable` (and what is mounted inside them, but for
    the `image` paths bound back there), /proc and /dev."""
    volumes = [os.path.normpath(w) for w in writable]
    image = {os.path.normpath(i) for i in image}
    for point in mount_points():
        if under(point, "/proc") or under(point, "/dev"):
            continue
        if point in volumes or (point not in image and any(under(point, v) for v in volumes)):
            continue
        remount_read_only(point)


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


def _set_capabilities(keep: set[int]) -> None:
    """Effective and permitted cut to `keep`, inheritable empty."""
    libc = _libc()
    header = _CapHeader(_CAP_VERSION_3, 0)
    data = (_CapData * 2)()
    _check(libc.capget(ctypes.byref(header), data), "capget")
    for word in (0, 1):
        mask_bits = sum(1 << (c - 32 * word) for c in keep if 32 * word <= c < 32 * (word + 1))
        data[word].effective &= mask_bits
        data[word].permitted &= mask_bits
        data[word].inheritable = 0
    _check(libc.capset(ctypes.byref(header), data), "capset")


def drop_privileges(security: dict) -> None:  # type: ignore[type-arg]
    """Become the container's user with the container's capabilities (see the module docstring)."""
    keep = {int(c) for c in security.get("capabilities", [])}
    with open("/proc/sys/kernel/cap_last_cap") as f:
        last = int(f.read())
    for cap in range(last + 1):
        if cap not in keep:
            _check(_prctl(PR_CAPBSET_DROP, cap), f"drop capability {cap} from the bounding set")
    _check(_prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL), "clear the ambient capabilities")
    uid, gid = int(security.get("uid", 0)), int(security.get("gid", 0))
    os.setgroups([int(g) for g in security.get("groups", [gid])])
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)  # a non-zero uid loses every permitted and effective capability here
    _set_capabilities(keep)
    if security.get("noNewPrivs"):
        _check(_prctl(PR_SET_NO_NEW_PRIVS, 1), "set no_new_privs")
