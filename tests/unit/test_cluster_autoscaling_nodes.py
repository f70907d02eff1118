"""Node-aware fleet scaling (issue 9, parts 2 and 3), on plain dicts: pods waiting for nodes
count as requested capacity and are never removed by one lighter scrape; past
``scheduling.maxNodeProvisionSeconds`` the fleet is Degraded/Unschedulable with a Warning; a
scale-down's ``pod-deletion-cost`` empties the newest, least-loaded node first."""

from __future__ import annotations

import copy
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from fleetserve_operator.autoscaler import (
    AutoscalingPolicy,
    FleetObservation,
    History,
    PodMetrics,
    plan_replicas,
)
from fleetserve_operator.autoscaler.controller import observe
from fleetserve_operator.autoscaler.nodes import (
    DELETION_COST_ANNOTATION,
    DO_NOT_DISRUPT_ANNOTATION,
    PodPlacement,
    capacity_shortfall,
    cost_patches,
    deletion_costs,
    disruption_patches,
    node_wait,
    placements,
)
from fleetserve_operator.autoscaler.pods import take_census
from fleetserve_operator.autoscaler.scraper import ScrapeResult
from fleetserve_operator.autoscaler.status import decision_status
from fleetserve_operator.autoscaler.types import Limit
from fleetserve_operator.reconcile.plan import Observed, plan
from fleetserve_operator.status.conditions import get_condition
from hypothesis import given, settings
from hypothesis import strategies as st
from operator_fixtures import cpu_body

NOW = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)
# scale_down_percent=100: these tests are about the node wait, not the scale-down rate policy
POLICY = AutoscalingPolicy(min_replicas=1, max_replicas=5, target_queue_length=4, target_kv_cache_usage=0.8,
                           scale_up_stabilization_s=0, scale_down_stabilization_s=0, scale_down_percent=100)


def at(seconds_ago: float) -> str:
    return (NOW - timedelta(seconds=seconds_ago)).strftime("%Y-%m-%dT%H:%M:%SZ")


def pending(name: str, seconds_ago: float) -> dict[str, Any]:
    return {"metadata": {"name": name}, "spec": {}, "status": {"phase": "Pending", "conditions": [{
        "type": "PodScheduled", "status": "False", "reason": "Unschedulable", "lastTransitionTime": at(seconds_ago),
        "message": "0/1 nodes are available: 1 Insufficient nvidia.com/gpu."}]}}


def running(name: str, node: str, annotations: dict[str, str] | None = None) -> dict[str, Any]:
    return {"metadata": {"name": name, "annotations": annotations or {}}, "spec": {"nodeName": node},
            "status": {"phase": "Running", "conditions": [{"type": "Ready", "status": "True"}]}}


# --- node_wait ---------------------------------------------------------------------------


def test_node_wait_splits_waiting_and_overdue_pods_at_the_limit() -> None:
    pods = [pending("a", 30), pending("b", 200), running("c", "n1"),
            {**pending("d", 500), "metadata": {"name": "d", "deletionTimestamp": at(1)}}]
    wait = node_wait(pods, 120, NOW)
    assert (wait.waiting, wait.overdue, wait.unschedulable) == (1, 1, 2)
    assert wait.since == at(200) and wait.longest_s == 200
    assert wait.to_status() == {"pods": 1, "overdue": 1, "since": at(200), "seconds": 200}


def test_node_wait_with_limit_zero_makes_every_unschedulable_pod_overdue() -> None:
    wait = node_wait([pending("a", 0), pending("b", 3)], 0, NOW)
    assert (wait.waiting, wait.overdue) == (0, 2)


def test_node_wait_is_empty_when_every_pod_is_placed() -> None:
    wait = node_wait([running("a", "n1")], 900, NOW)
    assert wait.unschedulable == 0 and wait.to_status() is None and wait.since is None


# --- plan_replicas with pods waiting for nodes ---------------------------------------------


def observation(queues: list[float], *, unschedulable: int = 0, waiting: int = 0) -> FleetObservation:
    metrics = tuple(PodMetrics(pod=f"p{i}", queue_length=q, kv_cache_usage=0.1) for i, q in enumerate(queues))
    return FleetObservation(current_replicas=len(queues) + unschedulable, ready=len(queues),
                            unschedulable=unschedulable, waiting_for_nodes=waiting, metrics=metrics)


def test_pods_waiting_for_nodes_are_requested_capacity_no_replica_is_added() -> None:
    # 1 ready pod, queue 12 (3x target), 2 pending for a node: 3 is what the load needs; nothing more.
    decision = plan_replicas(observation([12], unschedulable=2, waiting=2), POLICY, History(), now=0)
    assert decision.desired == 3 and decision.direction == "none"


