"""The autoscaler's status patch, pod census and restart seeding — pure functions, no cluster."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from fleetserve_operator.api.spec import LLMDeploymentSpec
from fleetserve_operator.api.status import LLMDeploymentStatus
from fleetserve_operator.autoscaler import (
    AutoscalingPolicy,
    FleetObservation,
    History,
    PodMetrics,
    plan_replicas,
)
from fleetserve_operator.autoscaler.controller import policy_from_spec, scrape_timeout, seed_history
from fleetserve_operator.autoscaler.pods import take_census
from fleetserve_operator.autoscaler.status import condition_event, decision_status, inactive_status
from fleetserve_operator.autoscaler.types import ScrapeError

NOW = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
POLICY = AutoscalingPolicy(min_replicas=1, max_replicas=5, target_queue_length=8, target_kv_cache_usage=0.8,
                           scale_down_stabilization_s=60)


def obs(queues: list[float], kv: float = 0.2, current: int | None = None, ready: int | None = None,
        errors: dict[ScrapeError, int] | None = None) -> FleetObservation:
    n = len(queues) if ready is None else ready
    return FleetObservation(current_replicas=n if current is None else current, ready=n,
                            metrics=tuple(PodMetrics(f"p{i}", q, kv) for i, q in enumerate(queues)),
                            scrape_errors=errors or {})


def test_scale_up_writes_desired_decision_observed_and_condition() -> None:
    observation = obs([12, 11, 11])
    decision = plan_replicas(observation, POLICY, History(), now=0)
    patch = decision_status({}, observation, decision, generation=3, now=NOW)
    assert patch is not None
    assert patch["desiredReplicas"] == 5
    auto = patch["autoscaler"]
    assert auto["lastScaleTime"] == "2026-01-02T03:04:05Z"
    assert auto["lastDecision"] == {"from": 3, "to": 5, "reason": "queue 34 > 8 × 3 ready → 5"}
    assert auto["observed"] == {"pods": 3, "queueLength": 11.333, "kvCacheUsage": 0.2, "kvCacheUsagePercent": 20}
    [condition] = patch["conditions"]
    assert (condition["type"], condition["status"], condition["reason"]) == ("ScalingActive", "True", "ValidMetrics")
    assert condition["observedGeneration"] == 3
    # The CRD's status model accepts what we write (the API server would prune anything else).
    LLMDeploymentStatus.model_validate(patch)


def test_nothing_changed_writes_nothing_and_steady_state_keeps_last_decision() -> None:
    observation = obs([8, 8, 8])
    decision = plan_replicas(observation, POLICY, History(), now=0)
    first = decision_status({"autoscaler": {"lastScaleTime": "2026-01-01T00:00:00Z",
                                            "lastDecision": {"from": 1, "to": 3, "reason": "queue 30 > 8 × 1 ready → 3"}}},
                            observation, decision, generation=1, now=NOW)
    assert first is not None and "desiredReplicas" in first
    assert first["autoscaler"]["lastDecision"]["to"] == 3  # unchanged: no size change this time
    applied = {"desiredReplicas": first["desiredReplicas"], "autoscaler": first["autoscaler"],
               "conditions": first["conditions"]}
    later = NOW + timedelta(seconds=30)
    assert decision_status(applied, observation, decision, generation=1, now=later) is None


def test_missing_metrics_turn_scaling_inactive_drop_stale_numbers_and_warn() -> None:
    good = obs([8, 8, 8])
    before = decision_status({}, good, plan_replicas(good, POLICY, History(), 0), 1, NOW)
    assert before is not None
    bad = obs([8], ready=3, errors={ScrapeError.TIMEOUT: 2})
    decision = plan_replicas(bad, POLICY, History(), 10)
    patch = decision_status(before, bad, decision, 1, NOW, "1 of 3 ready pods answered /metrics (timeout 2)")
    assert patch is not None
    [condition] = patch["conditions"]
    assert (condition["status"], condition["reason"]) == ("False", "MetricsUnavailable")
    assert "only 1 of 3 ready pods answered" in condition["message"] and "(timeout 2)" in condition["message"]
    assert "desiredReplicas" not in patch  # held at 3
    event = condition_event(before, patch)
    assert event is not None and event[:2] == ("Warning", "MetricsUnavailable")


def test_inactive_is_written_once() -> None:
    patch = inactive_status({}, "AutoscalingDisabled", "autoscaling.enabled is false", 2, NOW)
    assert patch is not None
    [condition] = patch["conditions"]
    assert (condition["status"], condition["reason"]) == ("False", "AutoscalingDisabled")
    assert inactive_status(patch, "AutoscalingDisabled", "autoscaling.enabled is false", 2, NOW) is None


def pod(name: str, *, ready: bool = False, ip: str | None = "10.0.0.1", scheduled: bool = True,
        deleting: bool = False, phase: str = "Running", port: int = 8000) -> dict[str, Any]:
    conditions = [{"type": "Ready", "status": "True" if ready else "False"}]
    if not scheduled:
        conditions = [{"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                       "lastTransitionTime": "2026-01-02T03:00:00Z",
                       "message": "0/1 nodes are available: 1 Insufficient nvidia.com/gpu."}]
    meta: dict[str, Any] = {"name": name}
    if deleting:
        meta["deletionTimestamp"] = "2026-01-02T03:00:00Z"
    return {"metadata": meta,
            "spec": {"containers": [{"name": "server", "ports": [{"name": "http", "containerPort": port}]}]},
            "status": {"phase": phase if scheduled else "Pending", "podIP": ip, "conditions": conditions}}


def test_census_counts_what_the_autoscaler_needs() -> None:
    census = take_census([
        pod("a", ready=True, ip="127.0.0.5", port=8001),
        pod("b", ready=True, ip=None),          # Ready without IP cannot be scraped: starting
        pod("c"),                               # loading the model
        pod("d", scheduled=False),              # waits for a GPU
        pod("e", ready=True, deleting=True),    # draining
        pod("f", phase="Succeeded"),
    ])
    assert [(t.pod, t.url) for t in census.ready] == [("a", "http://127.0.0.5:8001/metrics")]
    assert (census.starting, census.unschedulable, census.terminating) == (2, 1, 1)
    assert census.unschedulable_since == "2026-01-02T03:00:00Z"


def test_restart_seeds_the_last_scale_up_so_the_window_still_holds() -> None:
    status = {"autoscaler": {"lastScaleTime": "2026-01-02T03:03:35Z",
                             "lastDecision": {"from": 1, "to": 4, "reason": "x"}}}
    history = seed_history(status, POLICY, mono_now=1000.0, wall_now=NOW)
    assert history.window(1000.0, 60) == [4]
    idle = obs([0, 0, 0, 0])
    assert plan_replicas(idle, POLICY, history, now=1000.0).desired == 4  # 30 s after the scale-up
    assert plan_replicas(idle, POLICY, history, now=1031.0).desired == 2  # window over; half per minute
    assert seed_history(status, POLICY, 1000.0, NOW + timedelta(minutes=5)) == History()


def test_policy_comes_from_the_crs_pydantic_spec() -> None:
    spec = LLMDeploymentSpec.model_validate({
        "model": {"source": "builtin:smollm2-135m-instruct"},
        "resources": {"gpus": 0, "memory": "2Gi"},
        "autoscaling": {"enabled": True, "minReplicas": 1, "maxReplicas": 3, "targetQueueLength": 2,
                        "targetKVCacheUsage": 0.5, "scaleDownStabilizationSeconds": 20, "scrapeIntervalSeconds": 2},
    })
    policy = policy_from_spec(spec.autoscaling)
    assert policy == AutoscalingPolicy(min_replicas=1, max_replicas=3, target_queue_length=2,
                                       target_kv_cache_usage=0.5, scale_up_stabilization_s=0,
                                       scale_down_stabilization_s=20, scrape_interval_s=2)
    assert scrape_timeout(policy) == 2.0
