"""`up`/`down` orchestration with stand-in components (real processes, no Kubernetes binaries).

The integration tests cover the real control plane; these cover the error
paths a user meets: a busy port, a missing binary, a component that dies.
"""

from __future__ import annotations

import socket
import sys
from pathlib import Path

import pytest
from fleetserve_devcluster import controlplane, processes
from fleetserve_devcluster.controlplane import Cluster, ClusterConfig, Component, DevClusterError


def _sleeper(name: str) -> Component:
    """Writes `<state>/<name>.ready` once started, then lives until signalled."""
    def argv(c: Cluster) -> list[str]:
        return [sys.executable, "-c",
                f"import time; open({str(c.state_dir / (name + '.ready'))!r}, 'w').close(); time.sleep(120)"]
    return Component(name, argv, lambda c: (c.state_dir / f"{name}.ready").exists(), timeout_s=20)


@pytest.fixture
def fake_components(monkeypatch: pytest.MonkeyPatch) -> list[Component]:
    comps = [_sleeper("alpha"), _sleeper("beta")]
    monkeypatch.setattr(controlplane, "COMPONENTS", comps)
    return comps


def _messages() -> tuple[list[str], object]:
    out: list[str] = []
    return out, out.append


def test_up_is_idempotent_and_down_leaves_nothing(tmp_path: Path, fake_components: list[Component]) -> None:
    state = tmp_path / "state"
    out, log = _messages()
    controlplane.up(state, ClusterConfig(nodes=1, gpus_per_node=4), log=log)  # type: ignore[arg-type]
    assert ClusterConfig.load(state).nodes == 1 and ClusterConfig.load(state).gpus_per_node == 4
    assert (state / "kubeconfig").exists() and (state / "pki" / "ca.crt").exists()
    pids = {t.name: t.pid for t in processes.tracked(state)}
    assert set(pids) == {"alpha", "beta"} and all(t.alive() for t in processes.tracked(state))

    out.clear()
    controlplane.up(state, ClusterConfig(nodes=5), log=log)  # type: ignore[arg-type]
    assert any("already running" in m for m in out)
    assert any("--nodes 1" in m for m in out)  # the stored config wins, and the user is told
    assert {t.name: t.pid for t in processes.tracked(state)} == pids

    entries = processes.tracked(state)
    controlplane.down(state, log=log)  # type: ignore[arg-type]
    assert not state.exists()
    assert not any(t.pid is not None and processes._process_start_time(t.pid) for t in entries)


def test_up_restarts_only_the_component_that_died(tmp_path: Path, fake_components: list[Component]) -> None:
    state = tmp_path / "state"
    controlplane.up(state, ClusterConfig(), log=lambda m: None)
    before = {t.name: t.pid for t in processes.tracked(state)}
    processes.stop([t for t in processes.tracked(state) if t.name == "beta"], grace_s=5)
    (state / "beta.ready").unlink()
    controlplane.up(state, ClusterConfig(), log=lambda m: None)
    after = {t.name: t.pid for t in processes.tracked(state)}
    assert after["alpha"] == before["alpha"] and after["beta"] != before["beta"]
    controlplane.down(state, log=lambda m: None)


def test_component_that_exits_reports_its_log(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    dying = Component("dying", lambda c: [sys.executable, "-c", "print('bad flag --frobnicate'); raise SystemExit(3)"],
                      lambda c: False, timeout_s=20)
    monkeypatch.setattr(controlplane, "COMPONENTS", [dying])
    state = tmp_path / "state"
    with pytest.raises(DevClusterError) as exc:
        controlplane.up(state, ClusterConfig(), log=lambda m: None)
    msg = str(exc.value)
    assert "dying" in msg and "exited" in msg and "bad flag --frobnicate" in msg
    assert str(state / "logs" / "dying.log") in msg
    controlplane.down(state, log=lambda m: None)


def test_busy_port_is_reported_before_anything_starts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        config = ClusterConfig(port_base=port - 379)  # etcd = base + 379
        comp = Component("etcd-like", _sleeper("etcd-like").argv, lambda c: True, port="etcd")
        monkeypatch.setattr(controlplane, "COMPONENTS", [_sleeper("first"), comp])
        state = tmp_path / "state"
        with pytest.raises(DevClusterError) as exc:
            controlplane.up(state, config, log=lambda m: None)
    assert f"port {port}" in str(exc.value) and "--port-base" in str(exc.value)
    assert processes.tracked(state) == []  # "first" was not started either


def test_missing_binary_names_make_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLEETSERVE_CACHE_DIR", str(tmp_path / "empty-cache"))
    state = tmp_path / "state"
    with pytest.raises(DevClusterError, match="make install") as exc:
        controlplane.up(state, ClusterConfig(), log=lambda m: None)
    assert "etcd" in str(exc.value)
    assert not state.exists()


def test_down_stops_processes_of_other_components_too(tmp_path: Path, fake_components: list[Component]) -> None:
    # The node agent and its pods write their own pid files; `down` stops them as well.
    state = tmp_path / "state"
    controlplane.up(state, ClusterConfig(), log=lambda m: None)
    extra = processes.start(state, "node-agent", [sys.executable, "-c", "import time; time.sleep(120)"])
    controlplane.down(state, log=lambda m: None)
    extra.wait(timeout=10)
    assert not state.exists()


def test_down_without_a_cluster_is_harmless(tmp_path: Path) -> None:
    out, log = _messages()
    controlplane.down(tmp_path / "none", log=log)  # type: ignore[arg-type]
    assert any("no dev cluster" in m for m in out)


def test_status_reports_a_dead_component_and_its_log(tmp_path: Path, fake_components: list[Component],
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    from fleetserve_cli.main import main

    state = tmp_path / "state"
    controlplane.up(state, ClusterConfig(), log=lambda m: None)
    try:
        assert main(["dev-cluster", "status", "--state-dir", str(state)]) == 0
        processes.stop([t for t in processes.tracked(state) if t.name == "beta"], grace_s=5)
        capsys.readouterr()
        assert main(["dev-cluster", "status", "--state-dir", str(state)]) == 1
        out, err = capsys.readouterr()
        beta = next(line for line in out.splitlines() if line.startswith("beta "))
        assert "stopped" in beta
        assert str(state / "logs" / "beta.log") in err and "dev-cluster up" in err
    finally:
        controlplane.down(state, log=lambda m: None)
