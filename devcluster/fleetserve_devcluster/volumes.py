"""Pod volumes as directories on the host, and the bind mounts that put them at their mountPaths.

ConfigMap, Secret, downward-API and projected volumes are written the way the
kubelet's atomic writer does it: the files live in a timestamped `..<ts>`
directory, `..data` is a symlink to it, and every visible entry is a symlink
into `..data`.  An update writes a new timestamped directory and renames a new
`..data` link over the old one, so a process reading through the bind mount
sees either the old or the new contents, never a mix.

A persistentVolumeClaim volume is the directory of the PersistentVolume the claim
is bound to (a `local` or `hostPath` PV), bind-mounted like a hostPath volume.
The PV's path must lie in the dev cluster's hostPath allow-list or in its own
`<state dir>/persistent-volumes` (see `Claims`).
"""

from __future__ import annotations

import base64
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .kube import KubeError
from .pods import ContainerConfigError, PodNetwork, field_value, resource_value
from .subpath import SubPathError, open_beneath

JsonObj = dict[str, Any]
Files = dict[str, tuple[bytes, int]]  # relative path -> (contents, mode)
# fetch(kind, namespace, name) -> the ConfigMap/Secret object, or None when it does not exist.
Fetch = Callable[[str, str, str], "JsonObj | None"]
# token(audience or None, expirationSeconds) -> a service-account token for the pod.
TokenSource = Callable[["str | None", int], str]

ATOMIC_KINDS = ("configMap", "secret", "downwardAPI", "projected")
# Where local/hostPath PersistentVolumes may always point (inside the cluster's 0700 state dir),
# besides the `up --allow-host-path` directories.
PERSISTENT_VOLUMES_DIR = "persistent-volumes"
# PersistentVolumeSpec fields that are not its volume source.
_PV_SPEC_FIELDS = {"accessModes", "capacity", "claimRef", "mountOptions", "nodeAffinity",
                   "persistentVolumeReclaimPolicy", "storageClassName", "volumeMode", "volumeAttributesClassName"}


class VolumeNotSupported(Exception):
    """A volume type the dev-cluster node agent cannot provide (the pod is failed with this message)."""


class HostPathNotAllowed(VolumeNotSupported):
    """A hostPath outside the directories the dev cluster's config allows (`up --allow-host-path`)."""


@dataclass(frozen=True)
class Mount:
    """One bind mount inside the container's mount namespace."""

    source: str
    target: str
    read_only: bool
    sub_path: str = ""  # resolved beneath `source` by the launcher (subpath.open_beneath)


def _object_files(obj: JsonObj, kind: str, items: list[JsonObj] | None, default_mode: int,
                  name: str, optional: bool) -> Files:
    if kind == "secret":
        data = {k: base64.b64decode(v) for k, v in (obj.get("data") or {}).items()}
    else:
        data = {k: v.encode() for k, v in (obj.get("data") or {}).items()}
        data.update({k: base64.b64decode(v) for k, v in (obj.get("binaryData") or {}).items()})
    if not items:
        return {k: (v, default_mode) for k, v in data.items()}
    files: Files = {}
    for item in items:
        if item["key"] not in data:
            if optional:
                continue
            raise ContainerConfigError(f'volume: key {item["key"]!r} not found in {kind} "{name}"')
        files[item["path"]] = (data[item["key"]], int(item.get("mode", default_mode)))
    return files


def _ref_files(source: JsonObj, kind: str, pod: JsonObj, fetch: Fetch, default_mode: int) -> Files:
    name = source.get("name") or source.get("secretName") or ""
    obj = fetch(kind, pod["metadata"]["namespace"], name)
    optional = bool(source.get("optional", False))
    if obj is None:
        if optional:
            return {}
        raise ContainerConfigError(f'volume: {kind} "{name}" not found')
    return _object_files(obj, kind, source.get("items"), int(source.get("defaultMode", default_mode)),
                         name, optional)


