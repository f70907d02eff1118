"""End-to-end fixtures: every test namespace enforces the restricted Pod Security profile.

The `namespace` fixture of tests/conftest.py, labelled `pod-security.kubernetes.io/enforce:
restricted` (version latest) before the test uses it: the API server's own PodSecurity admission
then refuses any pod of the product (a model server, the operator) that violates the profile,
so a regression shows up as a FailedCreate and the test fails
(tests/e2e/test_pod_security.py proves the admission is live).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from autoscaler_harness import apply_crds, enforce_restricted, running_operator
from fleetserve_devcluster.testing import DevClusterHandle


@pytest.fixture
def namespace(namespace: str, dev_cluster: DevClusterHandle) -> str:
    enforce_restricted(dev_cluster, namespace)
    return namespace


# The operator as its own process on the test's namespace (metrics URL); its log tail on the way out.
@pytest.fixture
def operator(dev_cluster: DevClusterHandle, namespace: str, tmp_path: Path) -> Iterator[str]:
    apply_crds(dev_cluster)
    log = tmp_path / "operator.log"
    try:
        with running_operator(dev_cluster, namespace, log) as metrics_url:
            yield metrics_url
    finally:
        if log.exists():
            sys.stderr.write(f"--- operator log (tail) ---\n{log.read_text()[-6000:]}\n")
