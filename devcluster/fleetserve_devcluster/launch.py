"""Container launcher: runs inside a fresh private mount namespace, bind-mounts the pod's volumes, execs.

The agent starts `unshare --mount --propagation private <python> -m
fleetserve_devcluster.launch <spec.json>`; the mounts made here are visible
only to this process and its children, so `/etc/fleetserve/server.yaml` of one
pod never shows up in another pod or on the host.  Mount points that do not
exist on the host are created there as empty directories (or empty files for a
file mount): a bind mount needs a mount point.
"""

from __future__ import annotations

import ctypes
import json
import os
import sys
from pathlib import Path

MS_RDONLY = 1
MS_REMOUNT = 32
MS_BIND = 4096
MS_REC = 16384


def _mount(source: str, target: str, flags: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.mount(source.encode(), target.encode(), None, flags, None) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount {source} -> {target}: {os.strerror(err)}")


def bind(source: str, target: str, read_only: bool) -> None:
    """Bind `source` at `target` (creating the mount point), then make it read-only if asked."""
    tgt = Path(target)
    if Path(source).is_dir():
        tgt.mkdir(parents=True, exist_ok=True)
    elif not tgt.exists():
        tgt.parent.mkdir(parents=True, exist_ok=True)
        tgt.touch()
    _mount(source, target, MS_BIND | MS_REC)
    if read_only:
        _mount(source, target, MS_BIND | MS_REMOUNT | MS_RDONLY)


def main(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    try:
        for m in spec["mounts"]:
            bind(m["source"], m["target"], m["read_only"])
        os.chdir(spec.get("workingDir") or "/")
    except OSError as exc:
        print(f"fleetserve dev-cluster: cannot set up the container: {exc}", file=sys.stderr)
        sys.exit(128)
    os.execve(spec["argv"][0], spec["argv"], spec["env"])


if __name__ == "__main__":
    main(sys.argv[1])
