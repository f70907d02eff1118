"""The node agent enforces a pod's securityContext as a kubelet does (real control plane, real agent):
user, groups, fsGroup, no_new_privs, capabilities, a read-only root, runAsNonRoot, an env of the pod's
own, and exec probes with the container's identity.  What a test reads of a container it reads the way
`crictl exec` would: /proc/<container pid>/status, /mountinfo, /environ and /root."""

from __future__ import annotations

import json
import os
import pwd
from pathlib import Path
from typing import Any

from fleetserve_devcluster.testing import DevClusterHandle
from nodeagent_util import (
    PORT,
    READY_PROBE,
    apply,
    container_env,
    container_pid,
    echo_container,
    echo_pod,
    get_json,
    in_container,
    pod,
    ready_pods,
    wait_until,
)

# containerd's default capability set (what a container that asks for nothing gets, as root).
DEFAULT_CAPS = 0xA80425FB


def _status(p: dict[str, Any], container: str | None = None) -> dict[str, str]:
    text = Path(f"/proc/{container_pid(p, container)}/status").read_text()
    return {k: v.strip() for k, _, v in (line.partition(":") for line in text.splitlines())}


def _mount_options(p: dict[str, Any], mount_point: str) -> set[str]:
    """The per-mount options (field 6 of mountinfo) of the topmost mount at `mount_point` in the container."""
    options = ""
    for line in Path(f"/proc/{container_pid(p)}/mountinfo").read_text().splitlines():
        fields = line.split(" ")
        if fields[4] == mount_point:
            options = fields[5]
    return set(options.split(","))


def _exec_probe(script: str) -> dict[str, Any]:
    return {"exec": {"command": ["sh", "-c", script]}, "periodSeconds": 1, "failureThreshold": 1}


def _free_uid() -> int:
    """A uid with no passwd entry on this machine (the dev cluster's "image")."""
    for uid in range(54321, 60000):
        try:
            pwd.getpwuid(uid)
        except KeyError:
            return uid
    raise AssertionError("no free uid")


