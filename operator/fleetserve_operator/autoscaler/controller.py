"""One autoscaler tick for one LLMDeployment: observe, scrape, decide, act, explain.

:class:`fleetserve_operator.fleets.Fleets` runs a tick per LLMDeployment every
``autoscaling.scrapeIntervalSeconds`` (the spec re-read each time). A tick:

1. reads the CR (through the pydantic spec); while autoscaling is off it only
   says so in ``ScalingActive`` (from the cached body: no API call once said);
2. runs the memory proof: a spec that cannot fit is never scaled above 0
   (``desiredReplicas: 0``, ``ScalingActive=False/MemoryDoesNotFit``);
3. reads the Deployment and the pods and scrapes every ready pod's /metrics
   concurrently (``scraper``);
4. decides with the pure ``plan_replicas`` against the recommendation and
   scale-event history, from the size in effect (what the reconcile applies:
   ``status.desiredReplicas`` within the bounds — never the Deployment's own
   ``spec.replicas``, which someone may have changed by hand);
5. writes ``status.desiredReplicas``, ``status.autoscaler`` and the
   ``ScalingActive`` condition (only what changed, under the CR's lock and the
   object's resourceVersion), keeps ``spec.replicas`` equal to the size in
   effect (so the scale subresource reports it, and turning autoscaling off
   keeps the fleet's size), then runs the operator's reconcile, which applies
   the Deployment's replicas — as the only writer of them, field manager
   ``fleetserve`` — and the PDB;
6. explains: an Event per size change, operator metrics every tick.

Replicas: with ``autoscaling.enabled`` the autoscaler decides them. A
``kubectl scale llmd/x`` (or an HPA writing the scale subresource) changes
``spec.replicas``; the autoscaler says so with a ``ReplicasOverridden``
Warning event and sets it back to its decision on the next tick, as the
Kubernetes HPA does with a Deployment's replicas.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from pydantic import ValidationError

from fleetserve_operator import metrics
from fleetserve_operator.api.spec import Autoscaling, LLMDeploymentSpec, spec_from_body
from fleetserve_operator.kube import Kube, KubeError, resource_path
from fleetserve_operator.reconcile.cache import CHILDREN, ChildCache
from fleetserve_operator.reconcile.fit import check_memory_fit
from fleetserve_operator.reconcile.locks import cr_lock
from fleetserve_operator.reconcile.plan import plan_replicas as plan_replicas_for_deployment
from fleetserve_operator.resources.labels import router_selector_labels, selector_labels

from .decision import plan_replicas
from .history import History
from .nodes import (
    DELETION_COST_ANNOTATION,
    DO_NOT_DISRUPT_ANNOTATION,
    NodeWait,
    cost_patches,
    deletion_costs,
    disruption_patches,
    node_wait,
    placements,
)
from .pods import PodCensus, take_census
from .scraper import RouterMetrics, ScrapeResult, scrape_pods, scrape_routers
from .status import (
    REASON_DISABLED,
    REASON_MEMORY,
    REASON_NO_DEPLOYMENT,
    condition_event,
    decision_status,
    inactive_status,
    scaling_event,
)
from .types import AutoscalingPolicy, Decision, FleetObservation, ScrapeError

log = logging.getLogger(__name__)

FIELD_MANAGER = "fleetserve-autoscaler"
# While autoscaling is off the loop only watches for it being switched on.
DISABLED_POLL_SECONDS = 10.0
RETRY_SECONDS = 5.0
MIN_SCRAPE_TIMEOUT_SECONDS = 2.0
MAX_SCRAPE_TIMEOUT_SECONDS = 5.0


@dataclass
class FleetState:
    """What the autoscaler remembers about one LLMDeployment between ticks.

    ``history`` is None until the first tick, which seeds it from the status
    (so an operator restart does not shorten a scale-down window).
    """

    history: History | None = None
    seen_spec_replicas: int | None = None
    clock: Callable[[], float] = field(default=time.monotonic)
    # Each router pod's fleetserve_router_requests_total at the previous tick (traffic detection).
    router_routed: dict[str, float] = field(default_factory=dict)
    # The LLMDeployment's resourceVersion as this loop last read or wrote it: a watched body with
    # it is current; any other (older: our write not delivered yet, or newer) is read again.
    version: str | None = None


@dataclass(frozen=True)
class TickResult:
    """What one tick did; ``next_tick_s`` is how long the loop sleeps."""

    next_tick_s: float
    decision: Decision | None = None
    observation: FleetObservation | None = None
    scaled: bool = False
    status_patch: dict[str, Any] | None = None


def policy_from_spec(autoscaling: Autoscaling) -> AutoscalingPolicy:
    """The CR's validated ``spec.autoscaling`` as the decision's value type."""
    return AutoscalingPolicy(
        min_replicas=autoscaling.min_replicas,
        max_replicas=autoscaling.max_replicas,
        target_queue_length=autoscaling.target_queue_length,
        target_kv_cache_usage=autoscaling.target_kv_cache_usage,
        scale_up_stabilization_s=float(autoscaling.scale_up_stabilization_seconds),
        scale_down_stabilization_s=float(autoscaling.scale_down_stabilization_seconds),
        scrape_interval_s=float(autoscaling.scrape_interval_seconds),
        scale_down_percent=autoscaling.scale_down_policy.percent,
        scale_down_period_s=float(autoscaling.scale_down_policy.period_seconds),
    )


def scrape_timeout(policy: AutoscalingPolicy) -> float:
    """One interval, between 2 and 5 s.

    Generous on purpose: an overloaded server answers /metrics slowly, and an
    autoscaler that gives up on slow pods would hold exactly when it must grow.
    """
    return max(MIN_SCRAPE_TIMEOUT_SECONDS, min(MAX_SCRAPE_TIMEOUT_SECONDS, policy.scrape_interval_s))


async def autoscale_tick(kube: Kube, namespace: str, name: str, state: FleetState, *,
                         reconcile: Callable[[], None] | None = None,
                         now: datetime | None = None, cached: dict[str, Any] | None = None,
                         children: ChildCache = CHILDREN) -> TickResult:
    """One observe → scrape → decide → act → explain round (see the module docstring).

    ``cached`` is the newest body the watch delivered: while autoscaling is off
    and ``ScalingActive`` already says so, the tick costs no API call. With
    autoscaling on, it is read instead of a GET when it is the version this loop
    last read or wrote, and the Deployment and the pods come from ``children``
    once synced (the watches' state): a settled fleet's tick sends no request.
    """
    started = state.clock()
    wall = now or datetime.now(UTC)
    if cached is not None and _idle(cached):
        state.history, state.seen_spec_replicas = None, None
        return TickResult(next_tick_s=DISABLED_POLL_SECONDS)
    known = cached is not None and state.version is not None and _version(cached) == state.version
    cr = cached if known else await asyncio.to_thread(kube.get, "LLMDeployment", namespace, name)
    if cr is None or (cr.get("metadata") or {}).get("deletionTimestamp"):
        return TickResult(next_tick_s=DISABLED_POLL_SECONDS)
    state.version = _version(cr)
    try:
        spec = spec_from_body(cr)
    except ValidationError:
        return TickResult(next_tick_s=DISABLED_POLL_SECONDS)  # the reconcile reports InvalidSpec

    if not spec.autoscaling.enabled:
        state.history, state.seen_spec_replicas = None, None
        forget_metrics(namespace, name)
        # spec.replicas sizes the fleet: desired_replicas keeps one meaning with autoscaling
        # on or off (the reconcile sets the same value; see reconcile.execute.export_metrics).
        metrics.AUTOSCALER_DESIRED_REPLICAS.labels(namespace, name).set(spec.replicas)
        patch = await asyncio.to_thread(_write_inactive, kube, cr, state, REASON_DISABLED,
                                        disabled_message(spec.replicas), wall)
        return TickResult(next_tick_s=DISABLED_POLL_SECONDS, status_patch=patch)

    policy = policy_from_spec(spec.autoscaling)
    fit = check_memory_fit(spec)
    if fit.status == "False":
        # No pod can run: nobody scales above 0, the autoscaler included.
        patch = await asyncio.to_thread(_write_inactive, kube, cr, state, REASON_MEMORY,
                                        f"the model does not fit, so the fleet stays at 0: {fit.message}", wall, 0)
        return TickResult(next_tick_s=policy.scrape_interval_s, status_patch=patch)
    await asyncio.to_thread(_warn_if_scaled_by_hand, kube, cr, spec.replicas, state)
    # A Deployment the cache lacks may be one the watch has not delivered yet: ask before saying so.
    deployment = children.get("Deployment", namespace, name) if children.synced else None
    if deployment is None:
        deployment = await asyncio.to_thread(kube.get, "Deployment", namespace, name)
    if deployment is None:
        message = (f"no Deployment {name} to scale yet; see the MemoryFits and Ready conditions")
        patch = await asyncio.to_thread(_write_inactive, kube, cr, state, REASON_NO_DEPLOYMENT, message, wall)
        return TickResult(next_tick_s=policy.scrape_interval_s, status_patch=patch)

    pods = await _pods(kube, children, namespace, selector_labels(name))
    census = take_census(pods)
    wait = node_wait(pods, spec.scheduling.max_node_provision_seconds, wall)
    scrape = await scrape_pods(census.ready, scrape_timeout(policy))
    current = size_in_effect(spec, cr.get("status") or {})
    observation = observe(current, census, scrape, wait)
    router_note = ""
    if spec.router.enabled:
        held, traffic, router_note = await _router_load(kube, namespace, name, state, scrape_timeout(policy),
                                                        children)
        observation = dataclasses.replace(observation, held=held, traffic=traffic)

    mono = state.clock()
    if state.history is None:
        state.history = seed_history(cr.get("status") or {}, policy, mono, wall)
    decision = plan_replicas(observation, policy, state.history, mono)
    if decision.recommendation is not None:
        state.history = state.history.record(mono, decision.recommendation, policy.longest_window_s)
    if decision.direction == "down":
        state.history = state.history.scaled(mono, decision.current, decision.desired, policy.scale_down_period_s)

    summary = "; ".join(p for p in (scrape_summary(census, scrape), router_note) if p)
    patch = await asyncio.to_thread(_write_decision, kube, cr, state, observation, decision, summary, wall,
                                    wait.to_status())
    if spec.replicas != decision.desired:
        state.version = await asyncio.to_thread(_set_spec_replicas, kube, namespace, name, decision.desired)
    state.seen_spec_replicas = decision.desired
    wants_fewer = decision.desired < current or (decision.recommendation is not None
                                                 and decision.recommendation < current)
    await asyncio.to_thread(_mark_do_not_disrupt, kube, namespace, pods, scrape, wants_fewer)
    scaled = decision.desired != current
    if scaled:
        if decision.direction == "down":
            # Before the ReplicaSet picks victims: pods on the newest, emptiest node go first.
            await asyncio.to_thread(_mark_deletion_costs, kube, namespace, pods, scrape)
        event_type, reason, message = scaling_event(decision)
        await asyncio.to_thread(_post_event, kube, cr, event_type, reason, message)
        metrics.AUTOSCALER_SCALE_EVENTS.labels(namespace, name, decision.direction).inc()
        log.info("autoscaler %s/%s: %s", namespace, name, message)
    if (scaled or int((deployment.get("spec") or {}).get("replicas", -1)) != decision.desired) \
            and reconcile is not None:
        # The reconcile applies the new size to the Deployment (its only writer) and the PDB.
        await asyncio.to_thread(reconcile)
    elif wait.overdue and reconcile is not None and not _degraded(cr):
        # A pod just outwaited scheduling.maxNodeProvisionSeconds while nothing else changed:
        # the reconcile turns that into Degraded/Unschedulable and its Warning event now.
        await asyncio.to_thread(reconcile)
    export_metrics(namespace, name, observation, decision)
    return TickResult(next_tick_s=max(0.0, policy.scrape_interval_s - (state.clock() - started)),
                      decision=decision, observation=observation, scaled=scaled, status_patch=patch)


async def _pods(kube: Kube, children: ChildCache, namespace: str, labels: dict[str, str]) -> list[dict[str, Any]]:
    """The pods carrying ``labels``: from the watch cache once synced, else by LIST."""
    if children.synced:
        return children.select("Pod", namespace, labels)
    return await asyncio.to_thread(kube.list, "Pod", namespace, ",".join(f"{k}={v}" for k, v in labels.items()))


async def _router_load(kube: Kube, namespace: str, name: str, state: FleetState,
                       timeout_s: float, children: ChildCache) -> tuple[int | None, bool, str]:
    """(held requests, traffic since the last tick, a note on failures) from the ready router pods.

    Held is None — unknown, so the fleet neither scales to zero nor trusts a 0 — when no router pod
    answered, or when one did not and those that did hold nothing."""
    pods = await _pods(kube, children, namespace, router_selector_labels(name))
    targets = take_census(pods).ready
    answered, failures = await scrape_routers(targets, timeout_s)
    note = ""
    if not targets:
        note = "no ready router pod to read held requests from"
    elif failures:
        note = f"{len(answered)} of {len(targets)} ready router pods answered /metrics ({failures[0]})"
    held_sum = int(round(sum(m.held for m in answered)))
    held: int | None = held_sum if answered and (held_sum > 0 or not failures) else None
    traffic = _routed_since(state, answered)
    return held, traffic, note


def _routed_since(state: FleetState, answered: list[RouterMetrics]) -> bool:
    """Whether any router pod routed a request since the previous tick (a counter that went down
    means a restarted pod: counted as traffic, as is a pod seen for the first time with a count)."""
    traffic = False
    seen: dict[str, float] = {}
    for m in answered:
        before = state.router_routed.get(m.pod)
        if (before is None and m.routed > 0) or (before is not None and m.routed != before):
            traffic = True
        seen[m.pod] = m.routed
    state.router_routed = seen
    return traffic


def disabled_message(replicas: int) -> str:
    return (f"autoscaling.enabled is false: spec.replicas ({replicas}) sizes the fleet, "
            "and an HPA or KEDA may drive it through the scale subresource")


def _idle(body: dict[str, Any]) -> bool:
    """Autoscaling is off and ScalingActive already says so for this body: nothing to do."""
    if (body.get("metadata") or {}).get("deletionTimestamp"):
        return True
    try:
        spec = spec_from_body(body)
    except ValidationError:
        return True
    if spec.autoscaling.enabled:
        return False
    for cond in (body.get("status") or {}).get("conditions") or []:
        if cond.get("type") == "ScalingActive":
            return bool(cond.get("reason") == REASON_DISABLED and cond.get("message") == disabled_message(spec.replicas))
    return False


def size_in_effect(spec: LLMDeploymentSpec, status: dict[str, Any]) -> int:
    """The size the reconcile applies to the Deployment (see :func:`reconcile.plan.plan_replicas`)."""
    return plan_replicas_for_deployment(spec, status)


def observe(current: int, census: PodCensus, scrape: ScrapeResult, wait: NodeWait | None = None) -> FleetObservation:
    return FleetObservation(current_replicas=current, ready=len(census.ready), starting=census.starting,
                            unschedulable=census.unschedulable, metrics=scrape.metrics,
                            scrape_errors=scrape.errors_by_reason,
                            waiting_for_nodes=min(wait.waiting, census.unschedulable) + wait.loading if wait else 0)


def _degraded(cr: dict[str, Any]) -> bool:
    for cond in (cr.get("status") or {}).get("conditions") or []:
        if cond.get("type") == "Degraded":
            return bool(cond.get("status") == "True")
    return False


def seed_history(status: dict[str, Any], policy: AutoscalingPolicy, mono_now: float, wall_now: datetime) -> History:
    """Remember the last scale decision written to the status if it is still inside a window."""
    auto = status.get("autoscaler") or {}
    last = auto.get("lastDecision") or {}
    when = auto.get("lastScaleTime")
    if not when or not isinstance(last.get("to"), int):
        return History()
    try:
        at = datetime.fromisoformat(str(when).replace("Z", "+00:00"))
    except ValueError:
        return History()
    age = (wall_now - at).total_seconds()
    if age < 0 or age >= policy.longest_window_s:
        return History()
    removed = int(last["from"]) - int(last["to"]) if isinstance(last.get("from"), int) else 0
    return History.seeded(mono_now - age, int(last["to"]), removed=max(0, removed))


def scrape_summary(census: PodCensus, scrape: ScrapeResult) -> str:
    """What the decision's reason does not say: why scrapes failed (the first failure's
    message), and since when pods wait for a node. E.g.
    ``"2 of 3 ready pods answered /metrics (timeout 1: pod x: no answer ...)"``."""
    parts = []
    if scrape.failures:
        first = scrape.failures[0].message
        counts = ", ".join(f"{r.value} {n}" for r, n in sorted(scrape.errors_by_reason.items()))
        parts.append(f"{len(scrape.metrics)} of {len(census.ready)} ready pods answered /metrics ({counts}: {first})")
    if census.unschedulable:
        parts.append(f"{census.unschedulable} unschedulable since {census.unschedulable_since}")
    return "; ".join(parts)


def export_metrics(namespace: str, name: str, observation: FleetObservation, decision: Decision) -> None:
    metrics.AUTOSCALER_DESIRED_REPLICAS.labels(namespace, name).set(decision.desired)
    if observation.queue_length is not None:
        metrics.AUTOSCALER_QUEUE_LENGTH.labels(namespace, name).set(observation.queue_length)
    if observation.kv_cache_usage is not None:
        metrics.AUTOSCALER_KV_CACHE_USAGE.labels(namespace, name).set(observation.kv_cache_usage)
    for reason in ScrapeError:
        # inc(0) creates the series, so rate() over it reads 0 rather than nothing.
        metrics.AUTOSCALER_SCRAPE_ERRORS.labels(namespace, name, reason.value).inc(
            observation.scrape_errors.get(reason, 0))
    for direction in ("up", "down"):
        # At 0 from the first tick: the dashboard's scale-event panel (increase()) has a series
        # before the first scaling rather than nothing.
        metrics.AUTOSCALER_SCALE_EVENTS.labels(namespace, name, direction)


def forget_metrics(namespace: str, name: str) -> None:
    """Drop a fleet's series when it is deleted or stops autoscaling."""
    removals: list[tuple[Any, tuple[str, ...]]] = [
        (metrics.AUTOSCALER_DESIRED_REPLICAS, (namespace, name)),
        (metrics.AUTOSCALER_QUEUE_LENGTH, (namespace, name)),
        (metrics.AUTOSCALER_KV_CACHE_USAGE, (namespace, name)),
        *((metrics.AUTOSCALER_SCALE_EVENTS, (namespace, name, d)) for d in ("up", "down")),
        *((metrics.AUTOSCALER_SCRAPE_ERRORS, (namespace, name, r.value)) for r in ScrapeError),
    ]
    for metric, labels in removals:
        try:
            metric.remove(*labels)
        except KeyError:
            pass


