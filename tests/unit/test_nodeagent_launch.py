"""The container launcher keeps the host's fleetserve installation (the dev cluster's "image")
reachable when a pod volume is mounted over it, e.g. an emptyDir at /tmp over a venv in /tmp."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from fleetserve_devcluster.launch import hidden_paths, runtime_paths


def test_hidden_paths_are_the_outermost_kept_directories_at_or_under_a_mount_target() -> None:
    keep = ["/tmp/ci/.venv", "/tmp/ci", "/tmp/ci/server", "/tmpfs/x", "/work/src", "/etc/fleetserve"]
    assert hidden_paths(keep, ["/tmp", "/etc/fleetserve/"]) == ["/tmp/ci", "/etc/fleetserve"]
    assert hidden_paths(keep, ["/var/cache/fleetserve"]) == []
    assert hidden_paths(["/tmp/ci/.venv"], ["/"]) == ["/tmp/ci/.venv"]


def test_runtime_paths_cover_the_interpreter_and_every_fleetserve_package() -> None:
    import fleetserve_cli
    import fleetserve_devcluster
    import fleetserve_operator
    import fleetserve_server

    paths = runtime_paths(str(Path(sys.executable).parent / "fleetserve"))
    assert sys.prefix in paths and sys.base_prefix in paths
    for package in (fleetserve_cli, fleetserve_devcluster, fleetserve_operator, fleetserve_server):
        assert any(Path(package.__file__).is_relative_to(p) for p in paths), package.__name__


def _launch(tmp_path: Path, keep: list[str]) -> subprocess.CompletedProcess[str]:
    """Run a program installed under tmp_path/opt with an empty volume mounted at tmp_path/opt's parent."""
    volume, root = tmp_path / "volume", tmp_path / "root"
    program = root / "opt" / "tool"
    program.parent.mkdir(parents=True)
    program.write_text(f"#!/bin/sh\ncat {root}/data; echo ' and the tool ran'\n")
    program.chmod(0o755)
    volume.mkdir()
    (volume / "data").write_text("the volume is mounted")
    spec = {"argv": [str(program)], "env": {"PATH": "/usr/bin:/bin"}, "workingDir": "/",
            "mounts": [{"source": str(volume), "target": str(root), "read_only": False}], "keep": keep}
    return _run_launcher(tmp_path, spec)


def _run_launcher(tmp_path: Path, spec: dict[str, object]) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    return subprocess.run(["unshare", "--mount", "--propagation", "private", sys.executable, "-m",
                           "fleetserve_devcluster.launch"], input=json.dumps(spec), capture_output=True, text=True,
                          env=env, timeout=30)


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("unshare"), reason="needs root and unshare")
def test_a_volume_over_the_installation_leaves_the_program_runnable(tmp_path: Path) -> None:
    done = _launch(tmp_path, keep=[str(tmp_path / "root" / "opt")])
    assert done.returncode == 0, done.stderr
    assert done.stdout == "the volume is mounted and the tool ran\n"


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("unshare"), reason="needs root and unshare")
def test_a_hidden_program_fails_with_a_message_naming_it(tmp_path: Path) -> None:
    done = _launch(tmp_path, keep=[])
    assert done.returncode == 127
    assert f"cannot run '{tmp_path / 'root' / 'opt' / 'tool'}' in the container: No such file or directory" \
        in done.stderr


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("unshare"), reason="needs root and unshare")
def test_a_volume_inside_the_kept_installation_still_goes_on_top(tmp_path: Path) -> None:
    """Mounts [root, root/opt/conf] with root/opt kept: the program comes back, and so does the deeper volume."""
    root, outer, inner = tmp_path / "root", tmp_path / "outer", tmp_path / "inner"
    program = root / "opt" / "tool"
    program.parent.mkdir(parents=True)
    program.write_text(f"#!/bin/sh\ncat {root}/opt/conf/setting\n")
    program.chmod(0o755)
    outer.mkdir()
    inner.mkdir()
    (inner / "setting").write_text("from the inner volume\n")
    spec = {"argv": [str(program)], "env": {"PATH": "/usr/bin:/bin"}, "workingDir": "/", "keep": [str(root / "opt")],
            "mounts": [{"source": str(outer), "target": str(root), "read_only": False},
                       {"source": str(inner), "target": str(root / "opt" / "conf"), "read_only": True}]}
    done = _run_launcher(tmp_path, spec)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "from the inner volume\n"
