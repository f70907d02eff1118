"""spec.router (issue 16 point 2): the router's children, the Service switch, minReplicas 0, and the
autoscaler's scale-to-zero / scale-from-zero decisions — rendering and pure decisions, no cluster."""

from __future__ import annotations

import copy
from datetime import UTC, datetime
from typing import Any

import pytest
from fleetserve_operator.api.spec import spec_from_body
from fleetserve_operator.autoscaler.decision import plan_replicas
from fleetserve_operator.autoscaler.history import History
from fleetserve_operator.autoscaler.scraper import MetricsError, parse_router_metrics
from fleetserve_operator.autoscaler.types import AutoscalingPolicy, FleetObservation, Limit, PodMetrics
from fleetserve_operator.reconcile.plan import CHILD_KINDS, Observed, Plan, child_name, plan, slot_kind
from fleetserve_operator.resources.monitoring import build_prometheus_rule, build_service_monitor
from fleetserve_operator.resources.router import ROUTER_RULES, build_router_deployment
from fleetserve_operator.status.conditions import get_condition
from operator_fixtures import cpu_body
from pydantic import ValidationError

NOW = datetime(2026, 1, 1, tzinfo=UTC)
ROUTER = {"enabled": True, "replicas": 2, "holdTimeoutSeconds": 600, "maxHeldRequests": 50}


def routed_body(**overrides: Any) -> dict[str, Any]:
    return cpu_body(router=ROUTER, **overrides)


def slots(p: Plan) -> dict[str, dict[str, Any]]:
    """Applied objects by child slot (``Deployment/router`` is ``<name>-router``)."""
    name = "smollm2-cpu"
    where = {(slot_kind(s), child_name(s, name)): s for s in CHILD_KINDS}
    return {where[(o["kind"], o["metadata"]["name"])]: o for o in p.apply}


def observed_after(p: Plan, router_ready: int = 0, previous: Observed | None = None) -> Observed:
    children: dict[str, Any] = dict(previous.children) if previous else {}
    children.update(copy.deepcopy(slots(p)))
    for obj in p.delete:
        for slot, live in list(children.items()):
            if live is not None and (live["kind"], live["metadata"]["name"]) == (obj["kind"], obj["metadata"]["name"]):
                children[slot] = None
    if children.get("Deployment/router") is not None:
        children["Deployment/router"]["status"] = {"readyReplicas": router_ready, "replicas": 2}
    return Observed(children=children)


