"""Resolve a volume mount's `subPath` beneath the volume's root, never out of it.

The class of bug of CVE-2017-1002101: a container writes a symlink into a
volume (``escape -> /``), and a later `subPath: escape/etc` bind-mounts the
host's ``/etc`` into a container.  The kubelet's answer (and ours): resolve the
subPath *beneath* the volume root, in the process that makes the mount, and
bind-mount the opened file descriptor (``/proc/self/fd/N``), so nothing can
swap a component between the check and the mount.

`open_beneath` uses ``openat2(RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS)``
(Linux 5.6+): symlinks that stay inside the volume (a ConfigMap volume's
``..data`` links) resolve as they would in the container, while ``..`` above
the root, an absolute symlink or one that leads out of the volume fail with
EXDEV.  Where the kernel lacks openat2 it walks component by component with
``O_NOFOLLOW`` and refuses every symlink (stricter, never looser).

Standard library only: the container launcher imports it.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform

# openat2(2): the syscall number is the same on x86_64 and arm64 (generic table).
SYS_OPENAT2 = 437 if platform.machine() in ("x86_64", "aarch64", "arm64") else -1
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_BENEATH = 0x08


class SubPathError(OSError):
    """The subPath does not resolve to an entry inside the volume."""


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


def check_sub_path(sub_path: str) -> list[str]:
    """The components of a relative, `..`-free subPath (the API server's own validation, repeated)."""
    if not sub_path or sub_path.startswith("/"):
        raise SubPathError(errno.EINVAL, f"subPath {sub_path!r} must be a relative path")
    parts = [p for p in sub_path.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise SubPathError(errno.EINVAL, f"subPath {sub_path!r} must not contain '..'")
    return parts


def _openat2(root_fd: int, path: str) -> int:
    libc = ctypes.CDLL(None, use_errno=True)
    how = _OpenHow(os.O_PATH | os.O_CLOEXEC, 0, RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS)
    fd = libc.syscall(SYS_OPENAT2, root_fd, path.encode(), ctypes.byref(how), ctypes.sizeof(how))
    if fd < 0:
        raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
    return int(fd)


def _walk_no_symlinks(root_fd: int, parts: list[str]) -> int:
    fd = os.dup(root_fd)
    try:
        for part in parts:
            nxt = os.open(part, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
            os.close(fd)
            fd = nxt
            if os.fstat(fd).st_mode & 0o170000 == 0o120000:  # O_PATH|O_NOFOLLOW opened the link itself
                raise OSError(errno.ELOOP, "a symlink (refused without openat2)")
        return fd
    except BaseException:
        os.close(fd)
        raise


def open_beneath(root: str, sub_path: str) -> int:
    """An ``O_PATH`` descriptor of ``root/sub_path``, resolved without leaving ``root``.

    Raises SubPathError naming the subPath when it escapes the volume or does not exist.
    """
    parts = check_sub_path(sub_path)
    root_fd = os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        try:
            if SYS_OPENAT2 < 0:
                raise OSError(errno.ENOSYS, "no openat2")
            return _openat2(root_fd, "/".join(parts) or ".")
        except OSError as exc:
            if exc.errno == errno.ENOSYS:
                try:
                    return _walk_no_symlinks(root_fd, parts)
                except OSError as walk_exc:
                    exc = walk_exc
            if exc.errno in (errno.EXDEV, errno.ELOOP):
                raise SubPathError(exc.errno, f"subPath {sub_path!r} leads out of the volume "
                                              "(through a symlink or '..'); refused") from None
            if exc.errno == errno.ENOENT:
                raise SubPathError(exc.errno, f"subPath {sub_path!r} does not exist in the volume") from None
            raise SubPathError(exc.errno or errno.EIO, f"subPath {sub_path!r}: {exc.strerror}") from None
    finally:
        os.close(root_fd)