def _downward_files(source: JsonObj, pod: JsonObj, net: PodNetwork, default_mode: int) -> Files:
    files: Files = {}
    container = (pod["spec"].get("containers") or [{}])[0]
    for item in source.get("items") or []:
        if "fieldRef" in item:
            value = field_value(pod, item["fieldRef"].get("fieldPath", ""), net)
        else:
            value = resource_value(container, item.get("resourceFieldRef", {}))
        files[item["path"]] = (value.encode(), int(item.get("mode", default_mode)))
    return files


def volume_files(volume: JsonObj, pod: JsonObj, fetch: Fetch, token: TokenSource, net: PodNetwork) -> Files:
    """The files of a configMap/secret/downwardAPI/projected volume (ContainerConfigError when missing)."""
    if "configMap" in volume:
        return _ref_files(volume["configMap"], "configmap", pod, fetch, 0o644)
    if "secret" in volume:
        return _ref_files(volume["secret"], "secret", pod, fetch, 0o644)
    if "downwardAPI" in volume:
        return _downward_files(volume["downwardAPI"], pod, net, int(volume["downwardAPI"].get("defaultMode", 0o644)))
    projected = volume["projected"]
    mode = int(projected.get("defaultMode", 0o644))
    files: Files = {}
    for source in projected.get("sources") or []:
        if "configMap" in source:
            files.update(_ref_files(source["configMap"], "configmap", pod, fetch, mode))
        elif "secret" in source:
            files.update(_ref_files(source["secret"], "secret", pod, fetch, mode))
        elif "downwardAPI" in source:
            files.update(_downward_files(source["downwardAPI"], pod, net, mode))
        elif "serviceAccountToken" in source:
            sat = source["serviceAccountToken"]
            value = token(sat.get("audience"), int(sat.get("expirationSeconds", 3600)))
            files[sat.get("path", "token")] = (value.encode(), mode)
        else:
            raise VolumeNotSupported(f"volume {volume['name']!r}: projected source {sorted(source)} is not supported")
    return files


def write_atomic(target: Path, files: Files) -> bool:
    """Make `target` show exactly `files`, kubelet-style; return False when nothing changed."""
    target.mkdir(parents=True, exist_ok=True)
    data_link = target / "..data"
    if data_link.is_symlink() and read_atomic(target) == files:
        return False
    ts_dir = target / f"..{time.strftime('%Y_%m_%d_%H_%M_%S')}.{time.monotonic_ns()}"
    for rel, (content, mode) in files.items():
        path = ts_dir / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        # Created with its final mode (0600 until then): a secret is never readable under a looser one.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(content)
            os.fchmod(f.fileno(), mode)
    ts_dir.mkdir(exist_ok=True)  # an empty volume still gets its directory
    old = os.readlink(data_link) if data_link.is_symlink() else None
    tmp_link = target / "..data_tmp"
    if tmp_link.is_symlink():
        tmp_link.unlink()
    os.symlink(ts_dir.name, tmp_link)
    os.rename(tmp_link, data_link)  # atomic switch
    top = {rel.split("/", 1)[0] for rel in files}
    for entry in target.iterdir():
        if not entry.name.startswith("..") and entry.name not in top:
            entry.unlink()
    for name in top:
        link = target / name
        if not link.is_symlink():
            os.symlink(f"..data/{name}", link)
    if old:
        shutil.rmtree(target / old, ignore_errors=True)
    return True


def read_atomic(target: Path) -> Files:
    """What `write_atomic` last wrote into `target`."""
    root = target / "..data"
    out: Files = {}
    if not root.is_symlink():
        return out
    real = target / os.readlink(root)
    for path in real.rglob("*"):
        if path.is_file():
            out[str(path.relative_to(real))] = (path.read_bytes(), path.stat().st_mode & 0o777)
    return out


