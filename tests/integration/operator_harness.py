"""Helpers for the operator's integration tests: the CRD, a KopfRunner, polling, reading objects."""

from __future__ import annotations

import contextlib
import copy
import functools
import json
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml
from fleetserve_devcluster import testing
from fleetserve_devcluster.testing import DevClusterHandle

ROOT = Path(__file__).resolve().parents[2]
CRDS = ROOT / "crds"
EXAMPLES = ROOT / "examples"

# Pods of these specs never get a node, so no test accidentally starts model servers.
NOWHERE = {"nodeSelector": {"fleetserve.io/test-no-such-node": "true"}}


# the shared poller, at this file's poll interval
wait_until = functools.partial(testing.wait_until, interval=0.25)


def install_crds(cluster: DevClusterHandle) -> None:
    cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(CRDS))
    cluster.kubectl("wait", "--for=condition=Established", "--timeout=60s",
                    "crd/llmdeployments.fleetserve.io")


def example(name: str, **spec_overrides: Any) -> dict[str, Any]:
    body = yaml.safe_load((EXAMPLES / name).read_text())
    body["spec"].update(copy.deepcopy(spec_overrides))
    return body


def cheap(name: str, **spec_overrides: Any) -> dict[str, Any]:
    """The CPU example, renamed, with pods that are never scheduled (no server process starts)."""
    body = example("smollm2-cpu.yaml", scheduling=NOWHERE, **spec_overrides)
    body["metadata"]["name"] = name
    return body


def apply(cluster: DevClusterHandle, namespace: str, manifest: dict[str, Any], check: bool = True) -> Any:
    return cluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(manifest), check=check)


def get(cluster: DevClusterHandle, namespace: str, kind: str, name: str) -> dict[str, Any] | None:
    proc = cluster.kubectl("get", "-n", namespace, kind, name, "-o", "json", "--ignore-not-found", check=False)
    return json.loads(proc.stdout) if proc.returncode == 0 and proc.stdout.strip() else None


def list_kind(cluster: DevClusterHandle, namespace: str, kind: str, selector: str) -> list[dict[str, Any]]:
    proc = cluster.kubectl("get", "-n", namespace, kind, "-l", selector, "-o", "json", "--show-managed-fields")
    return list(json.loads(proc.stdout)["items"])


def condition(obj: dict[str, Any] | None, type_: str) -> dict[str, Any] | None:
    for c in ((obj or {}).get("status") or {}).get("conditions") or []:
        if c.get("type") == type_:
            return dict(c)
    return None


def events_for(cluster: DevClusterHandle, namespace: str, name: str) -> list[dict[str, Any]]:
    proc = cluster.kubectl("get", "events", "-n", namespace, "--field-selector",
                           f"involvedObject.name={name},involvedObject.kind=LLMDeployment", "-o", "json")
    return list(json.loads(proc.stdout)["items"])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def operator(cluster: DevClusterHandle, namespace: str, metrics_port: int = 0, cleanup: bool = True,
             resync_seconds: float | None = None, kubeconfig: Path | None = None) -> Iterator[Any]:
    """Run the real operator (kopf's KopfRunner, our registry) watching ``namespace``.

    With ``cleanup`` the namespace's LLMDeployments are deleted while the
    operator still runs (older operators held them with a finalizer).
    ``resync_seconds`` shortens the periodic full reconcile, so a test of
    what only the resync repairs does not wait the default minute.
    ``kubeconfig`` runs the operator under other credentials (e.g. a service
    account's token) than the cluster's admin.
    """
    from fleetserve_operator import handlers
    from fleetserve_operator.kube import Kube
    from kopf.testing import KopfRunner

    saved_env = os.environ.get("KUBECONFIG")
    os.environ["KUBECONFIG"] = str(kubeconfig or cluster.kubeconfig)  # kopf's own login reads it
    handlers._kube = Kube.from_environment() if kubeconfig else Kube(cluster.api_client())
    handlers.OPTIONS.metrics_port = metrics_port
    handlers.OPTIONS.metrics_host = "127.0.0.1"
    saved_resync = getattr(handlers.OPTIONS, "resync_seconds", None)
    if resync_seconds is not None:
        handlers.OPTIONS.resync_seconds = resync_seconds
    try:
        with KopfRunner(["run", "--standalone", "--verbose", "--namespace", namespace],
                        registry=handlers.registry, timeout=60) as runner:
            try:
                yield runner
            finally:
                if cleanup:
                    cluster.kubectl("delete", "llmd", "--all", "-n", namespace, "--wait=true", "--timeout=60s",
                                    check=False)
    finally:
        handlers._kube = None
        if saved_resync is not None:
            handlers.OPTIONS.resync_seconds = saved_resync
        if saved_env is None:
            os.environ.pop("KUBECONFIG", None)
        else:
            os.environ["KUBECONFIG"] = saved_env