def test_a_lighter_scrape_never_removes_a_pod_a_node_is_being_provisioned_for() -> None:
    # The queue dropped to 0: without the wait this shrinks to 1 (the window is 0 s).
    free = plan_replicas(observation([0], unschedulable=2), POLICY, History(), now=0)
    assert free.desired == 1
    held = plan_replicas(observation([0], unschedulable=2, waiting=2), POLICY, History(), now=0)
    assert held.desired == 3 and held.limit is Limit.WAITING_FOR_NODES
    assert "2 pods waiting for a node" in held.reason


def test_once_running_normal_decisions_resume() -> None:
    decision = plan_replicas(observation([0, 0, 0]), POLICY, History(), now=0)
    assert decision.desired == 1 and decision.limit is Limit.NONE


@settings(max_examples=150, deadline=None)
@given(queue=st.floats(0, 200), ready=st.integers(1, 4), unschedulable=st.integers(0, 3),
       waiting=st.integers(0, 3))
def test_property_waiting_pods_never_shrink_and_unschedulable_never_grow(
        queue: float, ready: int, unschedulable: int, waiting: int) -> None:
    waiting = min(waiting, unschedulable)
    obs = observation([queue / ready] * ready, unschedulable=unschedulable, waiting=waiting)
    decision = plan_replicas(obs, POLICY, History(), now=0)
    assert POLICY.min_replicas <= decision.desired <= POLICY.max_replicas
    current = min(obs.current_replicas, POLICY.max_replicas)
    if waiting:
        assert decision.desired >= current
    if unschedulable:
        assert decision.desired <= max(current, POLICY.min_replicas)


# --- status: status.autoscaler.waitingForNodes, Progressing, Degraded ------------------------


def test_decision_status_shows_and_then_removes_waiting_for_nodes() -> None:
    obs = observation([12], unschedulable=1, waiting=1)
    decision = plan_replicas(obs, POLICY, History(), now=0)
    waiting = node_wait([pending("a", 40)], 900, NOW).to_status()
    patch = decision_status({}, obs, decision, 1, NOW, "", waiting)
    assert patch is not None and patch["autoscaler"]["waitingForNodes"] == {
        "pods": 1, "overdue": 0, "since": at(40), "seconds": 40}
    status = {"autoscaler": patch["autoscaler"], "conditions": patch["conditions"]}
    placed = observation([6, 6])
    after = decision_status(status, placed, plan_replicas(placed, POLICY, History(), now=1), 1, NOW, "", None)
    assert after is not None and after["autoscaler"]["waitingForNodes"] is None  # merge patch: removed


def gpu_body(limit_s: int) -> dict[str, Any]:
    body = cpu_body()
    body["spec"]["scheduling"] = {"maxNodeProvisionSeconds": limit_s}
    body["spec"]["autoscaling"] = {"enabled": True, "minReplicas": 1, "maxReplicas": 3}
    return body


def planned(body: dict[str, Any], pods: list[dict[str, Any]], now: datetime) -> Any:
    first = plan(body, Observed(), now)
    children = {o["kind"]: copy.deepcopy(o) for o in first.apply}
    children["Deployment"]["status"] = {"replicas": 2, "readyReplicas": 1, "updatedReplicas": 2}
    return plan(body, Observed(children=children, pods=pods), now)


def test_waiting_inside_the_limit_is_progressing_waiting_for_nodes_not_degraded() -> None:
    p = planned(gpu_body(900), [running("a", "n1"), pending("b", 60)], NOW)
    progressing = get_condition(p.status["conditions"], "Progressing")
    degraded = get_condition(p.status["conditions"], "Degraded")
    assert progressing is not None and (progressing["status"], progressing["reason"]) == ("True", "WaitingForNodes")
    assert "1 pod waits for a node since" in progressing["message"]
    assert degraded is not None and degraded["status"] == "False"
    assert not [e for e in p.events if e.type == "Warning"]


def test_past_the_limit_is_degraded_unschedulable_with_a_warning_event() -> None:
    p = planned(gpu_body(900), [running("a", "n1"), pending("b", 901)], NOW)
    degraded = get_condition(p.status["conditions"], "Degraded")
    assert degraded is not None and (degraded["status"], degraded["reason"]) == ("True", "Unschedulable")
    assert "Insufficient nvidia.com/gpu" in degraded["message"]
    assert ("Warning", "Unschedulable") in [(e.type, e.reason) for e in p.events]
    progressing = get_condition(p.status["conditions"], "Progressing")
    assert progressing is not None and progressing["reason"] == "WaitingForNodes"


