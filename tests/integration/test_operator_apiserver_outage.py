"""The API server goes away for 30 s and comes back; the operator lives through it (issue 19, point 4).

On a cluster of its own: the kube-apiserver process is killed, stays down for 30 s, and
`fleetserve dev-cluster up` starts it again (same etcd, same CA). A single operator
(`--no-leader-election`) must not exit — no restart, no crash loop — and must re-list and
converge on what changed after the API server returned, with its /healthz back at 200. A leader
of a Lease, which cannot renew for 10 s, exits 1 instead (the pod restarts as a standby): that
path is test_operator_health.py's.
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

    port, log = free_port(), tmp_path / "operator.log"
    with open(log, "wb") as out:
        operator = subprocess.Popen(
            [sys.executable, "-m", "fleetserve_cli.main", "operator", "--namespace", "default",
             "--no-leader-election", "--metrics-port", str(port), "--metrics-host", "127.0.0.1"],
            env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: operator.poll() is not None or probe(port, "/readyz")[0] == 200, 60, "/readyz")
        kubectl("apply", "-n", "default", "-f", "-", input=json.dumps(cheap("before", replicas=1)))
        wait_until(lambda: replicas("before") == 1, 60, "the Deployment of `before`")

        apiserver = processes.read_pid(processes.pid_file(state, "kube-apiserver"))
        assert apiserver is not None
        os.kill(apiserver, signal.SIGKILL)
        deadline = time.monotonic() + OUTAGE_SECONDS
        while time.monotonic() < deadline:  # the outage; the operator must stay up all along
            assert operator.poll() is None, f"the operator exited {operator.returncode}:\n{log.read_text()[-3000:]}"
            time.sleep(1)
        up(state, base)  # starts the API server again

        # Changes made after the outage: the operator's watches must have come back.
        kubectl("patch", "llmd", "before", "-n", "default", "--type=merge", "-p", '{"spec":{"replicas":2}}')
        kubectl("apply", "-n", "default", "-f", "-", input=json.dumps(cheap("after", replicas=1)))
        wait_until(lambda: replicas("before") == 2, 120, "the scale-up of `before` after the outage")
        wait_until(lambda: replicas("after") == 1, 120, "the Deployment of `after`, created after the outage")
        wait_until(lambda: probe(port, "/healthz")[0] == 200, 60, "/healthz back at 200")
        assert operator.poll() is None
    finally:
        operator.kill()
        operator.wait()
