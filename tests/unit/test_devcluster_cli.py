"""`fleetserve dev-cluster` argument parsing, config validation and `env` in a real bash."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from fleetserve_cli.main import build_parser, main
from fleetserve_devcluster import tools
from fleetserve_devcluster.controlplane import ClusterConfig, DevClusterError


def test_up_defaults_to_two_nodes_with_two_gpus() -> None:
    args = build_parser().parse_args(["dev-cluster", "up"])
    assert (args.nodes, args.gpus_per_node, args.state_dir, args.port_base) == (2, 2, None, None)


def test_up_parses_nodes_gpus_and_state_dir(tmp_path: Path) -> None:
    args = build_parser().parse_args(
        ["dev-cluster", "up", "--nodes", "3", "--gpus-per-node", "8", "--state-dir", str(tmp_path)])
    assert (args.nodes, args.gpus_per_node, args.state_dir) == (3, 8, tmp_path)


@pytest.mark.parametrize("flag,value", [("--nodes", "-1"), ("--gpus-per-node", "two")])
def test_up_rejects_bad_counts_naming_the_flag(flag: str, value: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(["dev-cluster", "up", flag, value])
    assert exc.value.code == 2
    assert flag in capsys.readouterr().err


def test_dev_cluster_without_action_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["dev-cluster"]) == 2
    assert "up" in capsys.readouterr().err


def test_cluster_config_derives_ports_and_round_trips(tmp_path: Path) -> None:
    config = ClusterConfig(nodes=3, gpus_per_node=1, port_base=20000)
    assert config.ports["apiserver"] == 20443 and config.ports["etcd"] == 20379
    assert len(set(config.ports.values())) == len(config.ports)
    config.save(tmp_path)
    assert ClusterConfig.load(tmp_path) == config


@pytest.mark.parametrize("kwargs,field", [({"nodes": -1}, "--nodes"), ({"gpus_per_node": -2}, "--gpus-per-node"),
                                          ({"port_base": 80}, "--port-base")])
def test_cluster_config_rejects_bad_values_naming_the_flag(kwargs: dict[str, int], field: str) -> None:
    with pytest.raises(DevClusterError, match=field):
        ClusterConfig(**kwargs)


def test_status_without_a_cluster_says_how_to_start_one(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["dev-cluster", "status", "--state-dir", str(tmp_path / "none")]) == 1
    assert "fleetserve dev-cluster up" in capsys.readouterr().err


def _fake_cache_with_helm(root: Path) -> Path:
    helm = root / "helm" / tools.HELM_VERSION / "bin" / "helm"
    helm.parent.mkdir(parents=True)
    helm.write_text("#!/bin/sh\necho fake-helm\n")
    helm.chmod(0o755)
    return helm


def test_env_evaluates_in_bash_and_puts_tools_first_without_a_cluster(tmp_path: Path) -> None:
    cache = tmp_path / "cache dir"  # a space: the exports must be quoted
    _fake_cache_with_helm(cache)
    state = tmp_path / "state dir"
    env = {**os.environ, "FLEETSERVE_CACHE_DIR": str(cache), "PATH": "/usr/bin:/bin"}
    script = (f'eval "$({sys.executable} -m fleetserve_cli.main dev-cluster env --state-dir \'{state}\')" && '
              'echo "KC=$KUBECONFIG" && echo "HELM=$(command -v helm)" && helm && echo "PATH=$PATH"')
    proc = subprocess.run(["bash", "-c", script], capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 0, proc.stderr
    lines = dict(line.split("=", 1) for line in proc.stdout.splitlines() if "=" in line)
    assert lines["KC"] == str(state / "kubeconfig")
    assert lines["HELM"] == str(cache / "bin" / "helm")
    assert "fake-helm" in proc.stdout
    assert lines["PATH"].startswith(f"{cache / 'bin'}:") and lines["PATH"].endswith(":/usr/bin:/bin")
    assert "no dev cluster is running" in proc.stderr
