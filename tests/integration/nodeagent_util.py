"""Helpers for the node-agent integration tests: manifests of the echo helper, polling, HTTP,
and a look inside a running container (its files and env) the way `crictl exec` would."""

from __future__ import annotations

import functools
import json
import os
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from fleetserve_devcluster import testing
from fleetserve_devcluster.testing import DevClusterHandle

# Not 8000: on a shared machine a stray server bound to 0.0.0.0:8000 would block every pod IP's port 8000.
PORT = 8400
ECHO = ["fleetserve", "dev-cluster", "echo", "--port", str(PORT)]


# the shared poller, at this file's poll interval
wait_until = functools.partial(testing.wait_until, interval=0.2)


def get_json(cluster: DevClusterHandle, *args: str) -> Any:
    return json.loads(cluster.kubectl("get", *args, "-o", "json").stdout)


def apply(cluster: DevClusterHandle, namespace: str, manifest: dict[str, Any]) -> None:
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(manifest))


def echo_container(args: list[str] | None = None, **extra: Any) -> dict[str, Any]:
    return {"name": "echo", "image": "fleetserve/echo", "command": ECHO + (args or []),
            "ports": [{"name": "http", "containerPort": PORT}], **extra}


READY_PROBE = {"httpGet": {"path": "/ready", "port": "http"}, "periodSeconds": 1, "failureThreshold": 1}


def echo_deployment(name: str, replicas: int, **pod_spec: Any) -> dict[str, Any]:
    labels = {"app": name}
    containers = pod_spec.pop("containers", None) or [echo_container(readinessProbe=READY_PROBE)]
    return {
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": name},
        "spec": {"replicas": replicas, "selector": {"matchLabels": labels},
                 "template": {"metadata": {"labels": labels},
                              "spec": {"containers": containers, "terminationGracePeriodSeconds": 5, **pod_spec}}},
    }


def echo_pod(name: str, args: list[str] | None = None, **pod_spec: Any) -> dict[str, Any]:
    container = pod_spec.pop("container", None) or echo_container(args)
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name},
            "spec": {"containers": [container], **pod_spec}}


def ready_pods(cluster: DevClusterHandle, namespace: str, selector: str) -> list[dict[str, Any]]:
    pods = get_json(cluster, "pods", "-n", namespace, *(["-l", selector] if selector else []))["items"]
    return [p for p in pods if not p["metadata"].get("deletionTimestamp") and any(
        c["type"] == "Ready" and c["status"] == "True" for c in p.get("status", {}).get("conditions", []))]


def pod(cluster: DevClusterHandle, namespace: str, name: str) -> dict[str, Any] | None:
    proc = cluster.kubectl("get", "pod", name, "-n", namespace, "-o", "json", check=False)
    return json.loads(proc.stdout) if proc.returncode == 0 else None


def http(method: str, url: str, timeout: float = 5) -> tuple[int, str]:
    req = urllib.request.Request(url, method=method, data=b"" if method == "POST" else None)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except (urllib.error.URLError, OSError) as exc:  # not listening (yet/any more)
        return 0, str(exc)


def records(path: Any) -> list[tuple[str, float]]:
    """The echo helper's `--record` file as (event, unix time) pairs."""
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        return []
    return [(line.rsplit(" ", 1)[0], float(line.rsplit(" ", 1)[1])) for line in lines]


def container_pid(p: dict[str, Any], container: str | None = None) -> int:
    """The host pid of a running container (the node agent's containerID is `fleetserve://<pid>`)."""
    statuses = p["status"]["containerStatuses"]
    status = next(c for c in statuses if container is None or c["name"] == container)
    return int(status["containerID"].removeprefix("fleetserve://"))


def in_container(p: dict[str, Any], path: str, container: str | None = None) -> Path:
    """`path` as the container sees it (its mount namespace), through /proc/<pid>/root.

    Symlinks are resolved here, against the container's root: the kernel would resolve an absolute
    one (the host's /var/run -> /run) against the caller's root instead.  The last component is
    left as it is, so the result can also name a symlink to create.
    """
    root = f"/proc/{container_pid(p, container)}/root"
    todo = [part for part in path.split("/") if part]
    done: list[str] = []
    for _ in range(40):
        if len(todo) <= 1:
            break
        part = todo.pop(0)
        host = Path(root, *done, part)
        if host.is_symlink():
            target = os.readlink(host)
            todo = [t for t in target.split("/") if t] + todo
            if target.startswith("/"):
                done = []
        elif part == "..":
            done = done[:-1]
        elif part != ".":
            done.append(part)
    return Path(root, *done, *todo)


def container_env(p: dict[str, Any], container: str | None = None) -> dict[str, str]:
    raw = Path(f"/proc/{container_pid(p, container)}/environ").read_bytes()
    return dict(item.decode().split("=", 1) for item in raw.split(b"\0") if item)
