"""`fleetserve dev-cluster up / status / env / down` as a user runs them, on a
second cluster in a temporary state dir (its own ports), so a shared running
cluster is left alone.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from fleetserve_devcluster import processes, tools
from fleetserve_devcluster.testing import free_port_base


def fleetserve(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fleetserve_cli.main", *args], capture_output=True, text=True,
                          timeout=300, env=env)


@pytest.fixture(scope="module")
def second_cluster(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    missing = tools.missing_tools()
    if missing:
        pytest.fail(f"dev cluster tools not provisioned: {missing}; run `make install`", pytrace=False)
    state = tmp_path_factory.mktemp("devcluster") / "state"
    base = free_port_base(18000, 30000)
    up = fleetserve("dev-cluster", "up", "--state-dir", str(state), "--port-base", str(base),
                    "--nodes", "1", "--gpus-per-node", "3")
    try:
        assert up.returncode == 0, f"up failed:\n{up.stdout}\n{up.stderr}"
        yield state, base, up
    finally:
        fleetserve("dev-cluster", "down", "--state-dir", str(state))


def test_up_env_readyz_in_bash(second_cluster) -> None:  # type: ignore[no-untyped-def]
    state, base, _ = second_cluster
    script = (f'eval "$({sys.executable} -m fleetserve_cli.main dev-cluster env --state-dir {state})" && '
              "kubectl get --raw /readyz && echo && kubectl version -o json")
    proc = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr
    readyz, _, version = proc.stdout.partition("\n")
    assert readyz == "ok"
    assert json.loads(version)["serverVersion"]["gitVersion"] == tools.K8S_VERSION
    config = json.loads((state / "cluster.json").read_text())
    assert (config["nodes"], config["gpus_per_node"], config["ports"]["apiserver"]) == (1, 3, base + 443)


def test_second_up_reports_the_running_cluster(second_cluster) -> None:  # type: ignore[no-untyped-def]
    state, base, _ = second_cluster
    before = {t.name: t.pid for t in processes.tracked(state)}
    again = fleetserve("dev-cluster", "up", "--state-dir", str(state), "--port-base", str(base),
                       "--nodes", "1", "--gpus-per-node", "3")
    assert again.returncode == 0, again.stderr
    assert "already running" in again.stdout
    assert {t.name: t.pid for t in processes.tracked(state)} == before


def test_status_lists_every_component_healthy(second_cluster) -> None:  # type: ignore[no-untyped-def]
    state, _, _ = second_cluster
    proc = fleetserve("dev-cluster", "status", "--state-dir", str(state))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for name in ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler"):
        line = next(line for line in proc.stdout.splitlines() if line.startswith(name + " "))
        assert "running" in line and line.rstrip().endswith("ok"), line


def test_busy_port_fails_with_a_clear_error(second_cluster, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    _, base, _ = second_cluster  # its ports are taken by the running second cluster
    proc = fleetserve("dev-cluster", "up", "--state-dir", str(tmp_path / "third"), "--port-base", str(base))
    assert proc.returncode == 1
    assert "is in use" in proc.stderr and "--port-base" in proc.stderr
    assert not (tmp_path / "third" / "pids").exists()


def test_down_leaves_no_process_and_no_state(second_cluster) -> None:  # type: ignore[no-untyped-def]
    # Runs last in this module (definition order): it takes the cluster down.
    state, _, _ = second_cluster
    entries = processes.tracked(state)
    assert {"etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler"} <= {t.name for t in entries}
    proc = fleetserve("dev-cluster", "down", "--state-dir", str(state))
    assert proc.returncode == 0, proc.stderr
    assert not state.exists()
    still = [t.name for t in entries if t.pid is not None and processes._process_start_time(t.pid) is not None]
    assert still == []
