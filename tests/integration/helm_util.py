"""Helpers of the Helm integration tests: polling with a deadline, helm and kubectl JSON on the dev cluster."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest
from fleetserve_devcluster.testing import DevClusterHandle
from fleetserve_devcluster.tools import ToolMissingError, tool_path

T = TypeVar("T")


def wait_until(fn: Callable[[], T | None], timeout: float, what: str, interval: float = 1.0) -> T:
    """Poll `fn` until it returns something truthy; fail naming `what` and the last value."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = fn()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:g}s waiting for {what}; last value: {last!r}")


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
