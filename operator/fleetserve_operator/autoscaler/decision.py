"""``plan_replicas``: the fleet size for one observation — a pure function.

The steps, in order (each one is what a user can read in the reason):

1. Hold when there is nothing trustworthy to decide on: no ready pod, or
   fewer than half of the ready pods answered /metrics. Guessing from a
   minority would scale on noise; holding is what a human would do.
2. Two proposals, each an absolute replica count:
   queue ``ceil(total queue / targetQueueLength)`` and
   KV ``ceil(ready × mean KV usage / targetKVCacheUsage)``.
   A signal within 10 % of its target proposes the current size (no change —
   not the ready count, which would remove pods that are still starting); one
   above the band never proposes fewer than the current size.
   The recommendation is the larger one, never below 1: with no pod there
   are no metrics to scale back up from.
3. Stabilize against the history (HPA's algorithm, see ``history``).
4. Grow at most to ``max(2 × current, current + 4)`` per step; shrink by at
   most ``scaleDownPolicy.percent`` % of the size at the start of the last
   ``scaleDownPolicy.periodSeconds`` (default 50 % per 60 s, as the HPA).
5. Clamp to ``[minReplicas, maxReplicas]``.
6. While pods are unschedulable, do not grow: they already are capacity the
   cluster was asked for (a cluster autoscaler may be adding a node); adding
   more would only pile up Pending pods. Shrinking is still allowed — except
7. while pods wait for a node inside ``scheduling.maxNodeProvisionSeconds``,
   or were bound to one and are not Ready yet inside that time (loading the
   model): then the size does not shrink either. The scrape only sees the ready pods;
   removing a pod a node is being booted for, because one scrape looked
   lighter, is exactly the flapping that wastes a GPU node's boot.

Properties (tests/unit/test_autoscaler_decision.py checks them with
hypothesis): ``desired`` is always within the bounds; ``desired`` is monotone
non-decreasing in the load; a load that stays within the tolerance never
changes the size; after a scale-up no scale-down happens within the
scale-down window.
"""

from __future__ import annotations

import math

from fleetserve_operator.autoscaler.history import History, scale_down_floor, stabilize
from fleetserve_operator.autoscaler.types import (
    TOLERANCE,
    AutoscalingPolicy,
    Decision,
    FleetObservation,
    Limit,
    Signal,
)

# Absorbs float error so that e.g. 24 / 8 is 3, not 3.0000000001 → 4.
_EPS = 1e-9


def plan_replicas(observation: FleetObservation, policy: AutoscalingPolicy,
                  history: History, now: float) -> Decision:
    """Decide the fleet size. Pure: same inputs, same Decision; nothing is mutated.

    The caller records ``decision.recommendation`` (when not None) into the
    history it passes next time: ``history.record(now, rec, policy.longest_window_s)``.
    """
    current = observation.current_replicas
    ready = observation.ready
    held = observation.held
    if policy.min_replicas == 0 and current == 0 and ready == 0:
        return _from_zero(observation, policy)
    if ready == 0:
        return _hold(observation, policy, Limit.NO_READY_PODS,
                     f"no ready pod to read metrics from ({_pods_not_ready(observation)})")
    if 2 * observation.answered < ready:
        errors = ", ".join(f"{reason.value} {n}" for reason, n in sorted(observation.scrape_errors.items()))
        return _hold(observation, policy, Limit.METRICS_UNAVAILABLE,
                     f"only {observation.answered} of {ready} ready pods answered /metrics"
                     + (f" ({errors})" if errors else ""))

    queue = observation.queue_length
    kv = observation.kv_cache_usage
    assert queue is not None and kv is not None  # answered > 0 here
    queue += held or 0  # requests the router holds are load too
    queue_ratio = queue / ready / policy.target_queue_length
    kv_ratio = kv / policy.target_kv_cache_usage
    by_queue = _proposal(ready, current, queue_ratio)
    by_kv = _proposal(ready, current, kv_ratio)
    # Scale to zero only behind a router that answered (it holds what arrives meanwhile), and only
    # with no traffic at all: KV blocks of idle cached prefixes are no load.
    idle = policy.min_replicas == 0 and held == 0 and not observation.traffic and queue == 0
    recommendation = 0 if idle else max(by_queue, by_kv, 1)

    ready_text = f"{ready} ready" + (f" (+{observation.starting} starting)" if observation.starting else "")
    queue_text = f"queue {_num(queue)} {_cmp(queue_ratio)} {_num(policy.target_queue_length)} × {ready_text}"
    if idle:
        queue_text = f"no request running, waiting or held, none routed since the last scrape; {queue_text}"
    kv_text = f"KV cache {kv:.0%} {_cmp(kv_ratio)} {policy.target_kv_cache_usage:.0%} target on {ready_text}"
    if recommendation > current:
        signal = Signal.QUEUE if by_queue >= by_kv else Signal.KV_CACHE
        why = queue_text if signal is Signal.QUEUE else kv_text
    else:
        signal = Signal.NONE if recommendation == current else (
            Signal.QUEUE if by_queue >= by_kv else Signal.KV_CACHE)
        why = f"{queue_text}, {kv_text}"

    desired = recommendation
    limit = Limit.NONE
    notes: list[str] = []

    stabilized = stabilize(current, recommendation, history, now,
                           policy.scale_up_stabilization_s, policy.scale_down_stabilization_s)
    if stabilized != desired:
        if stabilized > desired:
            limit = Limit.SCALE_DOWN_STABILIZATION
            notes.append(f"holding {stabilized}, the highest recommendation in the "
                         f"{_num(policy.scale_down_stabilization_s)} s scale-down window")
        else:
            limit = Limit.SCALE_UP_STABILIZATION
            notes.append(f"holding {stabilized}, the lowest recommendation in the "
                         f"{_num(policy.scale_up_stabilization_s)} s scale-up window")
        desired = stabilized

    step_cap = max(2 * current, current + 4)
    if desired > step_cap:
        limit = Limit.SCALE_UP_RATE
        notes.append(f"limited to {step_cap} (at most double or +4 per step)")
        desired = step_cap

    floor = scale_down_floor(current, history, now, policy.scale_down_percent, policy.scale_down_period_s)
    if desired < floor:
        limit = Limit.SCALE_DOWN_RATE
        notes.append(f"limited to {floor} (at most {policy.scale_down_percent}% of the fleet per "
                     f"{_num(policy.scale_down_period_s)} s)")
        desired = floor

    if desired == 0 < current and history.known_for(now) < policy.scale_down_stabilization_s:
        # The window holds the highest recommendation it *saw*; a fleet whose history is younger
        # than the window (a replica that just turned Ready, an operator restart) was not seen idle
        # for all of it, so the last replica stays until it has been.
        limit = Limit.SCALE_DOWN_STABILIZATION
        notes.append(f"holding 1 until idle for the whole {_num(policy.scale_down_stabilization_s)} s "
                     f"scale-down window ({_num(history.known_for(now))} s so far)")
        desired = 1

    if desired > policy.max_replicas:
        limit = Limit.MAX_REPLICAS
        notes.append(f"capped at maxReplicas {policy.max_replicas}")
        desired = policy.max_replicas
    elif desired < policy.min_replicas:
        limit = Limit.MIN_REPLICAS
        notes.append(f"raised to minReplicas {policy.min_replicas}")
        desired = policy.min_replicas

    if observation.unschedulable and desired > current:
        held = _clamp(current, policy)
        if held < desired:
            limit = Limit.UNSCHEDULABLE
            notes.append(f"{observation.unschedulable} pod{'s' if observation.unschedulable != 1 else ''} "
                         f"unschedulable, not adding more until the cluster places them")
            desired = held

    if observation.waiting_for_nodes and desired < current:
        held = _clamp(current, policy)
        if held > desired:
            limit = Limit.WAITING_FOR_NODES
            n = observation.waiting_for_nodes
            notes.append(f"{n} pod{'s' if n != 1 else ''} waiting for a node or still loading, "
                         f"not removing capacity being provisioned")
            desired = held

    if notes:
        reason = f"{why} wants {recommendation}; {'; '.join(notes)} → {desired}"
    else:
        reason = f"{why} → {desired}"
    return Decision(current=current, desired=desired, reason=reason, signal=signal,
                    limit=limit, recommendation=recommendation)


