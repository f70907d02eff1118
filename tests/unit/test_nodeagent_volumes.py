"""Node agent: volume contents, kubelet-style atomic updates, mount plans, and real private bind mounts."""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from fleetserve_devcluster.pods import ContainerConfigError, PodNetwork
from fleetserve_devcluster.volumes import (
    VolumeNotSupported,
    plan_mounts,
    prepare_volume,
    read_atomic,
    volume_files,
    write_atomic,
)

NET = PodNetwork(pod_ip="127.0.10.7", host_ip="127.0.10.1", node_name="fs-node-0")
POD = {"metadata": {"name": "p", "namespace": "ns1", "uid": "u"}, "spec": {"containers": [{"name": "c"}]}}
OBJS = {
    ("configmap", "cfg"): {"data": {"server.yaml": "port: 8000\n", "other": "x"},
                           "binaryData": {"blob": base64.b64encode(b"\x00\x01").decode()}},
    ("secret", "sec"): {"data": {"token": base64.b64encode(b"s3cret").decode()}},
    ("configmap", "kube-root-ca.crt"): {"data": {"ca.crt": "CA"}},
}


def fetch(kind: str, ns: str, name: str) -> dict | None:
    return OBJS.get((kind, name))


def token(audience: str | None, expiration: int) -> str:
    return f"tok-{audience}-{expiration}"


def test_configmap_secret_and_items() -> None:
    files = volume_files({"name": "v", "configMap": {"name": "cfg"}}, POD, fetch, token, NET)
    assert files == {"server.yaml": (b"port: 8000\n", 0o644), "other": (b"x", 0o644), "blob": (b"\x00\x01", 0o644)}
    files = volume_files({"name": "v", "configMap": {"name": "cfg", "items": [{"key": "other", "path": "d/o.txt",
                                                                           "mode": 0o600}]}}, POD, fetch, token, NET)
    assert files == {"d/o.txt": (b"x", 0o600)}
    files = volume_files({"name": "v", "secret": {"secretName": "sec", "defaultMode": 0o400}}, POD, fetch, token, NET)
    assert files == {"token": (b"s3cret", 0o400)}


def test_missing_sources_block_unless_optional() -> None:
    with pytest.raises(ContainerConfigError, match='configmap "gone" not found'):
        volume_files({"name": "v", "configMap": {"name": "gone"}}, POD, fetch, token, NET)
    assert volume_files({"name": "v", "secret": {"secretName": "gone", "optional": True}}, POD, fetch, token, NET) == {}


def test_projected_service_account_volume() -> None:
    volume = {"name": "kube-api-access-x", "projected": {"defaultMode": 0o644, "sources": [
        {"serviceAccountToken": {"expirationSeconds": 3607, "path": "token"}},
        {"configMap": {"name": "kube-root-ca.crt", "items": [{"key": "ca.crt", "path": "ca.crt"}]}},
        {"downwardAPI": {"items": [{"path": "namespace", "fieldRef": {"fieldPath": "metadata.namespace"}}]}},
    ]}}
    files = volume_files(volume, POD, fetch, token, NET)
    assert files == {"token": (b"tok-None-3607", 0o644), "ca.crt": (b"CA", 0o644), "namespace": (b"ns1", 0o644)}


def test_atomic_writer_swaps_contents(tmp_path: Path) -> None:
    target = tmp_path / "vol"
    assert write_atomic(target, {"a.yaml": (b"one", 0o644), "d/b": (b"two", 0o600)})
    assert (target / "a.yaml").read_bytes() == b"one" and (target / "d" / "b").read_bytes() == b"two"
    assert (target / "a.yaml").is_symlink() and (target / "..data").is_symlink()
    assert not write_atomic(target, {"a.yaml": (b"one", 0o644), "d/b": (b"two", 0o600)})  # no change, no write
    assert write_atomic(target, {"a.yaml": (b"new", 0o644)})
    assert (target / "a.yaml").read_bytes() == b"new" and not (target / "d").exists()
    assert read_atomic(target) == {"a.yaml": (b"new", 0o644)}
    assert len([p for p in target.iterdir() if p.name.startswith("..2")]) == 1  # old generation removed