def test_the_default_limit_protects_pending_pods_for_900_s() -> None:
    # Issue 17: the default was 0, so a fleet without the setting had no protection at all.
    body = cpu_body()
    body["spec"]["autoscaling"] = {"enabled": True, "minReplicas": 1, "maxReplicas": 3}
    p = planned(body, [running("a", "n1"), pending("b", 600)], NOW)
    assert (get_condition(p.status["conditions"], "Degraded") or {}).get("status") == "False"
    assert (get_condition(p.status["conditions"], "Progressing") or {}).get("reason") == "WaitingForNodes"
    late = planned(body, [running("a", "n1"), pending("b", 901)], NOW)
    assert (get_condition(late.status["conditions"], "Degraded") or {}).get("reason") == "Unschedulable"


def test_limit_zero_degrades_at_once_as_without_a_node_autoscaler() -> None:
    p = planned(gpu_body(0), [running("a", "n1"), pending("b", 1)], NOW)
    degraded = get_condition(p.status["conditions"], "Degraded")
    assert degraded is not None and degraded["reason"] == "Unschedulable"


# --- protection until Ready (issue 17) -------------------------------------------------------


def loading(name: str, node: str, seconds_ago: float) -> dict[str, Any]:
    """Bound to a (new) node, server still loading the model: not Ready."""
    return {"metadata": {"name": name, "creationTimestamp": at(seconds_ago)}, "spec": {"nodeName": node},
            "status": {"phase": "Running", "podIP": "10.0.0.9", "conditions": [
                {"type": "PodScheduled", "status": "True"}, {"type": "Ready", "status": "False"}]}}


def ready_pod(name: str, node: str) -> dict[str, Any]:
    pod = running(name, node)
    pod["status"]["podIP"] = "10.0.0.1"
    return pod


def test_a_pod_loading_on_its_new_node_is_still_protected_from_a_lighter_scrape() -> None:
    # The pod waited for a node, got bound and loads its model: the ReplicaSet would delete it
    # first (not Ready), wasting the node's boot. Until Ready (inside the limit) the size holds.
    pods = [ready_pod("a", "n1"), loading("b", "new-node", 120)]
    census = take_census(pods)
    wait = node_wait(pods, 900, NOW)
    assert wait.loading == 1 and wait.unschedulable == 0
    obs = observe(2, census, ScrapeResult(metrics=(PodMetrics(pod="a", queue_length=0, kv_cache_usage=0.1),), failures=()),
                  wait)
    decision = plan_replicas(obs, POLICY, History(), now=0)
    assert decision.desired == 2 and decision.limit is Limit.WAITING_FOR_NODES
    # Past the limit, or once Ready, normal decisions resume.
    assert node_wait([ready_pod("a", "n1"), loading("b", "new-node", 901)], 900, NOW).loading == 0


# --- only capacity shortfalls hold growth (issue 17) -------------------------------------------


def unplaceable(name: str) -> dict[str, Any]:
    pod = pending(name, 30)
    pod["status"]["conditions"][0]["message"] = (
        "0/2 nodes are available: 2 node(s) didn't match Pod's node affinity/selector. preemption: 0/2 nodes "
        "are available: 2 Preemption is not helpful for scheduling.")
    return pod


def test_a_pod_unschedulable_for_a_bad_selector_does_not_freeze_scale_up() -> None:
    pods = [ready_pod("a", "n1"), unplaceable("bad")]
    census = take_census(pods)
    assert census.unschedulable == 0 and census.unplaceable == 1
    obs = observe(2, census, ScrapeResult(metrics=(PodMetrics(pod="a", queue_length=16, kv_cache_usage=0.1),), failures=()),
                  node_wait(pods, 900, NOW))
    decision = plan_replicas(obs, POLICY, History(), now=0)
    assert decision.desired > 2 and decision.limit is not Limit.UNSCHEDULABLE
    # A capacity shortfall still holds growth.
    short = [ready_pod("a", "n1"), pending("b", 30)]
    held = plan_replicas(observe(2, take_census(short), ScrapeResult(
        metrics=(PodMetrics(pod="a", queue_length=16, kv_cache_usage=0.1),), failures=()), node_wait(short, 900, NOW)),
        POLICY, History(), now=0)
    assert held.desired == 2 and held.limit is Limit.UNSCHEDULABLE


def test_a_bad_selector_is_degraded_at_once_not_waiting_for_nodes() -> None:
    p = planned(gpu_body(900), [running("a", "n1"), unplaceable("bad")], NOW)
    assert (get_condition(p.status["conditions"], "Degraded") or {}).get("reason") == "Unschedulable"


