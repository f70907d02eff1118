"""The node agent on a shared machine: private pod files, secrets kept out of files and logs,
subPath confined to its volume, hostPath confined to the allow-list (real control plane, real agent)."""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Any

from fleetserve_devcluster.testing import DevClusterHandle
from nodeagent_util import (
    READY_PROBE,
    apply,
    echo_container,
    echo_pod,
    in_container,
    pod,
    ready_pods,
    wait_until,
)


def _pod_dir(cluster: DevClusterHandle, p: dict[str, Any]) -> Path:
    meta = p["metadata"]
    return cluster.state_dir / "pods" / f"{meta['namespace']}_{meta['name']}_{meta['uid']}"


def test_pod_files_are_private_and_secret_values_stay_out_of_files_and_logs(dev_cluster: DevClusterHandle,
                                                                            namespace: str) -> None:
    secret = f"s3cret-{uuid.uuid4().hex}"
    dev_cluster.kubectl("create", "secret", "generic", "sec", "-n", namespace, f"--from-literal=apikey={secret}",
                        "--from-literal=other=x")
    container = echo_container(
        readinessProbe=READY_PROBE,
        env=[{"name": "API_KEY", "valueFrom": {"secretKeyRef": {"name": "sec", "key": "apikey"}}}],
        volumeMounts=[{"name": "sec", "mountPath": "/etc/fleetserve-safety-test"},
                      {"name": "tok", "mountPath": "/etc/fleetserve-safety-token"}])
    apply(dev_cluster, namespace, echo_pod("priv", container=container, volumes=[
        {"name": "sec", "secret": {"secretName": "sec", "defaultMode": 0o400,
                                   "items": [{"key": "apikey", "path": "apikey"},
                                             {"key": "other", "path": "other", "mode": 0o440}]}},
        {"name": "tok", "projected": {"defaultMode": 0o420, "sources": [
            {"serviceAccountToken": {"path": "token", "expirationSeconds": 3600}}]}}]))
    p = wait_until(lambda: ready_pods(dev_cluster, namespace, ""), 120, "pod priv Ready")[0]
    # Modes as the pod spec asks, as a kubelet keeps them.
    assert in_container(p, "/etc/fleetserve-safety-test/apikey").stat().st_mode & 0o777 == 0o400
    assert in_container(p, "/etc/fleetserve-safety-test/other").stat().st_mode & 0o777 == 0o440
    assert in_container(p, "/etc/fleetserve-safety-token/token").stat().st_mode & 0o777 == 0o420
    assert in_container(p, "/etc/fleetserve-safety-test/apikey").read_text() == secret
    # ... inside directories no other user can enter.
    pod_dir = _pod_dir(dev_cluster, p)
    for directory in (dev_cluster.state_dir, pod_dir):
        assert directory.stat().st_mode & 0o077 == 0, f"{directory} is open to other users"
    # The value is in the secret volume (as on a kubelet's tmpfs) and nowhere else: no launch spec, no log.
    secret_volume = pod_dir / "volumes" / "sec"
    leaks = [path for path in [*pod_dir.rglob("*"), *(dev_cluster.state_dir / "logs").rglob("*")]
             if path.is_file() and not path.is_symlink() and not path.is_relative_to(secret_volume)
             and secret.encode() in path.read_bytes()]
    assert leaks == []
    assert not list(pod_dir.glob("*.launch.json"))
    Path("/etc/fleetserve-safety-test").rmdir()
    Path("/etc/fleetserve-safety-token").rmdir()


def _waiting(p: dict[str, Any] | None, container: str) -> tuple[str, str] | None:
    for c in (p or {}).get("status", {}).get("containerStatuses") or []:
        if c["name"] == container and "waiting" in c["state"]:
            return c["state"]["waiting"].get("reason", ""), c["state"]["waiting"].get("message", "")
    return None


def test_a_symlink_planted_in_a_volume_never_mounts_host_files(dev_cluster: DevClusterHandle,
                                                               namespace: str, tmp_path: Path) -> None:
    """CVE-2017-1002101's pattern: one container plants `escape -> /` in an emptyDir, another mounts
    `subPath: escape/...` — the agent must refuse it, not bind the host's file into the pod."""
    victim = tmp_path / "host-file"
    victim.write_text("host data")
    writer = echo_container(readinessProbe=READY_PROBE,
                            volumeMounts=[{"name": "shared", "mountPath": "/fleetserve-safety-shared"}])
    reader = {**echo_container(["--port", "8402"]), "name": "reader",
              "ports": [], "volumeMounts": [{"name": "shared", "mountPath": "/fleetserve-safety-read",
                                             "subPath": f"escape{victim}"}]}
    manifest = echo_pod("plant", volumes=[{"name": "shared", "emptyDir": {}}])
    manifest["spec"]["containers"] = [writer, reader]
    apply(dev_cluster, namespace, manifest)
    p = wait_until(lambda: (lambda x: x if _waiting(x, "reader") and any(
        c["name"] == "echo" and c.get("ready") for c in x["status"].get("containerStatuses") or []) else None)(
        pod(dev_cluster, namespace, "plant")), 120, "the writer running and the reader waiting")
    # The writer container plants the symlink in the shared volume, as a malicious process in it would.
    os.symlink("/", in_container(p, "/fleetserve-safety-shared/escape", "echo"))

    def refused() -> tuple[str, str] | None:
        state = _waiting(pod(dev_cluster, namespace, "plant"), "reader")
        return state if state and "leads out of the volume" in state[1] else None

    reason, message = wait_until(refused, 30, "the reader refused with the subPath error")
    assert reason == "CreateContainerConfigError", message
    statuses = (pod(dev_cluster, namespace, "plant") or {})["status"]["containerStatuses"]
    reader_status = next(c for c in statuses if c["name"] == "reader")
    assert "running" not in reader_status["state"] and not reader_status.get("lastState"), reader_status
    dev_cluster.kubectl("delete", "pod", "plant", "-n", namespace, "--wait=true", timeout=120)
    for mount_point in ("/fleetserve-safety-shared", "/fleetserve-safety-read"):
        if Path(mount_point).exists():
            Path(mount_point).rmdir()


def test_a_host_path_outside_the_allow_list_fails_the_pod(dev_cluster: DevClusterHandle, namespace: str) -> None:
    container = echo_container(volumeMounts=[{"name": "etc", "mountPath": "/fleetserve-safety-etc"}])
    apply(dev_cluster, namespace, echo_pod("hostpath", container=container,
                                           volumes=[{"name": "etc", "hostPath": {"path": "/etc"}}]))
    p = wait_until(lambda: (lambda x: x if x and x.get("status", {}).get("phase") == "Failed" else None)(
        pod(dev_cluster, namespace, "hostpath")), 60, "pod hostpath Failed")
    assert p["status"]["reason"] == "HostPathNotAllowed", json.dumps(p["status"])
    assert "--allow-host-path" in p["status"]["message"]
    assert not Path("/fleetserve-safety-etc").exists()
