"""Node agent: a persistentVolumeClaim volume resolves claim -> bound PersistentVolume -> host directory."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from fleetserve_devcluster.pods import ContainerConfigError
from fleetserve_devcluster.volumes import (
    Claims,
    HostPathNotAllowed,
    VolumeNotSupported,
    plan_mounts,
    prepare_volume,
)

VOLUME = {"name": "cache", "persistentVolumeClaim": {"claimName": "models"}}
PVC_PATH = "/api/v1/namespaces/ns1/persistentvolumeclaims/models"
PV_PATH = "/api/v1/persistentvolumes/pv-models"


def bound_pair(source: dict[str, Any], phase: str = "Bound") -> dict[str, dict[str, Any]]:
    pvc = {"metadata": {"name": "models", "namespace": "ns1", "uid": "claim-uid"},
           "spec": {"volumeName": "pv-models" if phase == "Bound" else ""}, "status": {"phase": phase}}
    pv = {"metadata": {"name": "pv-models"},
          "spec": {**source, "claimRef": {"namespace": "ns1", "name": "models", "uid": "claim-uid"}}}
    return {PVC_PATH: pvc, PV_PATH: pv}


def claims(objects: dict[str, dict[str, Any]], state: Path, allow: tuple[str, ...] = ()) -> Claims:
    return Claims(objects.get, "ns1", allow, state)


def test_a_local_pv_in_the_clusters_own_area_is_the_volume(tmp_path: Path) -> None:
    disk = tmp_path / "persistent-volumes" / "disk1"
    disk.mkdir(parents=True)
    path = prepare_volume(VOLUME, tmp_path / "pod", (), claims(bound_pair({"local": {"path": str(disk)}}), tmp_path))
    assert path == disk.resolve()


def test_a_host_path_pv_in_the_allow_list_is_created_like_a_host_path(tmp_path: Path) -> None:
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    objects = bound_pair({"hostPath": {"path": str(allowed / "cache"), "type": "DirectoryOrCreate"}})
    path = prepare_volume(VOLUME, tmp_path / "pod", (str(allowed),), claims(objects, tmp_path / "state", (str(allowed),)))
    assert path == (allowed / "cache").resolve() and path.is_dir()


def test_a_pv_outside_the_allowed_roots_is_refused(tmp_path: Path) -> None:
    with pytest.raises(HostPathNotAllowed, match="--allow-host-path"):
        prepare_volume(VOLUME, tmp_path / "pod", (), claims(bound_pair({"local": {"path": "/etc"}}), tmp_path))
    link = tmp_path / "persistent-volumes" / "escape"
    link.parent.mkdir()
    link.symlink_to("/etc")  # a symlink out of the area is resolved first
    with pytest.raises(HostPathNotAllowed):
        prepare_volume(VOLUME, tmp_path / "pod", (), claims(bound_pair({"local": {"path": str(link)}}), tmp_path))


def test_unbound_missing_or_foreign_claims_wait(tmp_path: Path) -> None:
    with pytest.raises(ContainerConfigError, match='persistentvolumeclaim "models" not found'):
        prepare_volume(VOLUME, tmp_path, (), claims({}, tmp_path))
    with pytest.raises(ContainerConfigError, match="not bound to a PersistentVolume yet"):
        prepare_volume(VOLUME, tmp_path, (), claims(bound_pair({"local": {"path": "/x"}}, "Pending"), tmp_path))
    foreign = bound_pair({"local": {"path": str(tmp_path)}})
    foreign[PV_PATH]["spec"]["claimRef"]["uid"] = "someone-else"
    with pytest.raises(ContainerConfigError, match="bound to another claim"):
        prepare_volume(VOLUME, tmp_path, (), claims(foreign, tmp_path))
    missing_dir = bound_pair({"local": {"path": str(tmp_path / "persistent-volumes" / "gone")}})
    with pytest.raises(ContainerConfigError, match="does not exist"):
        prepare_volume(VOLUME, tmp_path, (), claims(missing_dir, tmp_path))


def test_other_pv_types_are_not_supported(tmp_path: Path) -> None:
    with pytest.raises(VolumeNotSupported, match=r"\['nfs'\].*supported: local, hostPath"):
        prepare_volume(VOLUME, tmp_path, (), claims(bound_pair({"nfs": {"server": "x", "path": "/"}}), tmp_path))


def test_read_only_claims_mount_read_only(tmp_path: Path) -> None:
    ro = {"name": "cache", "persistentVolumeClaim": {"claimName": "models", "readOnly": True}}
    container = {"volumeMounts": [{"name": "cache", "mountPath": "/cache"}]}
    [mount] = plan_mounts(container, {"cache": tmp_path}, [ro])
    assert mount.read_only
    [mount] = plan_mounts(container, {"cache": tmp_path}, [VOLUME])
    assert not mount.read_only
