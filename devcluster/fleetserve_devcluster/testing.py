"""Test helpers around a running dev cluster (used by tests/conftest.py).

Kept in the package rather than in conftest so that the demo script and
other tiers can reuse the same handle.  Imports the kubernetes client lazily.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from . import controlplane, tools

T = TypeVar("T")


class KubectlError(AssertionError):
    """kubectl exited non-zero; the message carries the command, stdout and stderr."""


@dataclass
class DevClusterHandle:
    """A running dev cluster as a test sees it.

    ``env`` is os.environ plus ``KUBECONFIG`` and the tools directory first on
    ``PATH``: pass it to any subprocess that should talk to the cluster.
    """

    state_dir: Path
    kubeconfig: Path
    env: dict[str, str]
    started_here: bool

    def kubectl(self, *args: str, input: str | None = None, check: bool = True,
                timeout: float = 60) -> subprocess.CompletedProcess[str]:
        cmd = [str(tools.tool_path("kubectl")), *args]
        proc = subprocess.run(cmd, input=input, capture_output=True, text=True, env=self.env, timeout=timeout)
        if check and proc.returncode != 0:
            raise KubectlError(f"kubectl {' '.join(args)} exited {proc.returncode}\n"
                               f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
        return proc

    def api_client(self) -> Any:
        """A fresh ``kubernetes.client.ApiClient`` for the admin identity."""
        from kubernetes import config

        return config.new_client_from_config(config_file=str(self.kubeconfig))


def cluster_env(state_dir: Path) -> dict[str, str]:
    env = tools.tools_env()
    env["KUBECONFIG"] = str(state_dir / "kubeconfig")
    return env


def _fleetserve(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fleetserve_cli.main", *args],
                          capture_output=True, text=True, timeout=600)


def acquire(state_dir: Path | None = None, port_base: int | None = None) -> DevClusterHandle:
    """Reuse the dev cluster running in ``state_dir`` or start one with `fleetserve dev-cluster up`
    (on ``port_base`` when given; a state dir created earlier keeps its own ports)."""
    state_dir = (state_dir or controlplane.default_state_dir()).expanduser().resolve()
    started = not controlplane.is_up(state_dir)
    # `up` is idempotent and cheap on a running cluster (health probes only), and
    # it restarts a component that died, so a reused cluster is a whole one.
    ports = () if port_base is None else ("--port-base", str(port_base))
    proc = _fleetserve("dev-cluster", "up", "--state-dir", str(state_dir), *ports)
    if proc.returncode != 0:
        raise RuntimeError(f"`fleetserve dev-cluster up` failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return DevClusterHandle(state_dir, state_dir / "kubeconfig", cluster_env(state_dir), started)


def release(handle: DevClusterHandle) -> None:
    """`down` the cluster if this session started it (unless FLEETSERVE_DEV_CLUSTER_KEEP=1)."""
    if handle.started_here and os.environ.get("FLEETSERVE_DEV_CLUSTER_KEEP") != "1":
        _fleetserve("dev-cluster", "down", "--state-dir", str(handle.state_dir))


def create_namespace(handle: DevClusterHandle, name: str, timeout: float = 120.0) -> None:
    """Create a namespace and wait for its `default` ServiceAccount.

    The service-account controller adds it asynchronously; a pod created before
    it exists is refused ("serviceaccount \"default\" not found"), and on a
    control plane that has just started that window can last many seconds.
    """
    handle.kubectl("create", "namespace", name)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if handle.kubectl("get", "serviceaccount", "default", "-n", name, check=False).returncode == 0:
            return
        time.sleep(0.5)
    raise TimeoutError(f"namespace {name}: no default ServiceAccount after {timeout:g}s "
                       "(is kube-controller-manager running? see `fleetserve dev-cluster status`)")


def wait_until(fn: Callable[[], T | None], timeout: float, what: str, interval: float = 0.5) -> T:
    """Poll ``fn`` until it returns something truthy; fail naming ``what`` and the last value."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = fn()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:g}s waiting for {what}; last value: {last!r}")


def free_port_base(start: int, stop: int) -> int:
    """The first port base in ``start..stop`` (steps of 100) whose dev-cluster ports are all free,
    for a second dev cluster next to the ones already running on this machine."""
    for base in range(start, stop, 100):
        if all(controlplane.port_free(p) for p in controlplane.ClusterConfig(port_base=base).ports.values()):
            return base
    raise controlplane.DevClusterError(f"no port base in {start}..{stop} has all of its dev-cluster ports free")
