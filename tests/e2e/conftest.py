"""End-to-end fixtures: every test namespace enforces the restricted Pod Security profile.

The `namespace` fixture of tests/conftest.py, labelled `pod-security.kubernetes.io/enforce:
restricted` (version latest) before the test uses it: the API server's own PodSecurity admission
then refuses any pod of the product (a model server, the operator) that violates the profile,
so a regression shows up as a FailedCreate and the test fails
(tests/e2e/test_pod_security.py proves the admission is live).
"""

from __future__ import annotations

import pytest
from fleetserve_devcluster.testing import DevClusterHandle

RESTRICTED = ("pod-security.kubernetes.io/enforce=restricted", "pod-security.kubernetes.io/enforce-version=latest")


def enforce_restricted(cluster: DevClusterHandle, namespace: str) -> None:
    cluster.kubectl("label", "--overwrite", "namespace", namespace, *RESTRICTED)


@pytest.fixture
def namespace(namespace: str, dev_cluster: DevClusterHandle) -> str:
    enforce_restricted(dev_cluster, namespace)
    return namespace