def test_router_children_are_rendered_with_restricted_pod_security() -> None:
    body = routed_body()
    p = plan(body, Observed(), NOW)
    got = slots(p)
    assert {"Service/servers", "ServiceAccount/router", "Role/router", "RoleBinding/router", "Deployment/router",
            "PodDisruptionBudget/router"} <= set(got)
    dep = got["Deployment/router"]
    assert dep["metadata"]["name"] == "smollm2-cpu-router" and dep["spec"]["replicas"] == 2
    pod = dep["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["command"][:2] == ["fleetserve", "router"]
    args = container["command"]
    assert args[args.index("--service") + 1] == "ns1/smollm2-cpu-servers"
    assert args[args.index("--hold-timeout") + 1] == "600" and args[args.index("--max-held") + 1] == "50"
    assert args[args.index("--host") + 1] == "0.0.0.0"  # the pod's address (the node agent rewrites it)
    # restricted Pod Security, like the server pods
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    sc = container["securityContext"]
    assert sc == {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True, "runAsNonRoot": True,
                  "capabilities": {"drop": ["ALL"]}}
    assert container["livenessProbe"]["httpGet"]["path"] == "/health"
    assert container["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert pod["serviceAccountName"] == "smollm2-cpu-router"
    # The router pods never match the server Deployment's selector (nor the server pods the router's).
    server_selector = got["Deployment"]["spec"]["selector"]["matchLabels"]
    router_labels = dep["spec"]["template"]["metadata"]["labels"]
    assert not all(router_labels.get(k) == v for k, v in server_selector.items())
    assert got["Service/servers"]["spec"]["selector"] == server_selector
    assert got["PodDisruptionBudget/router"]["spec"]["selector"]["matchLabels"] == dep["spec"]["selector"]["matchLabels"]
    # The Role allows exactly what the router's EndpointSlice watch calls.
    assert got["Role/router"]["rules"] == ROUTER_RULES == [
        {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"], "verbs": ["list", "watch"]}]
    assert got["RoleBinding/router"]["subjects"] == [
        {"kind": "ServiceAccount", "name": "smollm2-cpu-router", "namespace": "ns1"}]
    for obj in got.values():
        assert obj["metadata"]["ownerReferences"][0]["uid"] == body["metadata"]["uid"]


def test_one_router_replica_gets_no_budget() -> None:
    got = slots(plan(cpu_body(router={**ROUTER, "replicas": 1}), Observed(), NOW))
    assert "PodDisruptionBudget/router" not in got


def test_service_turns_to_the_router_once_a_router_pod_is_ready_and_back_when_it_is_off() -> None:
    body = routed_body()
    first = plan(body, Observed(), NOW)
    server_selector = slots(first)["Deployment"]["spec"]["selector"]["matchLabels"]
    assert slots(first)["Service"]["spec"]["selector"] == server_selector  # no router pod ready yet
    assert get_condition(first.status["conditions"], "RouterReady")["status"] == "False"

    second = plan(body, observed_after(first, router_ready=1), NOW)
    router_selector = slots(first)["Deployment/router"]["spec"]["selector"]["matchLabels"]
    assert slots(second)["Service"]["spec"]["selector"] == router_selector
    ready = get_condition(second.status["conditions"], "RouterReady")
    assert ready["status"] == "True" and "held up to 600 s" in ready["message"]

    # Switched off: the Service selects the servers again and every router child is deleted.
    before = observed_after(second, router_ready=2, previous=observed_after(first, router_ready=1))
    off = copy.deepcopy(body)
    off["spec"]["router"] = {"enabled": False}
    off["status"] = {"conditions": second.status["conditions"]}
    third = plan(off, before, NOW)
    assert slots(third)["Service"]["spec"]["selector"] == server_selector
    deleted = {(o["kind"], o["metadata"]["name"]) for o in third.delete}
    assert deleted == {("Service", "smollm2-cpu-servers"), ("ServiceAccount", "smollm2-cpu-router"),
                       ("Role", "smollm2-cpu-router"), ("RoleBinding", "smollm2-cpu-router"),
                       ("Deployment", "smollm2-cpu-router"), ("PodDisruptionBudget", "smollm2-cpu-router")}
    assert get_condition(third.status["conditions"], "RouterReady") is None


def test_a_deleted_or_edited_router_child_is_repaired() -> None:
    body = routed_body()
    first = plan(body, Observed(), NOW)
    observed = observed_after(first, router_ready=2)
    settled = copy.deepcopy(body)
    second = plan(settled, observed, NOW)
    settled["status"] = {"observedGeneration": 1, "conditions": second.status["conditions"]}
    observed = observed_after(second, router_ready=2, previous=observed)
    assert not plan(settled, observed, NOW).apply  # converged
    observed.children["Deployment/router"]["spec"]["template"]["spec"]["containers"][0]["image"] = "evil:1"
    observed.children["Role/router"] = None
    repaired = plan(settled, observed, NOW)
    assert {(o["kind"], o["metadata"]["name"]) for o in repaired.apply} == {
        ("Deployment", "smollm2-cpu-router"), ("Role", "smollm2-cpu-router")}
    (event,) = [e for e in repaired.events if e.reason == "Repaired"]
    assert "recreated Role smollm2-cpu-router" in event.message and "evil:1" in event.message


def test_min_replicas_zero_needs_the_router() -> None:
    auto = {"enabled": True, "minReplicas": 0, "maxReplicas": 2}
    with pytest.raises(ValidationError, match="minReplicas may be 0 only with router.enabled"):
        spec_from_body(cpu_body(autoscaling=auto))
    assert spec_from_body(routed_body(autoscaling=auto)).autoscaling.min_replicas == 0
    # autoscaling off: spec.replicas 0 was always fine
    assert spec_from_body(cpu_body(replicas=0)).replicas == 0


def test_monitoring_scrapes_the_router_under_its_own_job() -> None:
    sm = build_service_monitor("chat", "ml", 5, router=True)["spec"]
    server, router = sm["endpoints"]
    assert {"targetLabel": "job", "replacement": "fleetserve-server"} in server["relabelings"]
    assert {"targetLabel": "job", "replacement": "fleetserve-router"} in router["relabelings"]
    keeps = [r["regex"] for e in (server, router) for r in e["relabelings"] if r.get("action") == "keep"]
    assert keeps == ["fleetserve-server", "fleetserve-router"]
    assert sm["selector"]["matchExpressions"][0]["values"] == ["fleetserve-server", "fleetserve-router"]
    assert build_service_monitor("chat", "ml", 5)["spec"]["endpoints"][0]["relabelings"] == [
        {"targetLabel": "job", "replacement": "fleetserve-server"}]  # unchanged without the router
    rule = build_prometheus_rule("chat", "ml", None, servers_service="chat-servers")
    assert 'service="chat-servers"' in rule["spec"]["groups"][0]["rules"][0]["expr"]


def test_router_deployment_follows_the_spec() -> None:
    spec = spec_from_body(routed_body(image="registry.example/fs:2", imagePullSecrets=[{"name": "pull"}]))
    dep = build_router_deployment("ml", "chat", spec)
    pod = dep["spec"]["template"]["spec"]
    assert pod["containers"][0]["image"] == "registry.example/fs:2"
    assert pod["imagePullSecrets"] == [{"name": "pull"}]


# ---- the autoscaler ---------------------------------------------------------------------------

POLICY = AutoscalingPolicy(min_replicas=0, max_replicas=3, target_queue_length=4.0, target_kv_cache_usage=0.8,
                           scale_down_stabilization_s=60.0, scrape_interval_s=5.0)


def idle_pod(kv: float = 0.3) -> PodMetrics:
    return PodMetrics(pod="p0", queue_length=0.0, kv_cache_usage=kv)  # cached prefixes hold KV blocks


def test_scales_to_zero_only_after_the_window_without_traffic() -> None:
    history = History().record(0.0, 1, POLICY.longest_window_s)
    obs = FleetObservation(current_replicas=1, ready=1, metrics=(idle_pod(),), held=0, traffic=False)
    early = plan_replicas(obs, POLICY, history, 30.0)
    assert early.recommendation == 0 and early.desired == 1 and early.limit is Limit.SCALE_DOWN_STABILIZATION
    # no history yet (a replica that just turned Ready): not seen idle for the window, so it stays
    fresh = plan_replicas(obs, POLICY, History(), 100.0)
    assert fresh.desired == 1 and "until idle for the whole 60 s" in fresh.reason
    idle_history = History()
    for t in range(0, 62, 2):
        idle_history = idle_history.record(float(t), 0, POLICY.longest_window_s)
    late = plan_replicas(obs, POLICY, idle_history, 62.0)
    assert late.desired == 0 and "no request running, waiting or held" in late.reason
    # traffic between two scrapes, a held request, or an unknown router: never to zero
    for busy in (FleetObservation(current_replicas=1, ready=1, metrics=(idle_pod(),), held=0, traffic=True),
                 FleetObservation(current_replicas=1, ready=1, metrics=(idle_pod(),), held=1),
                 FleetObservation(current_replicas=1, ready=1, metrics=(idle_pod(),), held=None)):
        assert plan_replicas(busy, POLICY, idle_history, 62.0).desired == 1, busy
    # minReplicas 1 (no scale to zero): the idle fleet keeps its one replica
    kept = AutoscalingPolicy(min_replicas=1, max_replicas=3, target_queue_length=4.0, target_kv_cache_usage=0.8)
    assert plan_replicas(obs, kept, History(), 100.0).desired == 1


def test_scales_from_zero_as_soon_as_the_router_holds_a_request() -> None:
    zero = FleetObservation(current_replicas=0, ready=0, held=0)
    stay = plan_replicas(zero, POLICY, History(), 0.0)
    assert stay.desired == 0 and stay.limit is Limit.SCALED_TO_ZERO and stay.metrics_ok
    one = plan_replicas(FleetObservation(current_replicas=0, ready=0, held=1), POLICY, History(), 0.0)
    assert one.desired == 1 and one.limit is Limit.SCALE_FROM_ZERO and "holds 1 request" in one.reason
    # a scale-down window that still remembers 0 does not delay it
    busy = plan_replicas(FleetObservation(current_replicas=0, ready=0, held=9), POLICY,
                         History().record(0.0, 0, 60.0), 1.0)
    assert busy.desired == 3  # ceil(9 / 4) = 3, capped at maxReplicas 3
    unknown = plan_replicas(FleetObservation(current_replicas=0, ready=0, held=None), POLICY, History(), 0.0)
    assert unknown.desired == 0 and unknown.limit is Limit.ROUTER_METRICS_UNAVAILABLE and not unknown.metrics_ok


def test_router_metrics_are_parsed_from_the_router_exposition() -> None:
    from fleetserve_router.metrics import RouterMetrics

    metrics = RouterMetrics()
    metrics.held.set(3)
    metrics.requests.labels(route="prefix").inc(2)
    metrics.requests.labels(route="least_load").inc(5)
    parsed = parse_router_metrics("r0", metrics.render().decode())
    assert (parsed.held, parsed.routed) == (3.0, 7.0)
    with pytest.raises(MetricsError, match="no fleetserve_router_requests_held"):
        parse_router_metrics("r0", "fleetserve_requests_waiting 0\n")


def test_traffic_between_two_scrapes_counts_even_when_no_scrape_saw_a_request() -> None:
    from fleetserve_operator.autoscaler.controller import FleetState, _routed_since
    from fleetserve_operator.autoscaler.scraper import RouterMetrics as Scraped

    state = FleetState()
    assert not _routed_since(state, [Scraped("r0", 0, 0.0)])      # a new router pod that routed nothing
    assert not _routed_since(state, [Scraped("r0", 0, 0.0)])
    assert _routed_since(state, [Scraped("r0", 0, 1.0)])           # one request came and went
    assert not _routed_since(state, [Scraped("r0", 0, 1.0)])
    assert _routed_since(state, [Scraped("r0", 0, 0.0)])           # restarted (counter reset): unknown, traffic
    assert _routed_since(state, [Scraped("r0", 0, 0.0), Scraped("r1", 0, 3.0)])  # a new pod with history
