"""Mount points two pods share (real launcher, real mount namespaces): a pod's cleanup racing another
pod's start, a mount point behind a symlink (/var/run -> /run), and the last user removing it.

Two pods share a mount point the launcher created on the host (every pod with a ServiceAccount binds
its token at /var/run/secrets/kubernetes.io/serviceaccount).  The first pod's cleanup scans the
mount namespaces, finds none using the directory, and removes it; if the second pod's launcher binds
onto it between the scan and the `rmdir`, the kernel silently detaches that bind mount and the second
container's token is gone.  The test puts the second pod's start exactly there: it hooks a barrier
after the cleanup's (real) scan that starts the second pod and waits until it has either made its
mounts or is waiting for the mount-point lock.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from fleetserve_devcluster import locks, mountpoints

sys.path.insert(0, os.path.dirname(__file__))
from test_nodeagent_mountpoints import _start  # noqa: E402

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("unshare") or not shutil.which("nsenter"),
                                reason="needs root, unshare and nsenter")


def _waits_for_a_lock(pid: int) -> bool:
    """`pid` is blocked on a flock (a "->" line of /proc/locks)."""
    return any(line.split()[1] == "->" and line.split()[5] == str(pid)
               for line in Path("/proc/locks").read_text().splitlines() if len(line.split()) > 5)


def test_a_cleanup_never_removes_a_mount_point_a_starting_pod_binds_onto(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(locks.LOCK_DIR_ENV, str(tmp_path / "locks"))  # the launchers inherit it
    volume, host = tmp_path / "token-volume", tmp_path / "host"
    volume.mkdir()
    (volume / "token").write_text("the sa pod's token")
    host.mkdir()
    target = host / "var-run-secrets" / "kubernetes.io" / "serviceaccount"
    mounts = [{"source": str(volume), "target": str(target), "read_only": True}]
    # Pod A ran and is gone: it created the mount point and recorded it.
    record_a, record_b = tmp_path / "pod-a.mountpoints", tmp_path / "pod-b.mountpoints"
    pod_a = _start({"argv": ["/bin/true"], "env": {}, "workingDir": "/", "mounts": mounts,
                    "mountpoints": str(record_a)})
    assert pod_a.wait(timeout=60) == 0 and target.is_dir()

    pod_b: list[subprocess.Popen[str]] = []
    up = threading.Event()
    real_scan = mountpoints._mounted_paths

    def scan_then_start_pod_b() -> set[str]:
        mounted = real_scan()
        proc = _start({"argv": ["/bin/sh", "-c", "echo up; exec sleep 120"], "env": {}, "workingDir": "/",
                       "mounts": mounts, "mountpoints": str(record_b)})
        pod_b.append(proc)
        stdout = proc.stdout
        assert stdout is not None

        def wait_up() -> None:
            if stdout.readline() == "up\n":
                up.set()

        threading.Thread(target=wait_up, daemon=True).start()
        deadline = time.monotonic() + 120  # only so that a broken launcher fails the test instead of hanging it
        while not (up.is_set() or _waits_for_a_lock(proc.pid)):
            assert proc.poll() is None and time.monotonic() < deadline, "pod B's launcher neither ran nor waited"
            time.sleep(0.01)
        return mounted

    monkeypatch.setattr(mountpoints, "_mounted_paths", scan_then_start_pod_b)
    try:
        mountpoints.remove_created(record_a)  # pod A's cleanup, with pod B's start right after its scan
        monkeypatch.setattr(mountpoints, "_mounted_paths", real_scan)
        assert up.wait(timeout=120), "pod B did not start"
        seen = subprocess.run(["nsenter", "--mount", "--target", str(pod_b[0].pid), "cat", str(target / "token")],
                              capture_output=True, text=True)
        assert seen.stdout == "the sa pod's token", f"pod B lost its mount: {seen.stderr}"
    finally:
        for proc in pod_b:
            proc.kill()
            proc.wait()
    # Pod B recorded the mount point it made (pod A's removal came first): its cleanup leaves nothing.
    assert mountpoints.remove_created(record_b) and not any(host.iterdir())


def test_a_mount_point_under_a_symlinked_directory_is_seen_as_mounted(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The token's /var/run/secrets/... is /run/secrets/... in mountinfo (/var/run -> /run): a pod's
    cleanup must see that a running pod still mounts it."""
    monkeypatch.setenv(locks.LOCK_DIR_ENV, str(tmp_path / "locks"))
    volume, run = tmp_path / "token-volume", tmp_path / "run"
    volume.mkdir()
    (volume / "token").write_text("the sa pod's token")
    run.mkdir()
    (tmp_path / "var-run").symlink_to(run)
    target = tmp_path / "var-run" / "secrets" / "kubernetes.io" / "serviceaccount"
    mounts = [{"source": str(volume), "target": str(target), "read_only": True}]
    record_a, record_b = tmp_path / "pod-a.mountpoints", tmp_path / "pod-b.mountpoints"
    # Pod A created the mount point and is gone; pod B, started while A ran, mounts the same path.
    pod_a = _start({"argv": ["/bin/true"], "env": {}, "workingDir": "/", "mounts": mounts,
                    "mountpoints": str(record_a)})
    assert pod_a.wait(timeout=60) == 0
    pod_b = _start({"argv": ["/bin/sh", "-c", "echo up; exec sleep 120"], "env": {}, "workingDir": "/",
                    "mounts": mounts, "mountpoints": str(record_b)})
    try:
        assert pod_b.stdout is not None and pod_b.stdout.readline() == "up\n"
        assert mountpoints.remove_created(record_a) == []  # pod A's cleanup: B still mounts it
        seen = subprocess.run(["nsenter", "--mount", "--target", str(pod_b.pid), "cat", str(target / "token")],
                              capture_output=True, text=True)
        assert seen.stdout == "the sa pod's token", f"pod B lost its mount: {seen.stderr}"
    finally:
        pod_b.kill()
        pod_b.wait()
    assert mountpoints.remove_created(record_a) and not any(run.iterdir())


