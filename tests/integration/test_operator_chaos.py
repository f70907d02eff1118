"""Chaos: SIGKILL the operator every 5 s while LLMDeployments are created, edited and deleted (issue 19, point 4).

A real `fleetserve operator` process is killed (SIGKILL, no cleanup of any kind) 5 s after each
start, at least ten times, while the test creates, scales, deletes and re-creates (same name, new
uid) LLMDeployments of the CPU example whose pods are never scheduled (no server runs: two cores).
Then one operator runs undisturbed, and within 2 minutes every LLMDeployment must have exactly its
children, at the size its spec asks, owned by it (not by a deleted namesake); no child of a deleted
LLMDeployment may be left; every status must describe the current generation.
"""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fleetserve_devcluster.testing import DevClusterHandle
from operator_harness import cheap, free_port, install_crds, wait_until

COUNT = 38  # LLMDeployments in the first wave; 12 more follow (50 in all, see churn)
KILLS = 10
KILL_AFTER_SECONDS = 5.0
CONVERGE_SECONDS = 120
CHILD_KINDS = ("deployments", "services", "configmaps", "poddisruptionbudgets")
MANAGED = "app.kubernetes.io/managed-by=fleetserve"


@pytest.fixture(scope="module", autouse=True)
def crds(dev_cluster: DevClusterHandle) -> None:
    install_crds(dev_cluster)


def start_operator(cluster: DevClusterHandle, namespace: str, port: int, log: Path) -> subprocess.Popen[bytes]:
    with open(log, "ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "fleetserve_cli.main", "operator", "--namespace", namespace,
             "--no-leader-election", "--metrics-port", str(port), "--metrics-host", "127.0.0.1"],
            env=cluster.env, stdout=out, stderr=subprocess.STDOUT)


def answers(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1) as resp:
            return bool(resp.status == 200)
    except OSError:
        return False


class Killer:
    """Starts the operator and SIGKILLs it KILL_AFTER_SECONDS later, until KILLS kills of a process that
    was serving (its /healthz had answered) were made."""

    def __init__(self, cluster: DevClusterHandle, namespace: str, log: Path) -> None:
        self.cluster, self.namespace, self.log = cluster, namespace, log
        self.kills = 0
        self.attempts = 0
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        try:
            while self.kills < KILLS and self.attempts < 3 * KILLS:
                self.attempts += 1
                port = free_port()
                proc = start_operator(self.cluster, self.namespace, port, self.log)
                started, served = time.monotonic(), False
                while time.monotonic() - started < KILL_AFTER_SECONDS:
                    served = served or answers(port)
                    time.sleep(0.25)
                alive = proc.poll() is None
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                if alive and served:
                    self.kills += 1
        except BaseException as exc:  # surfaced by the test
            self.error = exc


def kubectl_json(cluster: DevClusterHandle, namespace: str, *args: str) -> list[dict[str, Any]]:
    return list(json.loads(cluster.kubectl("get", "-n", namespace, *args, "-o", "json").stdout)["items"])


def apply_all(cluster: DevClusterHandle, namespace: str, replicas: dict[str, int]) -> None:
    items = [cheap(name, replicas=n) for name, n in replicas.items()]
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List",
                                                                          "items": items}))


def delete(cluster: DevClusterHandle, namespace: str, names: list[str]) -> None:
    cluster.kubectl("delete", "llmd", "-n", namespace, "--wait=false", *names)


