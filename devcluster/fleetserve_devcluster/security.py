"""A container's securityContext as a kubelet and its container runtime apply it (pure).

The node agent runs containers as local processes, and the host's own
installation stands in for the image (see launch.py), so the "image user" is
root, the "image's" ``/etc/passwd`` and ``/etc/group`` are the host's, and the
"image config" env is that of fleetserve's images (``images/*/Dockerfile``).
From the pod and the container this module works out what the launcher
enforces (confine.py):

* the identity: ``runAsUser`` / ``runAsGroup`` (container over pod), else the
  image user (root) and that user's primary group; supplementary groups are the
  primary group, the user's groups in ``/etc/group``, ``fsGroup`` and
  ``supplementalGroups``, as containerd sets them;
* ``runAsNonRoot``, refused with the kubelet's own messages;
* the capability bounding set: containerd's default set, ``capabilities.add``
  then ``capabilities.drop`` (``ALL`` in either), every capability when
  ``privileged``;
* ``no_new_privs`` for ``allowPrivilegeEscalation: false``;
* ``readOnlyRootFilesystem``.

Seccomp, AppArmor, SELinux, ``procMount`` and ``sysctls`` are not enforced.
"""

from __future__ import annotations

import grp
import pwd
from dataclasses import dataclass
from typing import Any

JsonObj = dict[str, Any]

# Linux capability numbers are the positions in this tuple (linux/capability.h).
CAPABILITIES = (
    "CHOWN", "DAC_OVERRIDE", "DAC_READ_SEARCH", "FOWNER", "FSETID", "KILL", "SETGID", "SETUID", "SETPCAP",
    "LINUX_IMMUTABLE", "NET_BIND_SERVICE", "NET_BROADCAST", "NET_ADMIN", "NET_RAW", "IPC_LOCK", "IPC_OWNER",
    "SYS_MODULE", "SYS_RAWIO", "SYS_CHROOT", "SYS_PTRACE", "SYS_PACCT", "SYS_ADMIN", "SYS_BOOT", "SYS_NICE",
    "SYS_RESOURCE", "SYS_TIME", "SYS_TTY_CONFIG", "MKNOD", "LEASE", "AUDIT_WRITE", "AUDIT_CONTROL", "SETFCAP",
    "MAC_OVERRIDE", "MAC_ADMIN", "SYSLOG", "WAKE_ALARM", "BLOCK_SUSPEND", "AUDIT_READ", "PERFMON", "BPF",
    "CHECKPOINT_RESTORE",
)
# What containerd gives a container that asks for nothing (its CRI plugin's default capabilities).
DEFAULT_CAPABILITIES = ("CHOWN", "DAC_OVERRIDE", "FSETID", "FOWNER", "MKNOD", "NET_RAW", "SETGID", "SETUID",
                        "SETFCAP", "SETPCAP", "NET_BIND_SERVICE", "SYS_CHROOT", "KILL", "AUDIT_WRITE")
IMAGE_UID = 0  # the host's installation, the dev cluster's "image", runs as root
# The env of fleetserve's images (`ENV` in images/server and images/operator), besides PATH and HOME.
IMAGE_ENV = {"PYTHONDONTWRITEBYTECODE": "1", "PYTHONUNBUFFERED": "1"}


class SecurityContextError(Exception):
    """The container must not start (the kubelet's CreateContainerConfigError, event reason Failed)."""


@dataclass(frozen=True)
class ContainerSecurity:
    """What the launcher applies to one container process (and to its exec probes and hooks).

    Invariant: `uid` is the process's real, effective and saved uid; `groups` holds `gid`.
    """

    uid: int
    gid: int
    groups: tuple[int, ...]
    home: str  # HOME when the pod's env does not set it: the user's passwd entry, else "/" (as runc)
    capabilities: tuple[int, ...]  # the bounding set; root's permitted/effective set after exec
    no_new_privs: bool
    read_only_root: bool
    privileged: bool
    fs_group: int | None  # pod-level: the group of its emptyDir/configMap/secret/projected volumes

    def to_launch(self) -> JsonObj:
        """The launcher's `security` entry (JSON)."""
        return {"uid": self.uid, "gid": self.gid, "groups": list(self.groups), "capabilities": list(self.capabilities),
                "noNewPrivs": self.no_new_privs, "readOnlyRootFilesystem": self.read_only_root,
                "privileged": self.privileged}


def _merged(pod: JsonObj, container: JsonObj) -> tuple[JsonObj, JsonObj]:
    return pod.get("spec", {}).get("securityContext") or {}, container.get("securityContext") or {}


def _pick(key: str, pod_sc: JsonObj, sc: JsonObj) -> Any:
    return sc[key] if sc.get(key) is not None else pod_sc.get(key)


