"""Lock files of the dev cluster, in a directory only it owns.

Two kinds: the `up`/`down` lock of one state dir and the pod-network block
each running node agent holds (see agent.claim_network_block).  Both are
flocks, so the kernel drops them when their holder dies, even by SIGKILL.

Never in a world-writable directory: another local user could create the
file first, or a symlink in its place, and make the dev cluster (running as
root) truncate or lock a file of their choosing.  So the directory is
`/run/fleetserve-devcluster` for root (the node agent needs root) and
`<cache>/locks` otherwise; it is created 0700 and refused unless it is a real
directory owned by this user that nobody else can write; every file is opened
with O_NOFOLLOW.  A lock file is removed by its holder on release (`down` and
an agent's exit leave none behind); `acquire` checks that the file it locked
is still the one at the path, so removing it never lets two holders in.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import stat
from pathlib import Path

from . import tools

ROOT_LOCK_DIR = Path("/run/fleetserve-devcluster")
LOCK_DIR_ENV = "FLEETSERVE_DEV_CLUSTER_LOCK_DIR"  # tests: a private directory of their own


class LockDirError(RuntimeError):
    """The lock directory is not private to this user; the message says what is wrong."""


def lock_dir() -> Path:
    override = os.environ.get(LOCK_DIR_ENV)
    if override:
        return Path(override)
    return ROOT_LOCK_DIR if os.geteuid() == 0 else tools.cache_dir() / "locks"


def private_dir(path: Path) -> Path:
    """Create `path` 0700 if missing; refuse it unless it is a directory of ours nobody else can write."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode):
        raise LockDirError(f"{path} must be a directory (it is a symlink or a file): remove it and retry")
    if st.st_uid != os.geteuid():
        raise LockDirError(f"{path} belongs to uid {st.st_uid}, not to this user ({os.geteuid()}): "
                           "the dev cluster keeps its lock files only in a directory it owns")
    if st.st_mode & 0o022:
        raise LockDirError(f"{path} is writable by other users (mode {stat.S_IMODE(st.st_mode):o}): "
                           f"run `chmod 700 {path}`")
    return path


def _open(path: Path) -> int:
    return os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, 0o600)


def acquire(path: Path, blocking: bool = True) -> int | None:
    """flock `path` exclusively; the open descriptor, or None when not blocking and someone holds it."""
    while True:
        try:
            fd = _open(path)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise LockDirError(f"{path} is a symlink: refusing to use it as a lock file") from None
            raise
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            os.close(fd)
            return None
        try:
            same = os.stat(path, follow_symlinks=False).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)  # the holder before us removed it on release: lock the new one


def release(fd: int, path: Path) -> None:
    """Remove the lock file, then drop the lock (in this order: see `acquire`)."""
    try:
        if os.stat(path, follow_symlinks=False).st_ino == os.fstat(fd).st_ino:
            os.unlink(path)
    except FileNotFoundError:
        pass
    os.close(fd)


def state_lock_path(state_dir: Path) -> Path:
    """The `up`/`down` lock of one state dir (by its resolved path's hash)."""
    digest = hashlib.sha256(str(state_dir.resolve()).encode()).hexdigest()[:16]
    return private_dir(lock_dir()) / f"state-{digest}.lock"


def held_elsewhere(path: Path) -> bool:
    """True when another process holds a lock on an existing file `path` (never creates or follows it)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return False
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
