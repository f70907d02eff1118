"""Two real `fleetserve operator` processes and one Lease (issue 19, point 1).

Only the Lease holder reconciles; the other is Ready but idle. SIGKILL the leader right after an
LLMDeployment is scaled up: the standby takes the Lease over (within the Lease duration plus a
retry period; the wait below allows the issue's 30 s) and finishes the scale-up. A leader that
finds the Lease in another holder's hands exits non-zero at once, and a clean stop hands the
Lease back so a standby need not wait for it to expire.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from fleetserve_devcluster.testing import DevClusterHandle
from operator_harness import apply, cheap, free_port, get, install_crds, wait_until
from own_cluster import probe

LEASE = "fleetserve-operator"


@pytest.fixture(scope="module", autouse=True)
def crds(dev_cluster: DevClusterHandle) -> None:
    install_crds(dev_cluster)


@dataclass
class Operator:
    name: str  # POD_NAME: the prefix of its Lease identity
    port: int
    proc: subprocess.Popen[bytes]
    log: Path

    def probe(self, path: str) -> tuple[int, str]:
        return probe(self.port, path)


@contextlib.contextmanager
def operators(cluster: DevClusterHandle, namespace: str, tmp_path: Path, *names: str,
              extra: tuple[str, ...] = ()) -> Iterator[dict[str, Operator]]:
    """`fleetserve operator` processes watching ``namespace``, electing a leader on a Lease in it."""
    started: dict[str, Operator] = {}
    try:
        for name in names:
            port = free_port()
            log = tmp_path / f"{name}.log"
            with open(log, "wb") as out:
                proc = subprocess.Popen(
                    [sys.executable, "-m", "fleetserve_cli.main", "operator", "--namespace", namespace,
                     "--leader-election-namespace", namespace, "--metrics-port", str(port),
                     "--metrics-host", "127.0.0.1", *extra],
                    env={**cluster.env, "POD_NAME": name}, stdout=out, stderr=subprocess.STDOUT)
            started[name] = Operator(name, port, proc, log)
        for op in started.values():
            wait_until(lambda op=op: op.proc.poll() is not None or op.probe("/healthz")[0] == 200, 60,
                       f"{op.name}'s /healthz")
            assert op.proc.poll() is None, f"{op.name} exited {op.proc.returncode}:\n{op.log.read_text()[-3000:]}"
        yield started
    finally:
        for op in started.values():
            if op.proc.poll() is None:
                op.proc.terminate()
        for op in started.values():
            try:
                op.proc.wait(30)
            except subprocess.TimeoutExpired:
                op.proc.kill()
                op.proc.wait()


def holder(cluster: DevClusterHandle, namespace: str) -> str:
    lease = get(cluster, namespace, "lease", LEASE)
    return str(((lease or {}).get("spec") or {}).get("holderIdentity") or "")


def deployment_replicas(cluster: DevClusterHandle, namespace: str, name: str) -> int | None:
    deployment = get(cluster, namespace, "deployment", name)
    return None if deployment is None else int(deployment["spec"]["replicas"])


def test_standby_takes_over_and_finishes_a_scale_up_when_the_leader_is_killed(
        dev_cluster: DevClusterHandle, namespace: str, tmp_path: Path) -> None:
    with operators(dev_cluster, namespace, tmp_path, "op-a", "op-b") as ops:
        lead = wait_until(lambda: holder(dev_cluster, namespace), 30, "a Lease holder").split("_")[0]
        leader, standby = ops[lead], ops["op-b" if lead == "op-a" else "op-a"]
        # The Lease names the leader a moment before its process switches to leading: wait for that.
        wait_until(lambda: leader.probe("/readyz") == (200, "leader\n"), 30, f"{leader.name}'s /readyz as leader")
        assert standby.probe("/readyz") == (200, "standby (not the leader: ready, idle)\n")
        assert standby.probe("/healthz")[0] == 200
        assert "fleetserve_operator_leader 1.0" in leader.probe("/metrics")[1]
        assert "fleetserve_operator_leader 0.0" in standby.probe("/metrics")[1]

        apply(dev_cluster, namespace, cheap("chat", replicas=1))
        wait_until(lambda: deployment_replicas(dev_cluster, namespace, "chat") == 1, 60, "the leader's Deployment")

        # The scale-up, and the leader dies with it.
        dev_cluster.kubectl("patch", "llmd", "chat", "-n", namespace, "--type=merge", "-p",
                            json.dumps({"spec": {"replicas": 3}}))
        os.kill(leader.proc.pid, signal.SIGKILL)
        assert leader.proc.wait(10) == -signal.SIGKILL

        wait_until(lambda: holder(dev_cluster, namespace).startswith(f"{standby.name}_"), 30,
                   f"{standby.name} holding the Lease")
        wait_until(lambda: deployment_replicas(dev_cluster, namespace, "chat") == 3, 30,
                   "the new leader's scale-up to 3")
        cr = get(dev_cluster, namespace, "llmd", "chat") or {}
        wait_until(lambda: (get(dev_cluster, namespace, "llmd", "chat") or {}).get("status", {})
                   .get("observedGeneration") == cr["metadata"]["generation"], 30, "status of the new generation")
        wait_until(lambda: standby.probe("/readyz") == (200, "leader\n"), 30, f"{standby.name}'s /readyz as leader")
        assert "fleetserve_operator_leader 1.0" in standby.probe("/metrics")[1]

        # A clean stop (SIGTERM) hands the Lease back: no standby would wait for it to expire.
        dev_cluster.kubectl("delete", "llmd", "--all", "-n", namespace, "--wait=true", "--timeout=60s", check=False)
        standby.proc.terminate()
        assert standby.proc.wait(30) == 0
        assert holder(dev_cluster, namespace) == ""


def test_leader_exits_at_once_when_another_process_holds_its_lease(
        dev_cluster: DevClusterHandle, namespace: str, tmp_path: Path) -> None:
    with operators(dev_cluster, namespace, tmp_path, "op-a", extra=("--lease-duration", "6")) as ops:
        wait_until(lambda: holder(dev_cluster, namespace).startswith("op-a_"), 30, "op-a holding the Lease")
        # Someone else (a replica that saw the Lease expire, e.g. after a long pause of this one) holds it now.
        dev_cluster.kubectl("patch", "lease", LEASE, "-n", namespace, "--type=merge", "-p",
                            json.dumps({"spec": {"holderIdentity": "someone-else"}}))
        op = ops["op-a"]
        code = wait_until(lambda: op.proc.poll(), 15, "op-a to exit")  # one renewal period (2 s) and a bit
        assert code == 1
        assert "lost leadership" in op.log.read_text()
        assert holder(dev_cluster, namespace) == "someone-else"  # and it did not take it back on its way out