def test_prepare_and_plan_mounts(tmp_path: Path) -> None:
    volumes = [{"name": "cfg", "configMap": {"name": "cfg"}}, {"name": "scratch", "emptyDir": {}}]
    dirs = {v["name"]: prepare_volume(v, tmp_path) for v in volumes}
    write_atomic(dirs["cfg"], {"server.yaml": (b"port: 1\n", 0o644)})
    container = {"volumeMounts": [
        {"name": "cfg", "mountPath": "/etc/fleetserve"},
        {"name": "scratch", "mountPath": "/scratch"},
        {"name": "scratch", "mountPath": "/ro", "readOnly": True},
        {"name": "cfg", "mountPath": "/etc/one.yaml", "subPath": "server.yaml"},
    ]}
    mounts = plan_mounts(container, dirs, volumes)
    assert [(m.target, m.read_only) for m in mounts] == [("/etc/fleetserve", True), ("/scratch", False),
                                                         ("/ro", True), ("/etc/one.yaml", True)]
    assert (mounts[3].source, mounts[3].sub_path) == (str(dirs["cfg"]), "server.yaml")
    with pytest.raises(ContainerConfigError, match="'nope' is not in spec.volumes"):
        plan_mounts({"volumeMounts": [{"name": "nope", "mountPath": "/x"}]}, dirs, volumes)
    with pytest.raises(VolumeNotSupported, match="persistentVolumeClaim"):
        prepare_volume({"name": "data", "persistentVolumeClaim": {"claimName": "c"}}, tmp_path)


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("unshare"), reason="needs root and unshare")
def test_launcher_mounts_are_private_to_the_process(tmp_path: Path) -> None:
    """The real launcher: a file appears at its mountPath for the container only, read-only when asked."""
    vol = tmp_path / "vol"
    write_atomic(vol, {"server.yaml": (b"port: 8000\n", 0o644)})
    target = tmp_path / "mnt" / "etc-fleetserve"
    probe = ("import pathlib,sys; p=pathlib.Path(sys.argv[1]); print(p.joinpath('server.yaml').read_text(), end='');"
             "\ntry:\n  p.joinpath('new').write_text('x'); print('writable')\nexcept OSError: print('read-only')")
    spec = {"argv": [sys.executable, "-c", probe, str(target)], "env": {"PATH": os.environ["PATH"]},
            "workingDir": str(tmp_path), "mounts": [{"source": str(vol), "target": str(target), "read_only": True}]}
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    out = subprocess.run(["unshare", "--mount", "--propagation", "private", sys.executable, "-m",
                          "fleetserve_devcluster.launch"], input=json.dumps(spec), capture_output=True, text=True,
                         env=env, timeout=30)
    assert out.returncode == 0, out.stderr
    assert out.stdout == "port: 8000\nread-only\n"
    assert target.is_dir() and not any(target.iterdir())  # on the host: only the empty mount point


def _plant(tmp_path: Path) -> tuple[Path, Path]:
    """An emptyDir-like volume in which a container planted symlinks out of it (CVE-2017-1002101)."""
    outside = tmp_path / "host-secret"
    outside.mkdir()
    (outside / "shadow").write_text("host data")
    volume = tmp_path / "vol"
    volume.mkdir()
    (volume / "escape").symlink_to(outside)                       # absolute, out of the volume
    (volume / "up").symlink_to(os.path.relpath(outside, volume))  # relative, climbing out
    (volume / "inside").mkdir()
    (volume / "inside" / "ok").write_text("volume data")
    (volume / "alias").symlink_to("inside")                       # stays inside: allowed, as in the kubelet
    return volume, outside


@pytest.mark.parametrize("sub_path", ["escape/shadow", "escape", "up/shadow", "inside/../../host-secret/shadow"])
def test_a_sub_path_through_a_planted_symlink_is_refused(tmp_path: Path, sub_path: str) -> None:
    volume, _ = _plant(tmp_path)
    container = {"volumeMounts": [{"name": "data", "mountPath": "/etc/x", "subPath": sub_path}]}
    with pytest.raises(ContainerConfigError, match=r"subPath .* (leads out of the volume|must not contain '\.\.')"):
        plan_mounts(container, {"data": volume}, [{"name": "data", "emptyDir": {}}])