@pytest.mark.parametrize(("message", "shortfall"), [
    ("0/1 nodes are available: 1 Insufficient nvidia.com/gpu.", True),
    ("0/3 nodes are available: 1 Insufficient cpu, 2 node(s) had untolerated taint {a: b}.", True),
    ("0/1 nodes are available: 1 Too many pods.", True),
    ("no nodes available to schedule pods", True),
    ("", True),
    (None, True),
    ("0/2 nodes are available: 2 node(s) didn't match Pod's node affinity/selector.", False),
    ("0/1 nodes are available: 1 node(s) had untolerated taint {node.kubernetes.io/unreachable: }.", False),
])
def test_capacity_shortfall_reads_the_schedulers_message(message: str | None, shortfall: bool) -> None:
    assert capacity_shortfall(message) is shortfall


# --- karpenter.sh/do-not-disrupt (issue 17) --------------------------------------------------


def test_do_not_disrupt_stays_on_busy_and_loading_pods_and_goes_only_from_idle_ones_when_shrinking() -> None:
    pods = [ready_pod("busy", "n1"), ready_pod("idle", "n2"), loading("new", "n3", 10),
            ready_pod("unscraped", "n4")]
    load = {"busy": 3.0, "idle": 0.0}
    assert disruption_patches(pods, load, shrinking=False) == {p: "true" for p in ("busy", "idle", "new", "unscraped")}
    for pod in pods:
        pod["metadata"].setdefault("annotations", {})[DO_NOT_DISRUPT_ANNOTATION] = "true"
    assert disruption_patches(pods, load, shrinking=False) == {}
    assert disruption_patches(pods, load, shrinking=True) == {"idle": None}


# --- scale-down order: pod-deletion-cost ---------------------------------------------------


def test_deletion_cost_empties_the_newest_least_loaded_node_first() -> None:
    pods = [
        PodPlacement("static-a", "fs-node-0", "2026-01-01T08:00:00Z", load=0),
        PodPlacement("new-1", "gpu-b", "2026-01-01T11:00:00Z", load=5),
        PodPlacement("newest-1", "gpu-c", "2026-01-01T11:30:00Z", load=3),
    ]
    costs = deletion_costs(pods)
    # Same pod count everywhere: the newest node goes first, the static (oldest) node last.
    assert sorted(costs, key=costs.__getitem__) == ["newest-1", "new-1", "static-a"]


def test_deletion_cost_prefers_the_newest_node_then_the_least_loaded_one() -> None:
    pods = [
        PodPlacement("a1", "old", "2026-01-01T08:00:00Z", load=1),
        PodPlacement("b1", "new-two", "2026-01-01T11:00:00Z", load=0),
        PodPlacement("b2", "new-two", "2026-01-01T11:00:00Z", load=9),
        PodPlacement("c1", "mid-busy", "2026-01-01T10:00:00Z", load=8),
        PodPlacement("d1", "mid-idle", "2026-01-01T10:00:00Z", load=2),
    ]
    order = sorted(deletion_costs(pods), key=deletion_costs(pods).__getitem__)
    # The newest node first even with 2 pods (an autoscaler added it; the old, static one goes last),
    # its lighter pod first; at the same age the less loaded node first.
    assert order == ["b1", "b2", "d1", "c1", "a1"]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 3), st.integers(0, 20)), min_size=1, max_size=12))
def test_property_costs_are_distinct_and_keep_each_node_together(spec: list[tuple[int, int]]) -> None:
    pods = [PodPlacement(f"p{i}", f"n{node}", f"2026-01-01T1{node}:00:00Z", load=load)
            for i, (node, load) in enumerate(spec)]
    costs = deletion_costs(pods)
    assert len(set(costs.values())) == len(pods) and min(costs.values()) >= 0
    node_of = {p.pod: p.node for p in pods}
    order = sorted(costs, key=costs.__getitem__)
    seen_nodes = [node_of[p] for p in order]
    # Each node's pods are contiguous in the deletion order: a node is emptied before the next one.
    collapsed = [n for i, n in enumerate(seen_nodes) if i == 0 or n != seen_nodes[i - 1]]
    assert len(collapsed) == len(set(collapsed))


def test_placements_skip_pending_and_deleted_pods_and_patches_only_changes() -> None:
    pods = [running("a", "n1", {DELETION_COST_ANNOTATION: "0"}), running("b", "n2"), pending("c", 5),
            {**running("d", "n2"), "metadata": {"name": "d", "deletionTimestamp": at(1)}}]
    placed = placements(pods, {"n1": "2026-01-01T08:00:00Z", "n2": "2026-01-01T09:00:00Z"}, {"a": 1.0})
    assert [p.pod for p in placed] == ["a", "b"]
    costs = deletion_costs(placed)
    assert costs == {"b": 0, "a": 1000}
    assert cost_patches(pods, costs) == {"b": 0, "a": 1000}
    pods[0]["metadata"]["annotations"][DELETION_COST_ANNOTATION] = "1000"
    assert cost_patches(pods, costs) == {"b": 0}
