"""plan_replicas: examples a user would recognise, then its properties with hypothesis."""

from __future__ import annotations

import pytest
from fleetserve_operator.autoscaler import (
    AutoscalingPolicy,
    FleetObservation,
    History,
    PodMetrics,
    plan_replicas,
)
from fleetserve_operator.autoscaler.types import Limit, ScrapeError, Signal
from hypothesis import given, settings
from hypothesis import strategies as st

POLICY = AutoscalingPolicy(min_replicas=1, max_replicas=10, target_queue_length=8,
                           target_kv_cache_usage=0.8, scale_up_stabilization_s=0,
                           scale_down_stabilization_s=300)


def fleet(queues: list[float], kvs: list[float] | None = None, *, current: int | None = None,
          starting: int = 0, unschedulable: int = 0, ready: int | None = None,
          errors: dict[ScrapeError, int] | None = None) -> FleetObservation:
    kvs = kvs if kvs is not None else [0.1] * len(queues)
    metrics = tuple(PodMetrics(pod=f"p{i}", queue_length=q, kv_cache_usage=kv)
                    for i, (q, kv) in enumerate(zip(queues, kvs, strict=True)))
    n_ready = len(queues) if ready is None else ready
    return FleetObservation(current_replicas=n_ready + starting + unschedulable if current is None else current,
                            ready=n_ready, starting=starting, unschedulable=unschedulable,
                            metrics=metrics, scrape_errors=errors or {})


def test_queue_over_target_scales_up_and_says_why() -> None:
    decision = plan_replicas(fleet([12, 11, 11]), POLICY, History(), now=0)
    assert decision.desired == 5
    assert decision.reason == "queue 34 > 8 × 3 ready → 5"
    assert decision.signal is Signal.QUEUE
    assert decision.direction == "up"


def test_kv_over_target_with_short_queue_scales_up_on_kv() -> None:
    decision = plan_replicas(fleet([1, 2], [0.95, 0.97]), POLICY, History(), now=0)
    assert decision.desired == 3  # ceil(2 × 0.96 / 0.8) = ceil(2.4)
    assert decision.signal is Signal.KV_CACHE
    assert decision.reason.startswith("KV cache 96% > 80% target on 2 ready")


def test_larger_of_both_proposals_wins() -> None:
    # queue wants ceil(40 / 8) = 5, KV wants ceil(2 × 0.9 / 0.5) = 4
    policy = AutoscalingPolicy(min_replicas=1, max_replicas=10, target_queue_length=8, target_kv_cache_usage=0.5)
    decision = plan_replicas(fleet([20, 20], [0.9, 0.9]), policy, History(), now=0)
    assert (decision.desired, decision.signal) == (5, Signal.QUEUE)


def test_within_tolerance_keeps_the_size() -> None:
    # 3 pods at 8.7 each: 8.7 / 8 = 1.09, inside the 10 % band (ceil would say 4)
    decision = plan_replicas(fleet([8.7, 8.7, 8.7]), POLICY, History(), now=0)
    assert decision.desired == 3
    assert decision.direction == "none"


def test_scale_down_waits_for_the_window_then_happens() -> None:
    history = History().record(0, 4, POLICY.longest_window_s)
    early = plan_replicas(fleet([1, 0, 0, 0]), POLICY, history, now=100)
    assert early.desired == 4
    assert early.limit is Limit.SCALE_DOWN_STABILIZATION
    assert "scale-down window" in early.reason and "wants 1" in early.reason
    history = history.record(100, 1, POLICY.longest_window_s)
    late = plan_replicas(fleet([1, 0, 0, 0]), POLICY, history, now=301)
    assert late.desired == 2  # the window is over; the default policy removes at most half per minute
    assert late.direction == "down" and late.limit is Limit.SCALE_DOWN_RATE
    assert "at most 50% of the fleet per 60 s" in late.reason


def test_within_tolerance_keeps_pods_that_are_still_starting() -> None:
    # 2 ready at 8.5 each (within 10 % of 8), 3 more starting: the size stays 5, not the 2 ready
    decision = plan_replicas(fleet([8.5, 8.5], starting=3), POLICY, History(), now=0)
    assert (decision.current, decision.desired, decision.direction) == (5, 5, "none")
    no_window = AutoscalingPolicy(min_replicas=1, max_replicas=10, target_queue_length=8,
                                  target_kv_cache_usage=0.8, scale_down_stabilization_s=0)
    assert plan_replicas(fleet([8.5, 8.5], starting=3), no_window, History(), now=0).desired == 5