# --- writes (sync; run in a worker thread) --------------------------------------------


def _version(cr: dict[str, Any]) -> str | None:
    return (cr.get("metadata") or {}).get("resourceVersion")


def _patch_status_locked(kube: Kube, cr: dict[str, Any], state: FleetState,
                         build: Callable[[dict[str, Any], int | None], dict[str, Any] | None],
                         ) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Compute-write the status under the CR's lock and its resourceVersion: first from ``cr`` as
    the tick read it, and on a 409 (someone wrote since: the reconcile, kubectl) once more from a
    fresh GET. Records the version written or read in ``state``.

    Returns the status the patch was computed from and the patch it wrote (None: nothing changed).
    """
    meta = cr["metadata"]
    namespace, name = meta["namespace"], meta["name"]
    current: dict[str, Any] | None = cr
    for attempt in range(2):
        with cr_lock(namespace, name):
            if current is None:
                current = kube.get("LLMDeployment", namespace, name)
                if current is None:
                    return {}, None
                state.version = _version(current)
            status = current.get("status") or {}
            patch = build(status, (current.get("metadata") or {}).get("generation"))
            if patch is None:
                return status, None
            try:
                written = kube.patch_status("LLMDeployment", namespace, name, patch, resource_version=_version(current))
                state.version = _version(written)
                return status, patch
            except KubeError as exc:
                # A writer moved the object on since it was read (or the watch had not caught up yet).
                if exc.status != 409 or attempt == 1:
                    raise
                current = None
    return {}, None


def _write_decision(kube: Kube, cr: dict[str, Any], state: FleetState, observation: FleetObservation,
                    decision: Decision, summary: str, now: datetime,
                    waiting: dict[str, Any] | None = None) -> dict[str, Any] | None:
    before, patch = _patch_status_locked(
        kube, cr, state,
        lambda status, generation: decision_status(status, observation, decision, generation, now, summary,
                                                   waiting))
    event = condition_event(before, patch)
    if event is not None:
        _post_event(kube, cr, *event)
    return patch


def _write_inactive(kube: Kube, cr: dict[str, Any], state: FleetState, reason: str, message: str,
                    now: datetime, desired: int | None = None) -> dict[str, Any] | None:
    _, patch = _patch_status_locked(
        kube, cr, state,
        lambda status, generation: inactive_status(status, reason, message, generation, now, desired))
    return patch


def _mark_deletion_costs(kube: Kube, namespace: str, pods: list[dict[str, Any]], scrape: ScrapeResult) -> None:
    """Annotate the fleet's pods with ``pod-deletion-cost`` (see :func:`nodes.deletion_costs`).

    Best effort: without the nodes (RBAC) every node counts as equally old and
    the order still empties the node with the fewest pods first.
    """
    try:
        nodes = kube.request("GET", resource_path("v1", "nodes", None)).get("items") or []
    except KubeError as exc:
        log.warning("cannot list nodes for the scale-down order (%s); ordering by pods per node only", exc)
        nodes = []
    created = {str(n["metadata"]["name"]): str(n["metadata"].get("creationTimestamp") or "") for n in nodes}
    load = {m.pod: m.queue_length for m in scrape.metrics}
    costs = deletion_costs(placements(pods, created, load))
    for pod, cost in cost_patches(pods, costs).items():
        try:
            kube.request("PATCH", resource_path("v1", "pods", namespace, pod),
                         body={"metadata": {"annotations": {DELETION_COST_ANNOTATION: str(cost)}}},
                         content_type="application/merge-patch+json")
        except KubeError as exc:  # a pod that went away needs no cost
            if exc.status != 404:
                log.warning("cannot set %s on pod %s/%s: %s", DELETION_COST_ANNOTATION, namespace, pod, exc)


def _mark_do_not_disrupt(kube: Kube, namespace: str, pods: list[dict[str, Any]], scrape: ScrapeResult,
                         wants_fewer: bool) -> None:
    """Keep ``karpenter.sh/do-not-disrupt: "true"`` on the pods that load or serve, off the idle ones
    while the fleet wants fewer replicas (see :func:`nodes.disruption_patches`)."""
    load = {m.pod: m.queue_length for m in scrape.metrics}
    for pod, value in disruption_patches(pods, load, wants_fewer).items():
        try:
            kube.request("PATCH", resource_path("v1", "pods", namespace, pod),
                         body={"metadata": {"annotations": {DO_NOT_DISRUPT_ANNOTATION: value}}},
                         content_type="application/merge-patch+json")
        except KubeError as exc:  # a pod that went away needs no annotation
            if exc.status != 404:
                log.warning("cannot set %s on pod %s/%s: %s", DO_NOT_DISRUPT_ANNOTATION, namespace, pod, exc)


def _set_spec_replicas(kube: Kube, namespace: str, name: str, replicas: int) -> str | None:
    """Keep the LLMDeployment's ``spec.replicas`` at the size in effect (field manager
    ``fleetserve-autoscaler``): the scale subresource reports it, and turning autoscaling off
    keeps the fleet's size. The Deployment itself is written only by the reconcile.
    Returns the resourceVersion written."""
    written = kube.request("PATCH", resource_path("fleetserve.io/v1alpha1", "llmdeployments", namespace, name),
                           query=[("fieldManager", FIELD_MANAGER)], body={"spec": {"replicas": replicas}},
                           content_type="application/merge-patch+json")
    return _version(written)


def _warn_if_scaled_by_hand(kube: Kube, cr: dict[str, Any], spec_replicas: int, state: FleetState) -> None:
    """Tell whoever changed spec.replicas (kubectl scale, an HPA) that the autoscaler overrides it.

    ``state.seen_spec_replicas`` is the value this loop last wrote or saw, so its own writes
    never count as someone else's."""
    seen = state.seen_spec_replicas
    if seen is None or seen == spec_replicas:
        return
    desired = (cr.get("status") or {}).get("desiredReplicas")
    _post_event(kube, cr, "Warning", "ReplicasOverridden",
                f"spec.replicas changed {seen} → {spec_replicas} (kubectl scale, or an HPA/KEDA on the scale "
                f"subresource) but autoscaling.enabled is true: the autoscaler keeps deciding the size "
                f"(now {desired}) and sets spec.replicas back to it. Set autoscaling.enabled: false to size the "
                f"fleet by hand, and leave spec.replicas out of manifests that a GitOps tool re-applies.")


def _post_event(kube: Kube, cr: dict[str, Any], type_: str, reason: str, message: str) -> None:
    try:
        kube.post_event(cr, type_, reason, message, component="fleetserve-autoscaler")
    except KubeError as exc:  # a lost event is not worth a failed tick
        log.warning("could not post event %s: %s", reason, exc)
