"""ServiceMonitor and PrometheusRule (Prometheus Operator), created only when their CRDs exist."""

from __future__ import annotations

from typing import Any

from .labels import (
    APP_NAME,
    LABEL_INSTANCE,
    LABEL_NAME,
    PORT_NAME,
    ROUTER_APP_NAME,
    child_labels,
    selector_labels,
)

# Same base as the chart's alerts.runbookBaseURL default; the sections are in docs/runbooks.md.
RUNBOOK_BASE_URL = "https://github.com/fleetserve/fleetserve/blob/main/docs/runbooks.md"
# The job label of server targets that the chart's alert rules select (values.yaml alerts.serverJob).
SERVER_JOB = "fleetserve-server"
# The job of the router pods' targets (values.yaml alerts.routerJob).
ROUTER_JOB = "fleetserve-router"
_SERVICE_APP_LABEL = "__meta_kubernetes_service_label_app_kubernetes_io_name"


def build_service_monitor(name: str, namespace: str, scrape_interval_seconds: int,
                          router: bool = False) -> dict[str, Any]:
    """The servers' /metrics; with ``router`` also the router pods' (Service ``<name>`` then selects
    them and ``<name>-servers`` the servers): one endpoint per job, each keeping its own Service's targets."""
    server: dict[str, Any] = {
        "port": PORT_NAME, "path": "/metrics", "interval": f"{scrape_interval_seconds}s",
        # The chart's alerts select server targets by this job (alerts.serverJob's default);
        # without it the job is the Service's name and FleetserveServerTargetDown never fires.
        "relabelings": [{"targetLabel": "job", "replacement": SERVER_JOB}],
    }
    selector: dict[str, Any] = {"matchLabels": selector_labels(name)}
    endpoints = [server]
    if router:
        selector = {"matchLabels": {LABEL_INSTANCE: name},
                    "matchExpressions": [{"key": LABEL_NAME, "operator": "In", "values": [APP_NAME, ROUTER_APP_NAME]}]}
        server["relabelings"] = [*server["relabelings"], _keep(APP_NAME)]
        endpoints.append({
            "port": PORT_NAME, "path": "/metrics", "interval": f"{scrape_interval_seconds}s",
            "relabelings": [{"targetLabel": "job", "replacement": ROUTER_JOB}, _keep(ROUTER_APP_NAME)],
        })
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "ServiceMonitor",
        "metadata": {"name": name, "namespace": namespace, "labels": child_labels(name)},
        "spec": {
            "selector": selector,
            "namespaceSelector": {"matchNames": [namespace]},
            "endpoints": endpoints,
        },
    }


def _keep(app: str) -> dict[str, Any]:
    return {"action": "keep", "sourceLabels": [_SERVICE_APP_LABEL], "regex": app}


def build_prometheus_rule(name: str, namespace: str, max_queue_length: int | None,
                          servers_service: str | None = None) -> dict[str, Any]:
    """Alerts scoped to this LLMDeployment's server pods (by their Service's label: ``<name>``, or
    ``<name>-servers`` with the router on)."""
    sel = f'namespace="{namespace}",service="{servers_service or name}"'
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