def test_scale_down_rate_policy_counts_what_the_period_already_removed() -> None:
    policy = AutoscalingPolicy(min_replicas=1, max_replicas=20, target_queue_length=8, target_kv_cache_usage=0.8,
                               scale_down_stabilization_s=0, scale_down_percent=50, scale_down_period_s=60)
    idle = fleet([0.0] * 8)
    first = plan_replicas(idle, policy, History(), now=0)
    assert (first.desired, first.limit) == (4, Limit.SCALE_DOWN_RATE)  # 8 -> 4, half of 8
    history = History().scaled(0, 8, 4, keep_s=60)
    assert plan_replicas(fleet([0.0] * 4), policy, history, now=30).desired == 4  # 4 of the 8 went already
    assert plan_replicas(fleet([0.0] * 4), policy, history, now=61).desired == 2  # a new period
    gentle = AutoscalingPolicy(min_replicas=1, max_replicas=20, target_queue_length=8, target_kv_cache_usage=0.8,
                               scale_down_stabilization_s=0, scale_down_percent=10, scale_down_period_s=300)
    assert plan_replicas(idle, gentle, History(), now=0).desired == 7  # 10 % of 8 rounds down, but one may go
    assert plan_replicas(fleet([0.0] * 20), gentle, History(), now=0).desired == 18
    whole = AutoscalingPolicy(min_replicas=1, max_replicas=20, target_queue_length=8, target_kv_cache_usage=0.8,
                              scale_down_stabilization_s=0, scale_down_percent=100, scale_down_period_s=60)
    assert plan_replicas(idle, whole, History(), now=0).desired == 1


def test_growth_is_at_most_double_or_plus_four_per_step() -> None:
    decision = plan_replicas(fleet([200]), POLICY, History(), now=0)
    assert decision.desired == 5  # 1 → max(2, 1 + 4)
    assert decision.limit is Limit.SCALE_UP_RATE
    decision = plan_replicas(fleet([50] * 6), POLICY, History(), now=0)
    assert decision.desired == 10  # wants 38, 6 → min(max(12, 10), maxReplicas 10)
    assert decision.limit is Limit.MAX_REPLICAS
    assert "capped at maxReplicas 10" in decision.reason


def test_bounds_apply_even_without_load() -> None:
    policy = AutoscalingPolicy(min_replicas=2, max_replicas=4, target_queue_length=8, target_kv_cache_usage=0.8)
    assert plan_replicas(fleet([0]), policy, History(), now=0).desired == 2
    over = plan_replicas(fleet([8] * 6), policy, History(), now=0)  # on target, but 6 > maxReplicas
    assert (over.desired, over.limit) == (4, Limit.MAX_REPLICAS)


def test_starting_pods_count_as_requested_capacity() -> None:
    # 1 ready pod with queue 12 wants 2; 1 more is already starting: nothing to add.
    decision = plan_replicas(fleet([12], starting=1), POLICY, History(), now=0)
    assert decision.desired == 2
    assert decision.direction == "none"
    assert "(+1 starting)" in decision.reason


def test_unschedulable_pods_stop_growth_but_never_shrink_what_serves() -> None:
    decision = plan_replicas(fleet([40, 40], unschedulable=1), POLICY, History(), now=0)
    assert decision.current == 3
    assert decision.desired == 3  # wants 10, but one pod is not placed yet
    assert decision.limit is Limit.UNSCHEDULABLE
    assert "1 pod unschedulable" in decision.reason


def test_fewer_than_half_answering_holds() -> None:
    obs = fleet([30], ready=3, errors={ScrapeError.TIMEOUT: 2})
    decision = plan_replicas(obs, POLICY, History(), now=0)
    assert decision.desired == 3
    assert decision.limit is Limit.METRICS_UNAVAILABLE
    assert decision.recommendation is None
    assert decision.reason == "only 1 of 3 ready pods answered /metrics (timeout 2): holding 3"


def test_half_answering_extrapolates_the_queue() -> None:
    # 1 of 2 answered with 20 waiting: the fleet's queue is estimated at 40 → 5
    decision = plan_replicas(fleet([20], ready=2, errors={ScrapeError.CONNECTION: 1}), POLICY, History(), now=0)
    assert decision.desired == 5


def test_no_ready_pods_holds_within_bounds() -> None:
    obs = FleetObservation(current_replicas=0, ready=0, starting=0)
    decision = plan_replicas(obs, POLICY, History(), now=0)
    assert decision.desired == 1
    assert decision.limit is Limit.NO_READY_PODS


@pytest.mark.parametrize("kwargs, field", [
    ({"min_replicas": 3, "max_replicas": 1}, "maxReplicas"),
    ({"target_kv_cache_usage": 1.5}, "targetKVCacheUsage"),
    ({"target_queue_length": 0}, "targetQueueLength"),
])
def test_invalid_policy_names_the_field(kwargs: dict[str, float], field: str) -> None:
    base: dict[str, float] = {"min_replicas": 1, "max_replicas": 3, "target_queue_length": 8,
                              "target_kv_cache_usage": 0.8}
    with pytest.raises(ValueError, match=field):
        AutoscalingPolicy(**{**base, **kwargs})  # type: ignore[arg-type]


# ---------------------------------------------------------------- properties

policies = st.builds(
    lambda lo, span, tq, tkv, up, down: AutoscalingPolicy(
        min_replicas=lo, max_replicas=lo + span, target_queue_length=tq, target_kv_cache_usage=tkv,
        scale_up_stabilization_s=up, scale_down_stabilization_s=down),
    st.integers(0, 5), st.integers(0, 12), st.integers(1, 32), st.floats(0.05, 1.0),
    st.sampled_from([0, 30]), st.sampled_from([0, 60, 300]))


