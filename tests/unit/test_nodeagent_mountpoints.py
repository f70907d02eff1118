"""Mount points the launcher creates on the host are removed once no namespace mounts them
(real launcher, real mount namespaces)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from fleetserve_devcluster.mountpoints import remove_created

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("unshare"), reason="needs root and unshare")


def _start(spec: dict[str, object]) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen(["unshare", "--mount", "--propagation", "private", sys.executable, "-m",
                             "fleetserve_devcluster.launch"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True, env=env)
    assert proc.stdin is not None
    proc.stdin.write(json.dumps(spec))
    proc.stdin.close()
    return proc


def test_created_mount_points_go_once_no_namespace_mounts_them(tmp_path: Path) -> None:
    volume, host = tmp_path / "vol", tmp_path / "host"
    volume.mkdir()
    (volume / "file").write_text("x")
    host.mkdir()
    (host / "kept").mkdir()  # existed before: never removed
    record = tmp_path / "mountpoints"
    mounts = [{"source": str(volume), "target": str(host / "a" / "b" / "c"), "read_only": True},
              {"source": str(volume), "sub_path": "file", "target": str(host / "kept" / "conf.yaml"),
               "read_only": True}]
    spec = {"argv": ["/bin/sh", "-c", "echo up; exec sleep 60"], "env": {}, "workingDir": "/", "mounts": mounts,
            "mountpoints": str(record)}
    holder = _start(spec)  # a pod that keeps running with the mounts
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "up\n"
        assert (host / "a" / "b" / "c").is_dir() and (host / "kept" / "conf.yaml").is_file()
        assert remove_created(record) == []  # still mounted in the running pod's namespace: left alone
        assert (host / "a" / "b" / "c").is_dir()
    finally:
        holder.kill()
        holder.wait()
    removed = remove_created(record)
    assert sorted(removed) == sorted([str(host / "a" / "b" / "c"), str(host / "a" / "b"), str(host / "a"),
                                      str(host / "kept" / "conf.yaml")])
    assert sorted(p.name for p in host.iterdir()) == ["kept"] and not any((host / "kept").iterdir())


def test_a_mount_point_that_got_contents_on_the_host_is_kept(tmp_path: Path) -> None:
    volume, record = tmp_path / "vol", tmp_path / "mountpoints"
    volume.mkdir()
    target = tmp_path / "host" / "etc-x"
    done = _start({"argv": ["/bin/true"], "env": {}, "workingDir": "/", "mountpoints": str(record),
                   "mounts": [{"source": str(volume), "target": str(target), "read_only": False}]})
    assert done.wait(timeout=30) == 0
    (target / "written-on-the-host").write_text("someone's data")
    assert remove_created(record) == []
    assert (target / "written-on-the-host").read_text() == "someone's data"