def test_the_last_pod_using_a_shared_mount_point_removes_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Pod B starts while pod A (which created the mount point) runs, so B finds it there and does not
    record it; A stops first and must leave it to B; B's cleanup then removes it (nothing left on the host)."""
    monkeypatch.setenv(locks.LOCK_DIR_ENV, str(tmp_path / "locks"))
    volume, host = tmp_path / "token-volume", tmp_path / "host"
    volume.mkdir()
    (volume / "token").write_text("a token")
    host.mkdir()
    mounts = [{"source": str(volume), "target": str(host / "secrets" / "serviceaccount"), "read_only": True}]
    records = {name: tmp_path / f"{name}.mountpoints" for name in ("a", "b")}
    pods = {name: _start({"argv": ["/bin/sh", "-c", "echo up; exec sleep 120"], "env": {}, "workingDir": "/",
                          "mounts": mounts, "mountpoints": str(records[name])}) for name in ("a",)}
    try:
        assert pods["a"].stdout is not None and pods["a"].stdout.readline() == "up\n"
        pods["b"] = _start({"argv": ["/bin/sh", "-c", "echo up; exec sleep 120"], "env": {}, "workingDir": "/",
                            "mounts": mounts, "mountpoints": str(records["b"])})
        assert pods["b"].stdout is not None and pods["b"].stdout.readline() == "up\n"
        pods["a"].kill()
        pods["a"].wait()
        assert mountpoints.remove_created(records["a"]) == []  # B still mounts it
        assert (host / "secrets" / "serviceaccount").is_dir()
    finally:
        for proc in pods.values():
            proc.kill()
            proc.wait()
    assert sorted(mountpoints.remove_created(records["b"])) == [str(host / "secrets"),
                                                                 str(host / "secrets" / "serviceaccount")]
    assert not any(host.iterdir()) and not any((tmp_path / "locks").iterdir())  # no pending list left either