@st.composite
def observations(draw: st.DrawFn) -> FleetObservation:
    ready = draw(st.integers(0, 12))
    answered = draw(st.integers(0, ready))
    metrics = tuple(PodMetrics(f"p{i}", draw(st.floats(0, 500)), draw(st.floats(0, 1))) for i in range(answered))
    starting = draw(st.integers(0, 4))
    unschedulable = draw(st.integers(0, 3))
    return FleetObservation(current_replicas=ready + starting + unschedulable, ready=ready, starting=starting,
                            unschedulable=unschedulable, metrics=metrics,
                            scrape_errors={ScrapeError.TIMEOUT: ready - answered} if ready > answered else {})


histories = st.lists(st.tuples(st.floats(0, 400), st.integers(0, 30)), max_size=8).map(
    lambda xs: History(entries=tuple(History.seeded(t, r).entries[0] for t, r in sorted(xs))))


@given(observations(), policies, histories)
def test_property_desired_is_always_within_bounds(obs: FleetObservation, policy: AutoscalingPolicy,
                                                  history: History) -> None:
    decision = plan_replicas(obs, policy, history, now=400)
    assert policy.min_replicas <= decision.desired <= policy.max_replicas


@given(policies, histories, st.integers(1, 8), st.integers(0, 3), st.integers(0, 2),
       st.floats(0, 300), st.floats(0, 300), st.floats(0, 1), st.floats(0, 1))
def test_property_monotone_in_load(policy: AutoscalingPolicy, history: History, ready: int, starting: int,
                                   unschedulable: int, q1: float, q2: float, kv1: float, kv2: float) -> None:
    def at(queue: float, kv: float) -> int:
        metrics = tuple(PodMetrics(f"p{i}", queue / ready, kv) for i in range(ready))
        obs = FleetObservation(current_replicas=ready + starting + unschedulable, ready=ready, starting=starting,
                               unschedulable=unschedulable, metrics=metrics)
        return plan_replicas(obs, policy, history, now=400).desired

    low_q, high_q = sorted((q1, q2))
    low_kv, high_kv = sorted((kv1, kv2))
    assert at(low_q, low_kv) <= at(high_q, low_kv) <= at(high_q, high_kv)
    assert at(low_q, low_kv) <= at(low_q, high_kv) <= at(high_q, high_kv)


@given(policies, st.integers(1, 10),
       st.lists(st.tuples(st.floats(0.9, 1.1), st.floats(0.0, 1.1)), min_size=1, max_size=40))
def test_property_oscillation_inside_tolerance_never_changes_size(
        policy: AutoscalingPolicy, size: int, loads: list[tuple[float, float]]) -> None:
    size = min(max(size, policy.min_replicas, 1), policy.max_replicas) or 1
    if not policy.min_replicas <= size <= policy.max_replicas:
        return  # max_replicas == 0: no fleet to oscillate
    history = History()
    for tick, (queue_ratio, kv_ratio) in enumerate(loads):
        now = tick * 10.0
        per_pod_queue = queue_ratio * policy.target_queue_length
        kv = min(kv_ratio * policy.target_kv_cache_usage, 1.0)
        obs = FleetObservation(current_replicas=size, ready=size,
                               metrics=tuple(PodMetrics(f"p{i}", per_pod_queue, kv) for i in range(size)))
        decision = plan_replicas(obs, policy, history, now)
        assert decision.desired == size, decision.reason
        assert decision.recommendation is not None
        history = history.record(now, decision.recommendation, policy.longest_window_s)


@settings(max_examples=200)
@given(policies, st.integers(1, 6),
       st.lists(st.tuples(st.floats(0, 300), st.floats(0, 1), st.booleans()), min_size=2, max_size=60))
def test_property_no_scale_down_within_window_after_scale_up(
        policy: AutoscalingPolicy, start: int, ticks: list[tuple[float, float, bool]]) -> None:
    """Drive a simulated fleet (every decision applied, pods Ready at once, some scrapes failing)
    and check that no tick within the scale-down window after a scale-up shrinks below it."""
    size = min(max(start, policy.min_replicas), policy.max_replicas)
    history = History()
    last_up: tuple[float, int] | None = None
    for tick, (queue, kv, scrape_fails) in enumerate(ticks):
        now = tick * 7.0
        answered = 0 if scrape_fails else size
        obs = FleetObservation(current_replicas=size, ready=size,
                               metrics=tuple(PodMetrics(f"p{i}", queue / max(size, 1), kv) for i in range(answered)),
                               scrape_errors={ScrapeError.TIMEOUT: size} if scrape_fails and size else {})
        decision = plan_replicas(obs, policy, history, now)
        if last_up is not None and now - last_up[0] < policy.scale_down_stabilization_s:
            assert decision.desired >= last_up[1], (decision.reason, last_up)
        if decision.recommendation is not None:
            history = history.record(now, decision.recommendation, policy.longest_window_s)
        if decision.desired > size:
            last_up = (now, decision.desired)
        size = decision.desired
