"""The `fleetserve` console script: version, and --help on every subcommand."""

from __future__ import annotations

import subprocess
import sys

import pytest
from fleetserve_cli.main import COMMANDS, build_parser, main, package_version


def test_version_flag_prints_the_distribution_version() -> None:
    proc = subprocess.run([sys.executable, "-m", "fleetserve_cli.main", "--version"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0
    assert proc.stdout.strip() == f"fleetserve {package_version()}"
    assert package_version() != "0+unknown", "the fleetserve distribution is not installed (pip install -e .)"


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_subcommand_has_help(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: fleetserve {command}")


@pytest.mark.parametrize("action", ["up", "down", "status", "env"])
def test_dev_cluster_actions_have_help(action: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["dev-cluster", action, "--help"])
    assert exc.value.code == 0
    assert f"fleetserve dev-cluster {action}" in capsys.readouterr().out


def test_no_subcommand_prints_help_and_fails(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert "dev-cluster" in capsys.readouterr().out


def test_unknown_subcommand_is_a_usage_error() -> None:
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(["no-such-command"])
    assert exc.value.code == 2