def allowed_host_path(path: str, allow: tuple[str, ...]) -> Path:
    """`path` with symlinks resolved, if that lies in one of the `allow` directories (resolved too)."""
    real = Path(os.path.realpath(path))
    for root in allow:
        if real.is_relative_to(os.path.realpath(root)):
            return real
    allowed = ", ".join(allow) or "none"
    raise HostPathNotAllowed(
        f"hostPath {path}" + (f" (resolving to {real})" if str(real) != os.path.normpath(path) else "")
        + f" is outside the dev cluster's allowed host paths ({allowed}); start the cluster with "
        "`fleetserve dev-cluster up --allow-host-path DIR` to allow a directory")


@dataclass(frozen=True)
class Claims:
    """What a persistentVolumeClaim volume needs: API reads (`get(path)` -> object or None on 404,
    e.g. `Kube.get_or_none`), the pod's namespace, and where a PersistentVolume may point."""

    get: Callable[[str], JsonObj | None]
    namespace: str
    host_path_allow: tuple[str, ...]
    state_dir: Path

    def allowed_roots(self) -> tuple[str, ...]:
        return (*self.host_path_allow, str(self.state_dir / PERSISTENT_VOLUMES_DIR))

    def read(self, path: str, what: str) -> JsonObj | None:
        try:
            return self.get(path)
        except KubeError as exc:
            raise ContainerConfigError(f"cannot read {what}: {exc}") from None


def _host_directory(name: str, path: Path, kind: str) -> Path:
    """Create a hostPath of type "" / DirectoryOrCreate / FileOrCreate if missing, as the kubelet does."""
    if kind in ("", "DirectoryOrCreate") and not path.exists():
        path.mkdir(parents=True, exist_ok=True)
    elif kind == "FileOrCreate" and not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch()
    elif not path.exists():
        raise ContainerConfigError(f"volume {name!r}: hostPath {path} does not exist (type {kind})")
    return path


def claim_host_path(volume: JsonObj, claims: Claims) -> Path:
    """The host directory of the PersistentVolume bound to a persistentVolumeClaim volume's claim.

    A claim that is missing, being deleted or not bound yet is a ContainerConfigError (retried, the
    pod waits as the kubelet's does); a PV that is not `local` or `hostPath` is VolumeNotSupported,
    and one outside the allowed roots HostPathNotAllowed (both fail the pod).
    """
    name, claim = volume["name"], str(volume["persistentVolumeClaim"].get("claimName") or "")
    pvc = claims.read(f"/api/v1/namespaces/{claims.namespace}/persistentvolumeclaims/{claim}",
                      f'persistentvolumeclaim "{claim}"')
    if pvc is None:
        raise ContainerConfigError(f'volume {name!r}: persistentvolumeclaim "{claim}" not found')
    if (pvc.get("metadata") or {}).get("deletionTimestamp"):
        raise ContainerConfigError(f'volume {name!r}: persistentvolumeclaim "{claim}" is being deleted')
    pv_name = (pvc.get("spec") or {}).get("volumeName") or ""
    phase = (pvc.get("status") or {}).get("phase") or "Pending"
    if phase != "Bound" or not pv_name:
        raise ContainerConfigError(f'volume {name!r}: persistentvolumeclaim "{claim}" is not bound to a '
                                   f"PersistentVolume yet (phase {phase})")
    pv = claims.read(f"/api/v1/persistentvolumes/{pv_name}", f'persistentvolume "{pv_name}"')
    if pv is None:
        raise ContainerConfigError(f'volume {name!r}: persistentvolume "{pv_name}" of claim "{claim}" not found')
    spec = pv.get("spec") or {}
    ref = spec.get("claimRef") or {}
    if (ref.get("namespace"), ref.get("name")) != (claims.namespace, claim) or (
            ref.get("uid") and ref["uid"] != pvc["metadata"].get("uid")):
        raise ContainerConfigError(f'volume {name!r}: persistentvolume "{pv_name}" is bound to another claim '
                                   f"({ref.get('namespace')}/{ref.get('name')}), not to {claims.namespace}/{claim}")
    if spec.get("volumeMode") == "Block":
        raise VolumeNotSupported(f'volume {name!r}: persistentvolume "{pv_name}" has volumeMode Block; the '
                                 "dev-cluster node agent mounts only Filesystem volumes")
    if "local" in spec:
        path = allowed_host_path(str(spec["local"]["path"]), claims.allowed_roots())
        if not path.is_dir():  # a local PV is an existing directory (a disk's mount point); never created
            raise ContainerConfigError(f'volume {name!r}: the local path {path} of persistentvolume "{pv_name}" '
                                       "does not exist or is not a directory")
        return path
    if "hostPath" in spec:
        source = spec["hostPath"]
        path = allowed_host_path(str(source["path"]), claims.allowed_roots())
        return _host_directory(name, path, source.get("type", ""))
    other = sorted(k for k in spec if k not in _PV_SPEC_FIELDS)
    raise VolumeNotSupported(f'volume {name!r}: persistentvolume "{pv_name}" of type {other} is not supported '
                             "by the dev-cluster node agent (supported: local, hostPath)")