def test_a_sub_path_inside_the_volume_resolves_through_its_own_symlinks(tmp_path: Path) -> None:
    volume, _ = _plant(tmp_path)
    container = {"volumeMounts": [{"name": "data", "mountPath": "/etc/x", "subPath": "alias/ok"}]}
    [mount] = plan_mounts(container, {"data": volume}, [{"name": "data", "emptyDir": {}}])
    assert (mount.source, mount.sub_path) == (str(volume), "alias/ok")
    with pytest.raises(ContainerConfigError, match="'missing' does not exist in the volume"):
        plan_mounts({"volumeMounts": [{"name": "data", "mountPath": "/y", "subPath": "missing"}]},
                    {"data": volume}, [{"name": "data", "emptyDir": {}}])


def _launch(spec: dict) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    return subprocess.run(["unshare", "--mount", "--propagation", "private", sys.executable, "-m",
                           "fleetserve_devcluster.launch"], input=json.dumps(spec), capture_output=True, text=True,
                          env=env, timeout=30)


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("unshare"), reason="needs root and unshare")
def test_the_launcher_refuses_a_symlink_swapped_in_after_the_check(tmp_path: Path) -> None:
    """The launcher resolves the subPath again when it mounts: a symlink planted after plan_mounts is refused."""
    volume, _ = _plant(tmp_path)
    target = tmp_path / "mnt" / "shadow"
    read = [sys.executable, "-c", f"print(open({str(target)!r}).read())"]
    good = {"argv": read, "env": {}, "workingDir": "/",
            "mounts": [{"source": str(volume), "sub_path": "alias/ok", "target": str(target), "read_only": True}]}
    done = _launch(good)
    assert (done.returncode, done.stdout) == (0, "volume data\n"), done.stderr
    (volume / "inside" / "ok").unlink()
    (volume / "inside" / "ok").symlink_to(tmp_path / "host-secret" / "shadow")  # swapped in after the check
    done = _launch(good)
    assert done.returncode == 128
    assert "subPath 'alias/ok' leads out of the volume" in done.stderr
    assert "host data" not in done.stdout


def test_a_host_path_outside_the_allow_list_is_refused(tmp_path: Path) -> None:
    from fleetserve_devcluster.volumes import HostPathNotAllowed

    allowed = tmp_path / "models"
    allowed.mkdir()
    (allowed / "escape").symlink_to("/etc")
    inside = prepare_volume({"name": "m", "hostPath": {"path": str(allowed / "cache")}}, tmp_path, (str(allowed),))
    assert inside == allowed / "cache" and inside.is_dir()
    for path in ("/etc", str(allowed / "escape"), str(allowed / ".." / "other"), str(tmp_path)):
        with pytest.raises(HostPathNotAllowed, match="outside the dev cluster's allowed host paths"):
            prepare_volume({"name": "m", "hostPath": {"path": path}}, tmp_path, (str(allowed),))
    with pytest.raises(HostPathNotAllowed, match=r"allowed host paths \(none\).*--allow-host-path DIR"):
        prepare_volume({"name": "m", "hostPath": {"path": str(allowed)}}, tmp_path)
    assert not (tmp_path / "other").exists()  # nothing created outside the list either


def test_secret_files_are_created_with_their_mode(tmp_path: Path) -> None:
    target = tmp_path / "sec"
    write_atomic(target, {"token": (b"s3cret", 0o400), "sub/key": (b"k", 0o440)})
    assert (target / "token").stat().st_mode & 0o777 == 0o400
    assert (target / "sub" / "key").stat().st_mode & 0o777 == 0o440
    empty = prepare_volume({"name": "scratch", "emptyDir": {}}, tmp_path)
    assert empty.stat().st_mode & 0o777 == 0o777  # any runAsUser may write it; the pod dir (0700) keeps others out