def pod_ref(pod: JsonObj) -> str:
    """The kubelet's `format.Pod`: name_namespace(uid)."""
    meta = pod.get("metadata", {})
    return f"{meta.get('name')}_{meta.get('namespace')}({meta.get('uid')})"


def verify_run_as_non_root(pod: JsonObj, container: JsonObj, image_uid: int = IMAGE_UID) -> None:
    """The kubelet's verifyRunAsNonRoot, with its messages (SecurityContextError when refused)."""
    pod_sc, sc = _merged(pod, container)
    if not _pick("runAsNonRoot", pod_sc, sc):
        return
    where = f' (pod: "{pod_ref(pod)}", container: {container.get("name")})'
    uid = _pick("runAsUser", pod_sc, sc)
    if uid is not None:
        if int(uid) == 0:
            raise SecurityContextError("container's runAsUser breaks non-root policy" + where)
        return
    if image_uid == 0:
        raise SecurityContextError("container has runAsNonRoot and image will run as root" + where)


def _cap_number(name: str, field: str) -> int:
    bare = str(name).upper().removeprefix("CAP_")
    if bare not in CAPABILITIES:
        raise SecurityContextError(f"securityContext.capabilities.{field}: unknown capability {name!r}")
    return CAPABILITIES.index(bare)


def capability_set(sc: JsonObj) -> tuple[int, ...]:
    """The bounding set: containerd's defaults, `add` (ALL = every one), then `drop` (ALL = none)."""
    if sc.get("privileged"):
        return tuple(range(len(CAPABILITIES)))
    caps = sc.get("capabilities") or {}
    add = [str(c) for c in caps.get("add") or []]
    drop = [str(c) for c in caps.get("drop") or []]
    have = {CAPABILITIES.index(c) for c in DEFAULT_CAPABILITIES}
    if any(c.upper() == "ALL" for c in add):
        have = set(range(len(CAPABILITIES)))
    if any(c.upper() == "ALL" for c in drop):
        have = set()
    have |= {_cap_number(c, "add") for c in add if c.upper() != "ALL"}
    have -= {_cap_number(c, "drop") for c in drop if c.upper() != "ALL"}
    return tuple(sorted(have))


def _passwd(uid: int) -> pwd.struct_passwd | None:
    try:
        return pwd.getpwuid(uid)
    except KeyError:
        return None


def _member_of(user: str) -> set[int]:
    return {g.gr_gid for g in grp.getgrall() if user in g.gr_mem}


def container_security(pod: JsonObj, container: JsonObj) -> ContainerSecurity:
    """The effective security settings of `container` (SecurityContextError when it must not run)."""
    verify_run_as_non_root(pod, container)
    pod_sc, sc = _merged(pod, container)
    run_as_user, run_as_group = _pick("runAsUser", pod_sc, sc), _pick("runAsGroup", pod_sc, sc)
    uid = int(run_as_user) if run_as_user is not None else IMAGE_UID
    entry = _passwd(uid)
    gid = int(run_as_group) if run_as_group is not None else (entry.pw_gid if entry else 0)
    groups = {gid} | (_member_of(entry.pw_name) if entry else set())
    fs_group = pod_sc.get("fsGroup")
    if fs_group is not None:
        groups.add(int(fs_group))
    groups |= {int(g) for g in pod_sc.get("supplementalGroups") or []}
    privileged = bool(sc.get("privileged"))
    escalation = sc.get("allowPrivilegeEscalation")
    return ContainerSecurity(
        uid=uid, gid=gid, groups=tuple(sorted(groups)), home=entry.pw_dir if entry else "/",
        capabilities=capability_set(sc), no_new_privs=escalation is False and not privileged,
        read_only_root=bool(sc.get("readOnlyRootFilesystem")), privileged=privileged,
        fs_group=int(fs_group) if fs_group is not None else None)


def failed_event(pod: JsonObj, container: JsonObj, node: str, message: str, now: str) -> JsonObj:
    """The kubelet's Warning event for a container it refused to create (reason Failed)."""
    meta = pod["metadata"]
    return {
        "apiVersion": "v1", "kind": "Event",
        "metadata": {"generateName": f"{meta['name']}.", "namespace": meta["namespace"]},
        "involvedObject": {"apiVersion": "v1", "kind": "Pod", "name": meta["name"], "namespace": meta["namespace"],
                           "uid": meta["uid"], "fieldPath": f"spec.containers{{{container['name']}}}",
                           "resourceVersion": meta.get("resourceVersion", "")},
        "reason": "Failed", "type": "Warning", "message": f"Error: {message}",
        "source": {"component": "kubelet", "host": node}, "reportingComponent": "kubelet", "reportingInstance": node,
        "firstTimestamp": now, "lastTimestamp": now, "count": 1,
    }
