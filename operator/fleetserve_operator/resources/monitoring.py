"""ServiceMonitor and PrometheusRule (Prometheus Operator), created only when their CRDs exist."""

from __future__ import annotations

from typing import Any

from .labels import PORT_NAME, child_labels, selector_labels


def build_service_monitor(name: str, namespace: str, scrape_interval_seconds: int) -> dict[str, Any]:
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "ServiceMonitor",
        "metadata": {"name": name, "namespace": namespace, "labels": child_labels(name)},
        "spec": {
            "selector": {"matchLabels": selector_labels(name)},
            "namespaceSelector": {"matchNames": [namespace]},
            "endpoints": [{"port": PORT_NAME, "path": "/metrics", "interval": f"{scrape_interval_seconds}s"}],
        },
    }


def build_prometheus_rule(name: str, namespace: str, max_queue_length: int | None) -> dict[str, Any]:
    """Alerts scoped to this LLMDeployment's pods (by the Service's job label)."""
    sel = f'namespace="{namespace}",service="{name}"'
    rules: list[dict[str, Any]] = [
        {
            "alert": "FleetserveKVCacheNearlyFull",
            "expr": f"avg(fleetserve_kv_cache_usage_ratio{{{sel}}}) > 0.95",
            "for": "10m",
            "labels": {"severity": "warning"},
            "annotations": {
                "summary": f"KV cache of {namespace}/{name} above 95% for 10 minutes",
                "description": "Requests are being preempted; raise replicas or autoscaling.maxReplicas.",
            },
        },
        {
            "alert": "FleetserveReplicasUnavailable",
            "expr": f'count(up{{{sel}}} == 1) < count(up{{{sel}}})',
            "for": "15m",
            "labels": {"severity": "warning"},
            "annotations": {"summary": f"some pods of {namespace}/{name} are not scraped as up for 15 minutes"},
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
                + "; add replicas.",
            },
        },
    ]
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {"name": name, "namespace": namespace, "labels": child_labels(name)},
        "spec": {"groups": [{"name": f"fleetserve.{namespace}.{name}", "rules": rules}]},
    }
