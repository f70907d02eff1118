"""ServiceMonitor and PrometheusRule (Prometheus Operator), created only when their CRDs exist."""

from __future__ import annotations

from typing import Any

from .labels import PORT_NAME, child_labels, selector_labels

# Same base as the chart's alerts.runbookBaseURL default; the sections are in docs/runbooks.md.
RUNBOOK_BASE_URL = "https://github.com/fleetserve/fleetserve/blob/main/docs/runbooks.md"
# The job label of server targets that the chart's alert rules select (values.yaml alerts.serverJob).
SERVER_JOB = "fleetserve-server"


def build_service_monitor(name: str, namespace: str, scrape_interval_seconds: int) -> dict[str, Any]:
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "ServiceMonitor",
        "metadata": {"name": name, "namespace": namespace, "labels": child_labels(name)},
        "spec": {
            "selector": {"matchLabels": selector_labels(name)},
            "namespaceSelector": {"matchNames": [namespace]},
            "endpoints": [{
                "port": PORT_NAME, "path": "/metrics", "interval": f"{scrape_interval_seconds}s",
                # The chart's alerts select server targets by this job (alerts.serverJob's default);
                # without it the job is the Service's name and FleetserveServerTargetDown never fires.
                "relabelings": [{"targetLabel": "job", "replacement": SERVER_JOB}],
            }],
        },
    }


def build_prometheus_rule(name: str, namespace: str, max_queue_length: int | None) -> dict[str, Any]:
    """Alerts scoped to this LLMDeployment's pods (by the Service's job label)."""
    sel = f'namespace="{namespace}",service="{name}"'
    # Alert names must differ from the chart's (charts/fleetserve/templates/_alerts.tpl): Alertmanager
    # groups and silences by name, and the chart's per-pod FleetserveKVCacheNearlyFull already covers
    # the KV cache, so this rule has no KV-cache alert of its own.
    rules: list[dict[str, Any]] = [
        {
            "alert": "FleetserveReplicasUnavailable",
            # Targets minus up targets: `count(up == 1)` is empty (not 0) when every replica is
            # down, so it is defaulted to 0; the value is the number of pods not up.
            "expr": f"count(up{{{sel}}}) - (count(up{{{sel}}} == 1) or vector(0)) > 0",
            "for": "15m",
            "labels": {"severity": "warning"},
            "annotations": {
                "summary": f"{{{{ $value }}}} pods of {namespace}/{name} are not scraped as up for 15 minutes",
                "description": f"Prometheus cannot scrape {{{{ $value }}}} server pods of LLMDeployment {namespace}/{name} "
                "(every pod when none is up): they are down, hung or not Ready yet.",
                "runbook_url": f"{RUNBOOK_BASE_URL}#fleetservereplicasunavailable",
            },
        },
        {
            "alert": "FleetserveRequestsRejected",
            "expr": f"sum(rate(fleetserve_requests_rejected_total{{{sel},reason=\"queue_full\"}}[5m])) > 0",
            "for": "5m",
            "labels": {"severity": "warning"},
            "annotations": {
                "summary": f"{namespace}/{name} rejects requests because its queue is full",
                "description": "Clients get 429s"
                + (f" (engine.maxQueueLength {max_queue_length})" if max_queue_length else "")
                + ' at {{ printf "%.2f" $value }}/s; add replicas.',
                "runbook_url": f"{RUNBOOK_BASE_URL}#fleetserverequestsrejected",
            },
        },
    ]
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {"name": name, "namespace": namespace, "labels": child_labels(name)},
        "spec": {"groups": [{"name": f"fleetserve.{namespace}.{name}", "rules": rules}]},
    }
