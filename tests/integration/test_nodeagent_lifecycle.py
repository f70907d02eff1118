"""Node agent on a real control plane: graceful deletion, crash back-off, liveness restarts."""

from __future__ import annotations

import json
import time
from pathlib import Path

from fleetserve_devcluster.testing import DevClusterHandle
from nodeagent_util import (
    PORT,
    READY_PROBE,
    apply,
    echo_container,
    echo_pod,
    http,
    pod,
    ready_pods,
    records,
    wait_until,
)


def test_delete_runs_prestop_then_sigterm_and_waits_for_exit(dev_cluster: DevClusterHandle, namespace: str,
                                                              tmp_path: Path) -> None:
    record = tmp_path / "events"
    container = echo_container(["--record", str(record), "--drain-seconds", "1"], readinessProbe=READY_PROBE,
                               lifecycle={"preStop": {"httpGet": {"path": "/prestop", "port": "http"}}})
    apply(dev_cluster, namespace, echo_pod("drain", container=container, terminationGracePeriodSeconds=20))
    wait_until(lambda: ready_pods(dev_cluster, namespace, ""), 120, "pod drain Ready")
    dev_cluster.kubectl("delete", "pod", "drain", "-n", namespace, "--wait=true", timeout=60)
    events = [e for e, _ in records(record)]
    assert events[0].startswith("start")
    assert events[1:] == ["prestop", "signal SIGTERM", "exit 0"], events


def test_grace_period_then_sigkill(dev_cluster: DevClusterHandle, namespace: str, tmp_path: Path) -> None:
    """A process that ignores SIGTERM is killed only when the grace period (after a preStop sleep) is over."""
    record = tmp_path / "events"
    container = echo_container(["--record", str(record), "--ignore-sigterm"], readinessProbe=READY_PROBE,
                               lifecycle={"preStop": {"exec": {"command": ["sleep", "1"]}}})
    apply(dev_cluster, namespace, echo_pod("stubborn", container=container, terminationGracePeriodSeconds=4))
    wait_until(lambda: ready_pods(dev_cluster, namespace, ""), 120, "pod stubborn Ready")
    t0 = time.time()
    dev_cluster.kubectl("delete", "pod", "stubborn", "-n", namespace, "--wait=false")
    wait_until(lambda: pod(dev_cluster, namespace, "stubborn") is None, 60, "pod stubborn deleted")
    gone = time.time()
    events = dict(records(record))
    assert "signal SIGTERM" in events and "exit 0" not in events, events  # it never exited on its own
    assert events["signal SIGTERM"] - t0 >= 1.0  # the preStop sleep ran first
    assert gone - t0 >= 4.0  # the API object stayed until the grace period was over and the process killed


def test_crashing_container_restarts_with_backoff(dev_cluster: DevClusterHandle, namespace: str) -> None:
    apply(dev_cluster, namespace, echo_pod("crash", ["--exit-after", "0.5", "--exit-code", "3"]))
    seen_backoff: list[str] = []

    def restarted_twice() -> dict | None:
        p = pod(dev_cluster, namespace, "crash") or {}
        cs = (p.get("status", {}).get("containerStatuses") or [{}])[0]
        waiting = cs.get("state", {}).get("waiting", {})
        if waiting.get("reason") == "CrashLoopBackOff":
            seen_backoff.append(waiting.get("message", ""))
        return cs if cs.get("restartCount", 0) >= 2 and seen_backoff else None

    cs = wait_until(restarted_twice, 90, "two restarts with CrashLoopBackOff in between", interval=0.1)
    assert cs["lastState"]["terminated"]["exitCode"] == 3
    assert cs["lastState"]["terminated"]["reason"] == "Error"
    assert any("back-off" in m for m in seen_backoff)
    phase = (pod(dev_cluster, namespace, "crash") or {})["status"]["phase"]
    assert phase == "Running"  # restartPolicy Always: the pod keeps running through restarts


def test_liveness_failure_restarts_the_container(dev_cluster: DevClusterHandle, namespace: str) -> None:
    # The startup probe holds the liveness probe off until the process listens (slow on a loaded machine).
    health = {"httpGet": {"path": "/health", "port": "http"}, "periodSeconds": 1}
    container = echo_container(readinessProbe=READY_PROBE, startupProbe={**health, "failureThreshold": 300},
                               livenessProbe={**health, "failureThreshold": 2})

    apply(dev_cluster, namespace, echo_pod("live", container=container, terminationGracePeriodSeconds=2))
    p = wait_until(lambda: ready_pods(dev_cluster, namespace, ""), 120, "pod live Ready")[0]
    base = f"http://{p['status']['podIP']}:{PORT}"
    first_pid = json.loads(http("GET", f"{base}/")[1])["pid"]
    assert http("POST", f"{base}/control/health?value=false")[0] == 200

    def restarted() -> dict | None:
        cur = pod(dev_cluster, namespace, "live") or {}
        cs = (cur.get("status", {}).get("containerStatuses") or [{}])[0]
        return cs if cs.get("restartCount", 0) >= 1 and cs.get("ready") else None

    cs = wait_until(restarted, 120, "a liveness restart")
    assert cs["restartCount"] == 1
    assert http("GET", f"{base}/health")[0] == 200  # the fresh process is healthy again, on the same pod IP
    assert json.loads(http("GET", f"{base}/")[1])["pid"] != first_pid
