"""Helpers of the Helm integration tests: helm and kubectl JSON on the dev cluster (and `wait_until`, from fleetserve_devcluster.testing)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
from fleetserve_devcluster.testing import DevClusterHandle, wait_until
from fleetserve_devcluster.tools import ToolMissingError, tool_path

__all__ = ["get_json", "helm", "wait_until"]  # wait_until: the shared one, for the Helm tests' imports


def helm(cluster: DevClusterHandle, *args: str | Path, check: bool = True,
         timeout: float = 300) -> subprocess.CompletedProcess[str]:
    try:
        binary = tool_path("helm")
    except ToolMissingError as exc:
        pytest.fail(str(exc))
    proc = subprocess.run([str(binary), *map(str, args)], capture_output=True, text=True,
                          env=cluster.env, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"helm {' '.join(map(str, args))} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


def get_json(cluster: DevClusterHandle, *args: str) -> Any:
    return json.loads(cluster.kubectl("get", *args, "-o", "json").stdout)