def _from_zero(observation: FleetObservation, policy: AutoscalingPolicy) -> Decision:
    """No replica (scaled to zero behind the router): come back as soon as the router holds a request,
    with enough replicas for what it holds (queue target per replica, at most +4 at once)."""
    held = observation.held
    if held is None:
        return Decision(current=0, desired=0, signal=Signal.NONE, limit=Limit.ROUTER_METRICS_UNAVAILABLE,
                        recommendation=None,
                        reason="no replica runs and no router pod answered /metrics (held requests unknown): "
                               "holding 0")
    if held == 0:
        return Decision(current=0, desired=0, signal=Signal.NONE, limit=Limit.SCALED_TO_ZERO, recommendation=0,
                        reason="scaled to zero: the router holds no request → 0")
    wanted = max(1, math.ceil(held / policy.target_queue_length - _EPS))
    desired = min(wanted, 4, policy.max_replicas)
    capped = "" if desired == wanted else f" (capped at {desired}: at most 4 from zero, maxReplicas {policy.max_replicas})"
    return Decision(current=0, desired=desired, signal=Signal.QUEUE, limit=Limit.SCALE_FROM_ZERO,
                    recommendation=desired,
                    reason=f"the router holds {held} request{'s' if held != 1 else ''} and no replica runs: "
                           f"{held} / {_num(policy.target_queue_length)} per replica → {desired}{capped}")


def _proposal(ready: int, current: int, ratio: float) -> int:
    """Replicas one signal asks for: the current size within tolerance, never fewer than the
    current size when the signal is above the band (pods still starting are capacity on its way)."""
    if abs(ratio - 1.0) <= TOLERANCE + _EPS:
        return current
    wanted = max(0, math.ceil(ready * ratio - _EPS))
    return max(wanted, current) if ratio > 1.0 else min(wanted, current)


def _hold(observation: FleetObservation, policy: AutoscalingPolicy, limit: Limit, why: str) -> Decision:
    current = observation.current_replicas
    desired = _clamp(current, policy)
    bound = "" if desired == current else f" (bounds [{policy.min_replicas}, {policy.max_replicas}])"
    return Decision(current=current, desired=desired, reason=f"{why}: holding {desired}{bound}",
                    signal=Signal.NONE, limit=limit, recommendation=None)


def _clamp(replicas: int, policy: AutoscalingPolicy) -> int:
    return min(max(replicas, policy.min_replicas), policy.max_replicas)


def _cmp(ratio: float) -> str:
    if ratio > 1.0 + TOLERANCE + _EPS:
        return ">"
    if ratio < 1.0 - TOLERANCE - _EPS:
        return "<"
    return "≈"


def _num(x: float) -> str:
    return f"{round(x, 1):g}"


def _pods_not_ready(observation: FleetObservation) -> str:
    parts = [f"{observation.starting} starting"]
    if observation.unschedulable:
        parts.append(f"{observation.unschedulable} unschedulable")
    return ", ".join(parts)
