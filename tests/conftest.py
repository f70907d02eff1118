"""Shared fixtures: a real dev cluster (session) and a throwaway namespace (per test).

`dev_cluster` reuses a cluster already running in the default state dir
(``$FLEETSERVE_CACHE_DIR/dev-cluster``; `FLEETSERVE_DEV_CLUSTER_STATE` picks
another) or runs `fleetserve dev-cluster up` and, at session end, `down` —
only if it started it, and not when FLEETSERVE_DEV_CLUSTER_KEEP=1.
Tip for a shared machine: `fleetserve dev-cluster up` once by hand; then no
test session tears it down under another one.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from fleetserve_devcluster.testing import DevClusterHandle, acquire, create_namespace, release
from fleetserve_devcluster.tools import missing_tools


@pytest.fixture(scope="session")
def dev_cluster() -> Iterator[DevClusterHandle]:
    missing = missing_tools()
    if missing:
        pytest.fail(f"dev cluster tools not provisioned: {', '.join(missing)}; run `make install`", pytrace=False)
    state = os.environ.get("FLEETSERVE_DEV_CLUSTER_STATE")
    handle = acquire(Path(state) if state else None)
    try:
        yield handle
    finally:
        release(handle)


@pytest.fixture
def namespace(dev_cluster: DevClusterHandle) -> Iterator[str]:
    """A fresh namespace `test-<hex>`, deleted (without waiting) after the test."""
    name = f"test-{uuid.uuid4().hex[:10]}"
    create_namespace(dev_cluster, name)
    try:
        yield name
    finally:
        dev_cluster.kubectl("delete", "namespace", name, "--wait=false", "--ignore-not-found", check=False)
