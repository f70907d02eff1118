"""A dev cluster of a test's own (temporary state dir, own ports), for tests that restart or stop
its control plane: doing that to the shared session cluster would pull it from under every other test."""

from __future__ import annotations

import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from fleetserve_devcluster import tools
from fleetserve_devcluster.testing import cluster_env, free_port_base
from operator_harness import CRDS


def fleetserve(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fleetserve_cli.main", *args], capture_output=True, text=True,
                          timeout=300)


def up(state: Path, base: int) -> None:
    """`fleetserve dev-cluster up` (idempotent: it also restarts a component that died)."""
    result = fleetserve("dev-cluster", "up", "--state-dir", str(state), "--port-base", str(base), "--nodes", "1")
    assert result.returncode == 0, f"up failed:\n{result.stdout}\n{result.stderr}"


@pytest.fixture(name="own_cluster")
def own_cluster_fixture(tmp_path: Path) -> Iterator[tuple[Path, int]]:
    missing = tools.missing_tools()
    if missing:
        pytest.fail(f"dev cluster tools not provisioned: {missing}; run `make install`", pytrace=False)
    state = tmp_path / "cluster"
    base = free_port_base(20000, 30000)
    try:
        up(state, base)
        env = cluster_env(state)
        kubectl = str(tools.tool_path("kubectl"))
        subprocess.run([kubectl, "apply", "--server-side", "-f", str(CRDS)], env=env, check=True, capture_output=True)
        subprocess.run([kubectl, "wait", "--for=condition=Established", "--timeout=60s",
                        "crd/llmdeployments.fleetserve.io"], env=env, check=True, capture_output=True)
        yield state, base
    finally:
        fleetserve("dev-cluster", "down", "--state-dir", str(state))


def probe(port: int, path: str) -> tuple[int, str]:
    """(status, body) of GET http://127.0.0.1:port/path; (0, "") when nothing answers."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=3) as resp:
            return int(resp.status), resp.read().decode()
    except urllib.error.HTTPError as exc:
        return int(exc.code), exc.read().decode()
    except OSError:
        return 0, ""
