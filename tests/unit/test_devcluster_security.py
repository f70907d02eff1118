"""The node agent's reading of a securityContext: identity, runAsNonRoot, capabilities (pure)."""

from __future__ import annotations

import pwd
import tempfile
from pathlib import Path
from typing import Any

import pytest
from fleetserve_devcluster.confine import unreachable_dirs
from fleetserve_devcluster.fsgroup import file_mode, set_volume_ownership
from fleetserve_devcluster.security import (
    CAPABILITIES,
    DEFAULT_CAPABILITIES,
    SecurityContextError,
    container_security,
    failed_event,
)


def _pod(**pod_sc: Any) -> dict[str, Any]:
    return {"metadata": {"name": "web", "namespace": "ns", "uid": "u-1"},
            "spec": {"securityContext": pod_sc, "containers": [{"name": "c"}]}}


def _caps(*names: str) -> tuple[int, ...]:
    return tuple(sorted(CAPABILITIES.index(n) for n in names))


def test_container_fields_win_over_the_pod_and_groups_follow_containerd() -> None:
    pod = _pod(runAsUser=1000, runAsGroup=3000, fsGroup=2000, supplementalGroups=[4000])
    sec = container_security(pod, {"name": "c", "securityContext": {"runAsUser": 4321}})
    assert (sec.uid, sec.gid) == (4321, 3000)
    assert {3000, 2000, 4000} <= set(sec.groups) and sec.fs_group == 2000


def test_an_unset_user_is_the_image_user_root_with_its_passwd_home() -> None:
    sec = container_security(_pod(), {"name": "c"})
    assert (sec.uid, sec.gid, sec.home) == (0, 0, pwd.getpwuid(0).pw_dir)
    assert sec.capabilities == _caps(*DEFAULT_CAPABILITIES) and not sec.no_new_privs


def test_a_uid_without_a_passwd_entry_gets_group_0_and_home_slash_as_with_runc() -> None:
    uid = next(u for u in range(54321, 60000) if not _has_passwd(u))
    sec = container_security(_pod(runAsUser=uid), {"name": "c"})
    assert (sec.gid, sec.home) == (0, "/")


def _has_passwd(uid: int) -> bool:
    try:
        pwd.getpwuid(uid)
    except KeyError:
        return False
    return True


def test_run_as_non_root_is_refused_with_the_kubelets_messages() -> None:
    with pytest.raises(SecurityContextError, match=r'^container has runAsNonRoot and image will run as root '
                                                   r'\(pod: "web_ns\(u-1\)", container: c\)$'):
        container_security(_pod(runAsNonRoot=True), {"name": "c"})
    with pytest.raises(SecurityContextError, match="^container's runAsUser breaks non-root policy"):
        container_security(_pod(runAsNonRoot=True), {"name": "c", "securityContext": {"runAsUser": 0}})
    assert container_security(_pod(runAsNonRoot=True, runAsUser=10), {"name": "c"}).uid == 10
    # The container may switch the check off for itself.
    assert container_security(_pod(runAsNonRoot=True), {"name": "c", "securityContext": {"runAsNonRoot": False}}).uid == 0


@pytest.mark.parametrize(("caps", "expected"), [
    ({"drop": ["ALL"]}, ()),
    ({"drop": ["ALL"], "add": ["NET_BIND_SERVICE"]}, _caps("NET_BIND_SERVICE")),
    ({"add": ["CAP_SYS_ADMIN"], "drop": ["KILL"]},
     _caps(*(set(DEFAULT_CAPABILITIES) - {"KILL"} | {"SYS_ADMIN"}))),
    ({"add": ["ALL"]}, tuple(range(len(CAPABILITIES)))),
])
def test_capabilities_start_from_containerds_defaults(caps: dict[str, Any], expected: tuple[int, ...]) -> None:
    assert container_security(_pod(), {"name": "c", "securityContext": {"capabilities": caps}}).capabilities == expected


def test_unknown_capability_is_a_config_error_naming_it() -> None:
    with pytest.raises(SecurityContextError, match="NET_WIZARD"):
        container_security(_pod(), {"name": "c", "securityContext": {"capabilities": {"drop": ["NET_WIZARD"]}}})


def test_no_new_privs_only_when_escalation_is_refused_and_not_privileged() -> None:
    def nnp(sc: dict[str, Any]) -> bool:
        return container_security(_pod(), {"name": "c", "securityContext": sc}).no_new_privs

    assert nnp({"allowPrivilegeEscalation": False})
    assert not nnp({}) and not nnp({"allowPrivilegeEscalation": True})
    assert not nnp({"allowPrivilegeEscalation": False, "privileged": True})


def test_the_refusal_event_is_the_kubelets() -> None:
    pod = _pod()
    event = failed_event(pod, {"name": "c"}, "fs-node-0", "boom", "2026-01-01T00:00:00Z")
    assert (event["reason"], event["type"], event["message"]) == ("Failed", "Warning", "Error: boom")
    assert event["involvedObject"]["fieldPath"] == "spec.containers{c}"
    assert event["source"] == {"component": "kubelet", "host": "fs-node-0"}


def test_the_outermost_directory_others_cannot_enter_is_masked() -> None:
    with tempfile.TemporaryDirectory(dir="/tmp") as base:  # pytest's tmp_path lies in a 0700 directory itself
        root = Path(base)
        root.chmod(0o755)
        private = root / "home"
        (private / "py" / "lib").mkdir(parents=True)
        (root / "open" / "venv").mkdir(parents=True)
        private.chmod(0o700)
        (private / "py").chmod(0o700)  # nested: the outer one is enough
        assert unreachable_dirs([str(private / "py" / "lib"), str(root / "open" / "venv")]) == [str(private)]


def test_fs_group_gives_a_volume_to_the_group_as_the_kubelet(tmp_path: Path) -> None:
    volume = tmp_path / "vol"
    (volume / "..data_dir").mkdir(parents=True)
    secret = volume / "..data_dir" / "key"
    secret.write_text("x")
    secret.chmod(0o400)
    (volume / "key").symlink_to("..data_dir/key")
    set_volume_ownership(volume, 4242, read_only=True)
    assert (secret.stat().st_gid, secret.stat().st_mode & 0o7777) == (4242, 0o440)
    assert volume.stat().st_mode & 0o2050 == 0o2050 and (volume / "key").lstat().st_gid == 4242
    assert file_mode(0o400, 4242) == 0o440 and file_mode(0o400, None) == 0o400


def test_no_preexec_fn_anywhere_in_the_threaded_agent() -> None:
    """A `preexec_fn` runs Python between fork and exec, which can deadlock in a threaded process (the
    agent runs a thread per pod): the launcher process and fork-safe subprocess options do that work."""
    import ast

    import fleetserve_devcluster

    package = Path(fleetserve_devcluster.__file__).parent
    calls = [f"{path.name}:{node.lineno}" for path in sorted(package.glob("*.py"))
             for node in ast.walk(ast.parse(path.read_text())) if isinstance(node, ast.Call)
             and any(k.arg == "preexec_fn" for k in node.keywords)]
    assert calls == []
