"""The API server goes away for 30 s and comes back; the operator lives through it (issue 19, point 4).

On a cluster of its own: the kube-apiserver process is killed, stays down for 30 s, and
`fleetserve dev-cluster up` starts it again (same etcd, same CA). A single operator
(`--no-leader-election`) must not exit — no restart, no crash loop — and must re-list and
converge on what changed after the API server returned, with its /healthz back at 200. A leader
of a Lease, which cannot renew for 10 s, exits 1 instead (the pod restarts as a standby): that
path is test_operator_health.py's.

An autoscaled LLMDeployment (its pods never get a node, so it has no metrics) runs through the
outage too: the autoscaler holds (no spurious scale decision from the gap: same size, no
ScaledUp/ScaledDown event). Then etcd and the API server are both killed and started again at
once (a control-plane restart): the same operator process re-lists and converges again.
Takes ~1.5 minutes.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from fleetserve_devcluster import processes, tools
from fleetserve_devcluster.testing import cluster_env, wait_until
from operator_harness import cheap, free_port
from own_cluster import own_cluster_fixture, probe, up  # noqa: F401 (the fixture)

OUTAGE_SECONDS = 30
AUTOSCALED = {"enabled": True, "minReplicas": 1, "maxReplicas": 3, "scrapeIntervalSeconds": 2}


def kill(state: Path, component: str) -> None:
    pid = processes.read_pid(processes.pid_file(state, component))
    assert pid is not None, f"no pid of {component}"
    os.kill(pid, signal.SIGKILL)


def test_operator_survives_a_30_s_api_server_outage_and_converges_after_it(
        own_cluster: tuple[Path, int], tmp_path: Path) -> None:
    state, base = own_cluster
    env = cluster_env(state)
    kubectl_bin = str(tools.tool_path("kubectl"))

    def kubectl(*args: str, input: str | None = None) -> str:
        return subprocess.run([kubectl_bin, *args], env=env, input=input, capture_output=True, text=True,
                              check=True, timeout=60).stdout

    def replicas(name: str) -> int | None:
        out = subprocess.run([kubectl_bin, "get", "deployment", name, "-n", "default", "-o",
                              "jsonpath={.spec.replicas}"], env=env, capture_output=True, text=True, timeout=60)
        return int(out.stdout) if out.returncode == 0 and out.stdout.strip().isdigit() else None

    def autoscaler(name: str) -> tuple[int | None, str]:
        """(status.desiredReplicas, the ScalingActive condition's lastTransitionTime + message)."""
        out = subprocess.run([kubectl_bin, "get", "llmd", name, "-n", "default", "-o", "json"], env=env,
                             capture_output=True, text=True, timeout=60)
        if out.returncode != 0:
            return None, ""
        status = json.loads(out.stdout).get("status") or {}
        active = [c for c in status.get("conditions") or [] if c.get("type") == "ScalingActive"]
        return status.get("desiredReplicas"), "".join(f"{c.get('lastTransitionTime')} {c.get('message')}"
                                                      for c in active)

    def scaling_events() -> list[str]:
        events = json.loads(kubectl("get", "events", "-n", "default", "-o", "json"))["items"]
        return [f"{e['reason']}: {e.get('message')}" for e in events if e.get("reason") in ("ScaledUp", "ScaledDown")]

    port, log = free_port(), tmp_path / "operator.log"
    with open(log, "wb") as out:
        operator = subprocess.Popen(
            [sys.executable, "-m", "fleetserve_cli.main", "operator", "--namespace", "default",
             "--no-leader-election", "--metrics-port", str(port), "--metrics-host", "127.0.0.1"],
            env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: operator.poll() is not None or probe(port, "/readyz")[0] == 200, 60, "/readyz")
        kubectl("apply", "-n", "default", "-f", "-", input=json.dumps(cheap("before", replicas=1)))
        kubectl("apply", "-n", "default", "-f", "-", input=json.dumps(cheap("auto", autoscaling=AUTOSCALED)))
        wait_until(lambda: replicas("before") == 1, 60, "the Deployment of `before`")
        wait_until(lambda: replicas("auto") == 1 and autoscaler("auto")[1], 60, "the autoscaler's first decision")

        kill(state, "kube-apiserver")
        deadline = time.monotonic() + OUTAGE_SECONDS
        while time.monotonic() < deadline:  # the outage; the operator must stay up all along
            assert operator.poll() is None, f"the operator exited {operator.returncode}:\n{log.read_text()[-3000:]}"
            time.sleep(1)
        up(state, base)  # starts the API server again
        outage_end = time.monotonic()

        # Changes made after the outage: the operator's watches must have come back.
        kubectl("patch", "llmd", "before", "-n", "default", "--type=merge", "-p", '{"spec":{"replicas":2}}')
        kubectl("apply", "-n", "default", "-f", "-", input=json.dumps(cheap("after", replicas=1)))
        wait_until(lambda: replicas("before") == 2, 120, "the scale-up of `before` after the outage")
        wait_until(lambda: replicas("after") == 1, 120, "the Deployment of `after`, created after the outage")
        wait_until(lambda: probe(port, "/healthz")[0] == 200, 60, "/healthz back at 200")
        assert operator.poll() is None
        # Five ticks' worth (2 s apart) after the outage, and none scaled.
        wait_until(lambda: time.monotonic() > outage_end + 10, 60, "ticks of the autoscaler after the outage")
        assert autoscaler("auto")[0] == 1 and replicas("auto") == 1, \
            f"the autoscaler changed the size across the outage: {autoscaler('auto')}, {replicas('auto')}"
        assert scaling_events() == [], f"scale decisions from the outage: {scaling_events()}"

        # A control-plane restart: etcd and the API server die together and come back at once.
        kill(state, "etcd")
        kill(state, "kube-apiserver")
        up(state, base)
        kubectl("patch", "llmd", "before", "-n", "default", "--type=merge", "-p", '{"spec":{"replicas":3}}')
        kubectl("delete", "llmd", "after", "-n", "default", "--wait=false")
        kubectl("apply", "-n", "default", "-f", "-", input=json.dumps(cheap("restarted", replicas=2)))
        wait_until(lambda: replicas("before") == 3, 120, "the scale-up of `before` after the restart")
        wait_until(lambda: replicas("restarted") == 2, 120, "the Deployment of `restarted`, created after it")
        wait_until(lambda: replicas("after") is None, 120, "`after`'s Deployment gone with it")
        assert operator.poll() is None, f"the operator exited {operator.returncode}:\n{log.read_text()[-3000:]}"
        assert scaling_events() == [], f"scale decisions from the restart: {scaling_events()}"
    finally:
        operator.kill()
        operator.wait()