def prepare_volume(volume: JsonObj, pod_dir: Path, host_path_allow: tuple[str, ...] = (),
                   claims: Claims | None = None) -> Path:
    """The host directory of a volume that needs no API data (emptyDir, hostPath), of an atomic one,
    or of a persistentVolumeClaim's PersistentVolume (needs `claims`).

    An emptyDir is 0777 (as the kubelet makes it) so a container running as any user can write it;
    it is still private, inside the pod's 0700 directory.  A hostPath must lie in `host_path_allow`.
    """
    name = volume["name"]
    if "emptyDir" in volume or any(k in volume for k in ATOMIC_KINDS):
        path = pod_dir / "volumes" / name
        path.mkdir(parents=True, exist_ok=True)
        if "emptyDir" in volume:
            path.chmod(0o777)
        return path
    if "hostPath" in volume:
        spec = volume["hostPath"]
        path = allowed_host_path(str(spec["path"]), host_path_allow)
        return _host_directory(name, path, spec.get("type", ""))
    if "persistentVolumeClaim" in volume and claims is not None:
        return claim_host_path(volume, claims)
    other = sorted(k for k in volume if k != "name")
    raise VolumeNotSupported(f"volume {name!r} of type {other} is not supported by the dev-cluster node agent "
                             "(supported: configMap, secret, projected, downwardAPI, emptyDir, hostPath, "
                             "persistentVolumeClaim of a local or hostPath PersistentVolume)")


def plan_mounts(container: JsonObj, volume_dirs: dict[str, Path], volumes: list[JsonObj]) -> list[Mount]:
    """The bind mounts of one container, in volumeMounts order.

    ConfigMap/Secret/projected/downward volumes are always read-only, as in Kubernetes, and so is
    a persistentVolumeClaim volume with `readOnly: true`;
    a `subPath` mount binds one entry (it does not follow later updates, exactly like the
    kubelet's subPath mounts).  The subPath is checked here, for a clear
    CreateContainerConfigError, and resolved again by the launcher when it mounts it: beneath
    the volume's root, so a symlink planted in the volume never leads out of it.
    """
    by_name = {v["name"]: v for v in volumes}
    mounts: list[Mount] = []
    for vm in container.get("volumeMounts") or []:
        name = vm["name"]
        if name not in volume_dirs:
            raise ContainerConfigError(f"volumeMounts: volume {name!r} is not in spec.volumes")
        source = volume_dirs[name]
        sub_path = vm.get("subPath") or ""
        if sub_path:
            try:
                os.close(open_beneath(str(source), sub_path))
            except SubPathError as exc:
                raise ContainerConfigError(f"volumeMounts {vm['mountPath']!r} of volume {name!r}: "
                                           f"{exc.strerror}") from None
        volume = by_name.get(name, {})
        read_only = (bool(vm.get("readOnly")) or any(k in volume for k in ATOMIC_KINDS)
                     or bool((volume.get("persistentVolumeClaim") or {}).get("readOnly")))
        mounts.append(Mount(str(source), vm["mountPath"], read_only, sub_path))
    return mounts
