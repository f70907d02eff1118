"""Container launcher: runs inside a fresh private mount namespace, bind-mounts the pod's volumes, execs.

The agent starts `unshare --mount --propagation private <python> -m
fleetserve_devcluster.launch` and writes the spec (JSON) to its stdin, which the
launcher then points at /dev/null: the spec carries the container's env, secret
values included, so it never touches the disk.  The mounts made here are visible
only to this process and its children, so `/etc/fleetserve/server.yaml` of one
pod never shows up in another pod or on the host.  A mount with a `sub_path` is
resolved beneath its volume's root by `subpath.open_beneath` and bound from the
opened descriptor (no symlink can lead it out of the volume).

The launcher asks the kernel for SIGKILL when the agent dies (PR_SET_PDEATHSIG),
here rather than in a `preexec_fn`, which is not safe in the threaded agent.  Mount points that do not
exist on the host are created there as empty directories (or empty files for a
file mount): a bind mount needs a mount point.

The host's fleetserve installation stands in for the container image, so a
volume must not hide it: when a mountPath covers one of the spec's ``keep``
directories (the interpreter and the fleetserve packages, see
:func:`runtime_paths`; e.g. the server pods' emptyDir at ``/tmp`` over a venv in
``/tmp/...``), that directory is bound back on top of the volume. Without this the
container's ``execve`` fails with ENOENT and the pod crash-loops.

Then the pod's securityContext (security.py decides, confine.py applies): the
image's directories that lie in a directory other users cannot enter are
reachable through a tmpfs mask, ``/sys`` and ``/proc/sys`` are read-only,
``readOnlyRootFilesystem`` makes every mount but the volumes read-only, and the
process takes the container's uid, gid, groups, capabilities and
``no_new_privs`` before the ``execve``.  Its hostname (own UTS namespace) is the
pod's.  An exec probe or hook enters the running container's namespaces with
``nsenter`` and takes the same identity with ``setpriv`` (probes.exec_in_container).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import importlib.util
import json
import os
import signal
import socket
import sys
from pathlib import Path

from . import confine, mountpoints
from .mountpoints import first_missing, record
from .subpath import open_beneath

MS_RDONLY = 1
MS_REMOUNT = 32
MS_BIND = 4096
MS_REC = 16384
PR_SET_PDEATHSIG = 1
# Top-level packages of the fleetserve distribution (an editable install keeps them outside the venv).
FLEETSERVE_PACKAGES = ("fleetserve_cli", "fleetserve_server", "fleetserve_operator", "fleetserve_router",
                       "fleetserve_devcluster")


def _mount(source: str, target: str, flags: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.mount(source.encode(), target.encode(), None, flags, None) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount {source} -> {target}: {os.strerror(err)}")


def bind(source: str, target: str, read_only: bool, is_dir: bool | None = None,
         record_file: str | None = None) -> None:
    """Bind `source` at `target` (creating the mount point), then make it read-only if asked.

    A mount point created on the host is recorded in `record_file`, for its removal (mountpoints.py).
    """
    tgt = Path(target)
    record(record_file, first_missing(tgt), target)
    if is_dir if is_dir is not None else Path(source).is_dir():
        tgt.mkdir(parents=True, exist_ok=True)
    elif not tgt.exists():
        tgt.parent.mkdir(parents=True, exist_ok=True)
        tgt.touch()
    _mount(source, target, MS_BIND | MS_REC)
    if read_only:
        _mount(source, target, MS_BIND | MS_REMOUNT | MS_RDONLY)


@functools.cache
def runtime_paths(executable: str) -> list[str]:
    """Host directories that ``executable`` (the agent's ``fleetserve``) runs from: its own directory,
    this interpreter's prefixes (the venv and the base Python) and the fleetserve packages' roots."""
    paths = {os.path.dirname(os.path.abspath(executable)), sys.prefix, sys.exec_prefix, sys.base_prefix,
             sys.base_exec_prefix}
    for name in FLEETSERVE_PACKAGES:
        spec = importlib.util.find_spec(name)
        if spec is not None:
            paths.update(os.path.dirname(location) for location in spec.submodule_search_locations or [])
    return sorted(os.path.abspath(p) for p in paths if p and os.path.isdir(p))


def hidden_paths(keep: list[str], targets: list[str]) -> list[str]:
    """The ``keep`` directories a mount at one of ``targets`` would hide, outermost only
    (binding one back brings back everything inside it)."""
    covered = sorted({k for k in map(os.path.normpath, keep)
                      if any(confine.under(k, os.path.normpath(t)) for t in targets)}, key=len)
    out: list[str] = []
    for path in covered:
        if not any(confine.under(path, outer) for outer in out):
            out.append(path)
    return out


def die_with_parent(parent: int | None) -> None:
    """SIGKILL this process when its parent (the agent) dies; exit now if it already has."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if parent is not None and os.getppid() != parent:  # the agent died before the prctl
        sys.exit(137)


def open_source(mount: dict) -> int:  # type: ignore[type-arg]
    """An O_PATH descriptor of a mount's source (its `sub_path` resolved beneath the volume)."""
    if mount.get("sub_path"):
        return open_beneath(mount["source"], mount["sub_path"])
    return os.open(mount["source"], os.O_PATH | os.O_CLOEXEC)


def read_spec(argv: list[str]) -> dict:  # type: ignore[type-arg]
    """The spec from stdin; stdin then becomes /dev/null, as a container's is.

    (A path argument is read instead: how an agent started before this change, still running on a
    shared machine while the code on disk is updated, launches its containers.)
    """
    spec = json.loads(Path(argv[0]).read_text() if argv else sys.stdin.buffer.read())
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    return spec  # type: ignore[no-any-return]


def set_up(spec: dict) -> None:  # type: ignore[type-arg]
    """The container's mount namespace and hostname, as root (see the module docstring)."""
    security = spec.get("security") or {}
    if spec.get("hostname"):
        socket.sethostname(spec["hostname"])
    targets = [m["target"] for m in spec["mounts"]]
    image = sorted({os.path.realpath(p) for p in spec.get("keep") or []})
    # Everything this process needs from the host is opened before the masks hide part of it.
    record_fd = os.open(spec["mountpoints"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600) \
        if spec.get("mountpoints") else None
    record_file = f"/proc/self/fd/{record_fd}" if record_fd is not None else None
    sources = [open_source(m) for m in spec["mounts"]]
    # Read-only data of the "image" (test models under the state dir), reachable like its programs.
    data = sorted({os.path.realpath(p) for p in spec.get("imageData") or [] if os.path.isdir(p)} - set(image))
    held = {path: os.open(path, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC) for path in [*image, *data]}
    # An agent started before this launcher (still running on a shared machine) sends no "security":
    # its containers get the mounts only, as they did then.
    legacy = "security" not in spec
    masks = [] if legacy else confine.unreachable_dirs([*image, *data])
    # No pod's cleanup removes a mount point between its creation here and the bind onto it (mountpoints.py).
    with mountpoints.exclusive() if record_fd is not None else contextlib.nullcontext():
        for directory in masks:
            confine.mask(directory, held, read_only=data)
        for m, fd in zip(spec["mounts"], sources, strict=True):
            source = f"/proc/self/fd/{fd}"
            in_mask = any(confine.under(os.path.normpath(m["target"]), d) for d in masks)
            bind(source, m["target"], m["read_only"], is_dir=os.path.isdir(source),
                 record_file=None if in_mask else record_file)
            # Bound back right after the mount that covers them (a deeper volume mounted later still goes
            # on top): the program must stay reachable.
            for path in hidden_paths(list(held), [m["target"]]):
                Path(path).mkdir(parents=True, exist_ok=True)
                _mount(f"/proc/self/fd/{held[path]}", path, MS_BIND | MS_REC)
    for fd in [*sources, *held.values(), *([record_fd] if record_fd is not None else [])]:
        os.close(fd)
    if not (legacy or security.get("privileged")):
        confine.protect_kernel_files()
    if security.get("readOnlyRootFilesystem"):
        confine.read_only_root([t for t, m in zip(targets, spec["mounts"], strict=True) if not m["read_only"]],
                               image)


def become_container(spec: dict) -> None:  # type: ignore[type-arg]
    """The container's identity and capabilities, then its working directory."""
    if "security" in spec:
        confine.drop_privileges(spec["security"])
    os.chdir(spec.get("workingDir") or "/")


def main(argv: list[str]) -> None:
    spec = read_spec(argv)
    if spec.get("mode") == "exec":  # a probe or hook of an agent started before setpriv took this over
        try:
            become_container(spec)
            os.execvpe(spec["argv"][0], spec["argv"], spec["env"])
        except OSError as exc:
            print(f"fleetserve dev-cluster: cannot run {spec['argv'][0]!r} in the container: {exc}", file=sys.stderr)
            sys.exit(127)
    die_with_parent(spec.get("parent"))
    try:
        set_up(spec)
        become_container(spec)
    except OSError as exc:
        print(f"fleetserve dev-cluster: cannot set up the container: {exc}", file=sys.stderr)
        sys.exit(128)
    try:
        os.execve(spec["argv"][0], spec["argv"], spec["env"])
    except OSError as exc:
        print(f"fleetserve dev-cluster: cannot run {spec['argv'][0]!r} in the container: {exc.strerror}",
              file=sys.stderr)
        sys.exit(127)


if __name__ == "__main__":
    main(sys.argv[1:])
