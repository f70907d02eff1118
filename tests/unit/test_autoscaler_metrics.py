"""The autoscaler's per-fleet series on the operator's /metrics (the registry's own text exposition)."""

from __future__ import annotations

from fleetserve_operator import metrics
from fleetserve_operator.autoscaler import (
    AutoscalingPolicy,
    FleetObservation,
    History,
    PodMetrics,
    plan_replicas,
)
from fleetserve_operator.autoscaler.controller import export_metrics, forget_metrics
from prometheus_client.parser import text_string_to_metric_families

POLICY = AutoscalingPolicy(min_replicas=1, max_replicas=1, target_queue_length=8, target_kv_cache_usage=0.8,
                           scale_down_stabilization_s=60)


def _samples(name: str, namespace: str) -> dict[tuple[str, ...], float]:
    return {tuple(sorted(s.labels.items())): s.value
            for f in text_string_to_metric_families(metrics.render().decode())
            for s in f.samples if s.name == name and s.labels.get("namespace") == namespace}


def test_scale_events_are_exported_at_zero_before_the_first_scaling() -> None:
    # A fleet pinned at one replica never scales: the dashboard's "Scale events" panel
    # (increase(fleetserve_operator_scale_events_total[...])) still needs its series.
    observation = FleetObservation(current_replicas=1, ready=1, metrics=(PodMetrics("p0", 0, 0.1),))
    decision = plan_replicas(observation, POLICY, History(), now=0)
    assert decision.desired == 1 and decision.direction != "up"
    export_metrics("zero-ns", "tiny", observation, decision)
    events = _samples("fleetserve_operator_scale_events_total", "zero-ns")
    assert events == {(("direction", d), ("name", "tiny"), ("namespace", "zero-ns")): 0.0 for d in ("up", "down")}
    assert _samples("fleetserve_operator_scrape_errors_total", "zero-ns")  # every reason at 0 too

    forget_metrics("zero-ns", "tiny")
    assert not _samples("fleetserve_operator_scale_events_total", "zero-ns")
