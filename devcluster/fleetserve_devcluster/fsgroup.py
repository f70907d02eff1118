"""A pod's `fsGroup` on its volumes, as the kubelet's SetVolumeOwnership applies it.

Every entry of an emptyDir, configMap, secret, downwardAPI or projected
volume gets the group `fsGroup`; files get group read (read-only volumes) or
read-write (emptyDir), directories the same plus search and the setgid bit,
so what a container creates there stays in the group.  Symlinks (the atomic
writer's ``..data`` and entries) only change group.  hostPath and
persistentVolumeClaim volumes are left as they are (the kubelet manages a
`local` PersistentVolume's ownership too; the dev cluster does not).
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

READ_WRITE = 0o660
READ_ONLY = 0o440
SEARCH = 0o110


def _apply(path: str, gid: int, mask: int) -> None:
    st = os.lstat(path)
    os.lchown(path, -1, gid)
    if stat.S_ISLNK(st.st_mode):
        return
    mode = stat.S_IMODE(st.st_mode) | mask
    if stat.S_ISDIR(st.st_mode):
        mode |= SEARCH | stat.S_ISGID
    os.chmod(path, mode)


def set_volume_ownership(root: Path, gid: int, read_only: bool) -> None:
    """Give `root` and everything under it (never following a symlink) to group `gid`."""
    mask = READ_ONLY if read_only else READ_WRITE
    _apply(str(root), gid, mask)
    for directory, dirs, files in os.walk(root):
        for name in dirs + files:
            _apply(os.path.join(directory, name), gid, mask)


def file_mode(mode: int, fs_group: int | None) -> int:
    """A configMap/secret/projected file's mode once fsGroup applies (group read added)."""
    return mode | READ_ONLY if fs_group is not None else mode