def problems(cluster: DevClusterHandle, namespace: str, desired: dict[str, int]) -> list[str]:
    """What is still wrong: empty when the namespace holds exactly the desired fleets."""
    found: list[str] = []
    llmds = {o["metadata"]["name"]: o for o in kubectl_json(cluster, namespace, "llmd")}
    if set(llmds) != set(desired):
        found.append(f"LLMDeployments {sorted(set(llmds) ^ set(desired))} differ from the desired set")
    uids = {o["metadata"]["uid"]: name for name, o in llmds.items()}
    for name, cr in llmds.items():
        status = cr.get("status") or {}
        if status.get("observedGeneration") != cr["metadata"]["generation"]:
            found.append(f"{name}: status.observedGeneration {status.get('observedGeneration')} "
                         f"!= generation {cr['metadata']['generation']}")
        if status.get("desiredReplicas") != desired.get(name):
            found.append(f"{name}: status.desiredReplicas {status.get('desiredReplicas')} != {desired.get(name)}")
    children: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for kind in CHILD_KINDS:
        for child in kubectl_json(cluster, namespace, kind, "-l", MANAGED):
            meta = child["metadata"]
            owners = [r["uid"] for r in meta.get("ownerReferences") or [] if r.get("kind") == "LLMDeployment"]
            if not owners or owners[0] not in uids:
                found.append(f"orphaned {kind} {meta['name']} (owner {owners})")
                continue
            children.setdefault(uids[owners[0]], {}).setdefault(kind, []).append(child)
    for name in llmds:
        mine = children.get(name, {})
        for kind in ("deployments", "services", "configmaps"):
            if len(mine.get(kind, [])) != 1:
                found.append(f"{name}: {len(mine.get(kind, []))} {kind}, want 1")
        deployments = mine.get("deployments", [])
        if deployments and deployments[0]["spec"]["replicas"] != desired.get(name):
            found.append(f"{name}: Deployment replicas {deployments[0]['spec']['replicas']} != {desired.get(name)}")
    return found


@contextlib.contextmanager
def final_operator(cluster: DevClusterHandle, namespace: str, log: Path) -> Iterator[subprocess.Popen[bytes]]:
    proc = start_operator(cluster, namespace, free_port(), log)
    try:
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_operator_killed_every_5_s_during_churn_converges_without_duplicates_or_orphans(
        dev_cluster: DevClusterHandle, namespace: str, tmp_path: Path) -> None:
    log = tmp_path / "operator.log"
    killer = Killer(dev_cluster, namespace, log)
    killer.thread.start()
    desired: dict[str, int] = {}

    def wave(update: dict[str, int]) -> None:
        desired.update(update)
        apply_all(dev_cluster, namespace, update)
        time.sleep(4)  # the next wave lands on another operator life

    wave({f"chaos-{i:02d}": i % 2 for i in range(COUNT)})                       # create
    wave({name: (n + 1) % 3 for name, n in desired.items()})                   # scale every one
    gone = [f"chaos-{i:02d}" for i in range(0, COUNT, 3)]                       # delete a third
    delete(dev_cluster, namespace, gone)
    for name in gone:
        desired.pop(name)
    time.sleep(4)
    wave({f"chaos-{i:02d}": 2 for i in range(COUNT, COUNT + COUNT // 3)})      # create more
    wave({name: 2 - n for name, n in desired.items()})                         # scale again
    delete(dev_cluster, namespace, [f"chaos-{COUNT + 1:02d}"])                  # delete ...
    desired.pop(f"chaos-{COUNT + 1:02d}")
    wave({gone[0]: 1, gone[1]: 0})                                              # ... and re-create namesakes
    wait_until(lambda: not killer.thread.is_alive(), 180, "the killer to finish")
    assert killer.error is None, killer.error
    assert killer.kills >= KILLS, f"only {killer.kills} kills of a serving operator in {killer.attempts} starts"

    with final_operator(dev_cluster, namespace, log) as proc:
        last: list[list[str]] = [[]]

        def converged() -> bool:
            last[0] = problems(dev_cluster, namespace, desired)
            return not last[0]

        try:
            wait_until(converged, CONVERGE_SECONDS, "convergence after the last kill")
        except AssertionError as exc:
            raise AssertionError(f"{exc}\nstill wrong: {last[0][:20]}") from None
        assert proc.poll() is None
        dev_cluster.kubectl("delete", "llmd", "--all", "-n", namespace, "--wait=true", "--timeout=60s", check=False)