def test_container_and_its_exec_probe_run_as_the_pods_user_groups_and_no_capabilities(
        dev_cluster: DevClusterHandle, namespace: str) -> None:
    dev_cluster.kubectl("create", "secret", "generic", "key", "-n", namespace, "--from-literal=key=k3y")
    # The probe passes only when it runs as the pod's user, in the pod's groups, with no_new_privs,
    # under the pod's hostname, and can read a 0400 secret through fsGroup.
    probe = _exec_probe('test "$(id -u):$(id -g)" = 1000:3000 && id -G | grep -qw 2000 && id -G | grep -qw 4000'
                        ' && grep -q "^NoNewPrivs:[[:space:]]*1" /proc/self/status && test "$(hostname)" = who'
                        ' && test "$(cat /etc/fleetserve-sec-test/key)" = k3y')
    container = echo_container(readinessProbe=probe, securityContext={
        "allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}},
        volumeMounts=[{"name": "data", "mountPath": "/fleetserve-sec-data"},
                      {"name": "key", "mountPath": "/etc/fleetserve-sec-test"}])
    apply(dev_cluster, namespace, echo_pod(
        "who", container=container,
        securityContext={"runAsUser": 1000, "runAsGroup": 3000, "fsGroup": 2000, "supplementalGroups": [4000]},
        volumes=[{"name": "data", "emptyDir": {}}, {"name": "key", "secret": {"secretName": "key", "defaultMode": 0o400}}]))
    p = wait_until(lambda: ready_pods(dev_cluster, namespace, ""), 120, "pod who Ready (its exec probe as uid 1000)")[0]
    status = _status(p)
    assert status["Uid"].split() == ["1000"] * 4 and status["Gid"].split() == ["3000"] * 4, status
    assert {"2000", "3000", "4000"} <= set(status["Groups"].split()), status["Groups"]
    assert status["NoNewPrivs"] == "1"
    for caps in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
        assert int(status[caps], 16) == 0, (caps, status[caps])
    # fsGroup: the emptyDir is the group's (setgid), the secret readable by the group only.
    data = in_container(p, "/fleetserve-sec-data").stat()
    assert data.st_gid == 2000 and data.st_mode & 0o2070 == 0o2070, oct(data.st_mode)
    key = in_container(p, "/etc/fleetserve-sec-test/key").stat()
    assert (key.st_gid, key.st_mode & 0o777) == (2000, 0o440)


def test_capabilities_are_containerds_defaults_and_drop_all_leaves_root_none(dev_cluster: DevClusterHandle,
                                                                            namespace: str) -> None:
    plain = echo_container(readinessProbe=READY_PROBE)
    dropped = {**echo_container(["--port", str(PORT + 1)]), "name": "dropped", "ports": [],
               "securityContext": {"capabilities": {"drop": ["ALL"]}}}
    manifest = echo_pod("caps")
    manifest["spec"]["containers"] = [plain, dropped]
    apply(dev_cluster, namespace, manifest)
    p = wait_until(lambda: ready_pods(dev_cluster, namespace, ""), 120, "pod caps Ready")[0]
    root = _status(p, "echo")
    assert root["Uid"].split()[1] == "0"
    assert int(root["CapEff"], 16) == int(root["CapBnd"], 16) == DEFAULT_CAPS, root
    assert root["NoNewPrivs"] == "0"
    none = _status(p, "dropped")
    assert none["Uid"].split()[1] == "0"
    assert [int(none[c], 16) for c in ("CapPrm", "CapEff", "CapBnd", "CapAmb")] == [0, 0, 0, 0], none


def _waiting(p: dict[str, Any] | None, container: str) -> tuple[str, str] | None:
    for c in (p or {}).get("status", {}).get("containerStatuses") or []:
        if c["name"] == container and "waiting" in c["state"] and c["state"]["waiting"].get("message"):
            return c["state"]["waiting"]["reason"], c["state"]["waiting"]["message"]
    return None


def test_run_as_non_root_without_a_non_zero_user_is_refused_like_the_kubelet(dev_cluster: DevClusterHandle,
                                                                             namespace: str) -> None:
    as_root = {**echo_container(["--port", str(PORT + 1)]), "name": "zero", "ports": [],
               "securityContext": {"runAsUser": 0}}
    manifest = echo_pod("nonroot", securityContext={"runAsNonRoot": True})
    manifest["spec"]["containers"].append(as_root)
    apply(dev_cluster, namespace, manifest)

    def refused() -> dict[str, tuple[str, str]] | None:
        p = pod(dev_cluster, namespace, "nonroot")
        states = {name: _waiting(p, name) for name in ("echo", "zero")}
        return states if all(states.values()) else None  # type: ignore[return-value]

    states = wait_until(refused, 60, "both containers refused")
    uid = get_json(dev_cluster, "pod", "nonroot", "-n", namespace)["metadata"]["uid"]
    where = f'(pod: "nonroot_{namespace}({uid})", container: %s)'
    assert states["echo"] == ("CreateContainerConfigError",
                              "container has runAsNonRoot and image will run as root " + where % "echo")
    assert states["zero"] == ("CreateContainerConfigError",
                              "container's runAsUser breaks non-root policy " + where % "zero")
    statuses = (pod(dev_cluster, namespace, "nonroot") or {})["status"]["containerStatuses"]
    assert all("containerID" not in c and not c.get("lastState") for c in statuses), statuses

    def events() -> list[dict[str, Any]] | None:
        items = get_json(dev_cluster, "events", "-n", namespace)["items"]
        found = [e for e in items if e["involvedObject"].get("name") == "nonroot" and e.get("reason") == "Failed"]
        return found if len(found) >= 2 else None

    found = wait_until(events, 30, "the kubelet's Failed events")
    assert {(e["type"], e["message"]) for e in found} == {
        ("Warning", "Error: " + states["echo"][1]), ("Warning", "Error: " + states["zero"][1])}


def test_read_only_root_filesystem_leaves_only_the_volumes_writable(dev_cluster: DevClusterHandle,
                                                                   namespace: str) -> None:
    marker = f"/fleetserve-ro-{namespace}"
    # Ready only when a write to / fails and one to the emptyDir works (with the container's identity).
    probe = _exec_probe(f"if touch {marker} 2>/dev/null; then exit 1; fi; touch /fleetserve-ro-data/written")
    container = echo_container(readinessProbe=probe, securityContext={"readOnlyRootFilesystem": True,
                                                                      "runAsUser": 1000},
                               volumeMounts=[{"name": "data", "mountPath": "/fleetserve-ro-data"}])
    apply(dev_cluster, namespace, echo_pod("ro", container=container, volumes=[{"name": "data", "emptyDir": {}}]))
    p = wait_until(lambda: ready_pods(dev_cluster, namespace, ""), 120, "pod ro Ready")[0]
    assert not os.path.lexists(marker)
    assert in_container(p, "/fleetserve-ro-data/written").is_file()
    assert "ro" in _mount_options(p, "/")
    assert "rw" in _mount_options(p, "/fleetserve-ro-data")
    # The agent's home (its state, the cluster's CA key) is not there at all, whatever the uid.
    assert not in_container(p, str(dev_cluster.state_dir / "pki")).exists()


def test_env_is_the_pods_own_and_nothing_of_the_agents(dev_cluster: DevClusterHandle, namespace: str) -> None:
    uid = _free_uid()
    container = echo_container(readinessProbe=READY_PROBE, env=[{"name": "MY_VAR", "value": "x"}])
    apply(dev_cluster, namespace, echo_pod("env", container=container, securityContext={"runAsUser": uid}))
    p = wait_until(lambda: ready_pods(dev_cluster, namespace, ""), 120, "pod env Ready")[0]
    env = container_env(p)
    kubelet = {"PATH", "HOME", "HOSTNAME", "KUBERNETES_SERVICE_HOST", "KUBERNETES_SERVICE_PORT",
               "KUBERNETES_SERVICE_PORT_HTTPS", "KUBERNETES_PORT"}
    image = {"PYTHONDONTWRITEBYTECODE", "PYTHONUNBUFFERED"}
    assert set(env) == kubelet | image | {"FLEETSERVE_HOST", "MY_VAR"}, sorted(env)
    assert (env["HOME"], env["HOSTNAME"], env["MY_VAR"]) == ("/", "env", "x")  # runc's HOME for an unknown uid
    agent_pid = int((dev_cluster.state_dir / "pids" / "node-agent.pid").read_text())
    raw = Path(f"/proc/{agent_pid}/environ").read_bytes()
    agent = dict(item.decode().split("=", 1) for item in raw.split(b"\0") if b"=" in item)
    leaked = {k for k in agent if k in env and k not in kubelet | image}
    assert leaked == set(), json.dumps(sorted(leaked))
