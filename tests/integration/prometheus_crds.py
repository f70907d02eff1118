"""The Prometheus Operator's ServiceMonitor and PrometheusRule CRDs — never hand-written.

One source for every test and for ``fleetserve dev-cluster up --monitoring``: the CRDs the Go module
``github.com/prometheus-operator/prometheus-operator`` ships at the pinned version (controller-gen
output of its ``pkg/apis/monitoring`` types, checked so by hack/prometheus-operator-crds.sh), as
``make install`` provisions them (helm_util.prometheus_operator_crds()).
"""

from __future__ import annotations

from pathlib import Path

from helm_util import PROMETHEUS_OPERATOR_VERSION, prometheus_operator_crds

__all__ = ["PROMETHEUS_OPERATOR_VERSION", "crd_files"]
FILES = ("monitoring.coreos.com_servicemonitors.yaml", "monitoring.coreos.com_prometheusrules.yaml")


def crd_files() -> list[Path]:
    """The two CRD files of the pinned release (the test fails, naming the fix, when not provisioned)."""
    out = prometheus_operator_crds()
    return [out / f for f in FILES]
