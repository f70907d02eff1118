"""Helpers of the Helm integration tests: helm and kubectl JSON on the dev cluster (and `wait_until`, from fleetserve_devcluster.testing)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
from fleetserve_devcluster.testing import DevClusterHandle, wait_until
from fleetserve_devcluster.tools import ToolMissingError, cache_dir, tool_path

__all__ = ["get_json", "helm", "install_prometheus_operator_crds", "prometheus_operator_crds", "wait_until"]  # wait_until: the shared one, for the Helm tests' imports


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


PROMETHEUS_OPERATOR_VERSION = "v0.85.0"  # the pin of hack/prometheus-operator-crds.sh


def prometheus_operator_crds() -> Path:
    """The Prometheus Operator's CRDs at the pinned version, as `make install` provisioned them."""
    out = cache_dir() / "prometheus-operator-crds" / PROMETHEUS_OPERATOR_VERSION
    if not (out / ".complete").is_file():
        pytest.fail(f"the Prometheus Operator CRDs {PROMETHEUS_OPERATOR_VERSION} are not provisioned in {out}: "
                    "run `hack/install-tools.sh prometheus-operator-crds` (part of `make install`)", pytrace=False)
    return out


REPO = Path(__file__).resolve().parents[2]


def install_prometheus_operator_crds(cluster: DevClusterHandle) -> None:
    """Cluster-wide and left in place, as on a cluster with kube-prometheus-stack."""
    crds = prometheus_operator_crds()
    for name in ("servicemonitors", "prometheusrules", "podmonitors"):
        cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f",
                        str(crds / f"monitoring.coreos.com_{name}.yaml"))
        cluster.kubectl("wait", "--for=condition=Established", "--timeout=60s", f"crd/{name}.monitoring.coreos.com")
    cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(REPO / "crds"))
    cluster.kubectl("wait", "--for=condition=Established", "crd/llmdeployments.fleetserve.io", "--timeout=60s")
