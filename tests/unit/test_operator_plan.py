"""The plan function: spec + observed children -> applies, deletes, status patch, events.

No cluster: "live" objects are the plan's own outputs with a status added, the
way the API server would return them.
"""

from __future__ import annotations

import copy
from datetime import UTC, datetime, timedelta
from typing import Any

from fleetserve_operator.reconcile.plan import Observed, Plan, plan
from fleetserve_operator.resources.labels import APPLIED_HASH, TEMPLATE_HASH
from fleetserve_operator.resources.server import template_hash
from fleetserve_operator.status.conditions import get_condition
from operator_fixtures import UID, cpu_body, example

NOW = datetime(2026, 1, 1, tzinfo=UTC)
LATER = NOW + timedelta(minutes=5)


def by_kind(p: Plan) -> dict[str, dict[str, Any]]:
    """Every object the plan applies, the optional monitoring children included."""
    optional = p.monitoring.apply if p.monitoring is not None else []
    return {o["kind"]: o for o in [*p.apply, *optional]}


def live(p: Plan, previous: Observed | None = None, ready: int | None = None) -> Observed:
    """The cluster after executing ``p``: applied objects exist; the Deployment has ``ready`` pods ready."""
    children = dict(previous.children) if previous else {}
    for obj in p.apply:
        children[obj["kind"]] = copy.deepcopy(obj)
    for obj in p.delete:
        children[obj["kind"]] = None
    dep = children.get("Deployment")
    if dep is not None and ready is not None:
        replicas = dep["spec"]["replicas"]
        dep.setdefault("metadata", {})["generation"] = 1
        dep["status"] = {"observedGeneration": 1, "replicas": replicas, "updatedReplicas": replicas,
                         "readyReplicas": ready, "availableReplicas": ready}
    return Observed(children=children, pods=[], monitoring_kinds=previous.monitoring_kinds if previous else frozenset())


def with_status(body: dict[str, Any], p: Plan) -> dict[str, Any]:
    out = copy.deepcopy(body)
    status = out.setdefault("status", {})
    for key, value in (p.status or {}).items():
        if value is None:
            status.pop(key, None)
        elif isinstance(value, dict) and isinstance(status.get(key), dict):
            status[key] = {k: v for k, v in {**status[key], **value}.items() if v is not None}
        else:
            status[key] = value
    return out


def cond(p_or_status: Plan | dict[str, Any], type_: str) -> dict[str, Any]:
    status = p_or_status.status if isinstance(p_or_status, Plan) else p_or_status
    c = get_condition((status or {}).get("conditions"), type_)
    assert c is not None, type_
    return c


def test_first_reconcile_creates_owned_labelled_children() -> None:
    body = cpu_body()
    p = plan(body, Observed(), NOW)
    kinds = by_kind(p)
    assert list(kinds) == ["ConfigMap", "Service", "Deployment"]  # 1 replica: no PDB; no monitoring CRDs
    for obj in p.apply:
        meta = obj["metadata"]
        assert meta["namespace"] == "ns1"
        assert meta["labels"]["app.kubernetes.io/name"] == "fleetserve-server"
        assert meta["labels"]["app.kubernetes.io/instance"] == "smollm2-cpu"
        assert meta["labels"]["app.kubernetes.io/managed-by"] == "fleetserve"
        [ref] = meta["ownerReferences"]
        assert (ref["uid"], ref["kind"], ref["controller"]) == (UID, "LLMDeployment", True)
        assert APPLIED_HASH in meta["annotations"]
    assert [(e.type, e.reason) for e in p.events] == [("Normal", "Created")]
    assert cond(p, "MemoryFits")["status"] == "True"
    assert cond(p, "Ready")["status"] == "False"
    assert cond(p, "Progressing")["reason"] == "RollingOut"
    assert p.status and p.status["selector"] == "app.kubernetes.io/name=fleetserve-server,app.kubernetes.io/instance=smollm2-cpu"
    assert p.status["endpoint"] == "http://smollm2-cpu.ns1.svc.cluster.local:8000"
    assert p.status["desiredReplicas"] == 1 and p.status["observedGeneration"] == 1


def test_converges_and_then_writes_nothing() -> None:
    body = cpu_body()
    first = plan(body, Observed(), NOW)
    body = with_status(body, first)
    observed = live(first, ready=1)
    second = plan(body, observed, LATER)
    assert second.apply == [] and second.delete == []
    assert cond(second, "Ready")["status"] == "True"
    assert cond(second, "Progressing")["reason"] == "RolloutComplete"
    assert ("Normal", "RolloutComplete") in [(e.type, e.reason) for e in second.events]
    # MemoryFits did not change: its transition time is the first one
    assert second.status and "conditions" in second.status
    assert cond(second, "MemoryFits")["lastTransitionTime"] == "2026-01-01T00:00:00Z"
    body = with_status(body, second)
    third = plan(body, observed, LATER + timedelta(minutes=1))
    assert third.converged and third.events == []


def test_spec_change_rolls_the_pods_and_bumps_observed_generation() -> None:
    body = cpu_body()
    first = plan(body, Observed(), NOW)
    observed = live(first, ready=1)
    body = with_status(body, first)
    changed = copy.deepcopy(body)
    changed["spec"]["engine"]["maxModelLen"] = 512
    changed["metadata"]["generation"] = 2
    p = plan(changed, observed, LATER)
    kinds = by_kind(p)
    assert set(kinds) == {"ConfigMap", "Deployment"}
    assert "max_model_len: 512" in kinds["ConfigMap"]["data"]["server.yaml"]
    assert template_hash(kinds["Deployment"]) != template_hash(observed.children["Deployment"])
    assert any(e.reason == "Updated" and "rolling the pods" in e.message for e in p.events)
    assert p.status and p.status["observedGeneration"] == 2
    assert cond(p, "Progressing")["status"] == "True"


def test_scale_adds_and_removes_the_disruption_budget() -> None:
    body = cpu_body()
    first = plan(body, Observed(), NOW)
    observed = live(first, ready=1)
    scaled = cpu_body(replicas=3)
    p = plan(scaled, observed, LATER)
    kinds = by_kind(p)
    assert kinds["Deployment"]["spec"]["replicas"] == 3
    assert kinds["PodDisruptionBudget"]["spec"]["maxUnavailable"] == 1
    # the template does not change with the replica count: no roll
    assert template_hash(kinds["Deployment"]) == template_hash(observed.children["Deployment"])
    observed = live(p, observed, ready=3)
    for obj in observed.children.values():
        if obj is not None:
            obj["metadata"]["uid"] = "child-uid"
    back = plan(cpu_body(replicas=1), observed, LATER)
    assert [o["kind"] for o in back.delete] == ["PodDisruptionBudget"]


def test_model_that_does_not_fit_gets_no_deployment_and_a_warning() -> None:
    body = example("llama-3.1-70b-does-not-fit.yaml")
    p = plan(body, Observed(), NOW)
    assert "Deployment" not in by_kind(p)
    fits = cond(p, "MemoryFits")
    assert fits["status"] == "False" and fits["reason"] == "DoesNotFit"
    assert "131.4 GiB for weights" in fits["message"] and "use quantization nf4" in fits["message"]
    assert ("Warning", "MemoryDoesNotFit") in [(e.type, e.reason) for e in p.events]
    assert cond(p, "Ready")["reason"] == "MemoryDoesNotFit"
    assert p.status and p.status["memory"]["fits"] is False and p.status["memory"]["weightsBytes"] > 100 * 2**30
    assert p.status["readySummary"] == "0/0"


def test_an_existing_deployment_is_scaled_to_zero_when_the_spec_stops_fitting() -> None:
    body = example("llama-3.1-8b-nf4.yaml")
    first = plan(body, Observed(), NOW)
    observed = live(first, ready=1)
    body["spec"]["quantization"] = "none"
    body["spec"]["resources"]["gpuMemory"] = "16Gi"
    p = plan(body, observed, LATER)
    assert by_kind(p)["Deployment"]["spec"]["replicas"] == 0
    assert cond(p, "MemoryFits")["status"] == "False"


def test_unknown_model_proceeds_with_memory_fits_unknown() -> None:
    body = example("llama-3.1-8b-nf4.yaml")
    body["spec"]["model"]["source"] = "hf:someone/some-new-model"
    p = plan(body, Observed(), NOW)
    assert "Deployment" in by_kind(p)
    assert cond(p, "MemoryFits")["status"] == "Unknown"
    assert "kv_cache_tokens" not in by_kind(p)["ConfigMap"]["data"]["server.yaml"]


def test_autoscaler_owns_replicas_when_enabled() -> None:
    body = example("llama-3.1-8b-nf4.yaml")  # autoscaling 1..4
    body["status"] = {"desiredReplicas": 3}
    p = plan(body, Observed(), NOW)
    assert by_kind(p)["Deployment"]["spec"]["replicas"] == 3
    assert p.status and "desiredReplicas" not in p.status  # the operator never writes the autoscaler's field
    body["status"] = {"desiredReplicas": 99}
    assert by_kind(plan(body, Observed(), NOW))["Deployment"]["spec"]["replicas"] == 4
    del body["status"]
    assert by_kind(plan(body, Observed(), NOW))["Deployment"]["spec"]["replicas"] == 1


def test_monitoring_objects_only_when_their_crds_exist() -> None:
    body = cpu_body()
    without = plan(body, Observed(), NOW)
    assert "ServiceMonitor" not in by_kind(without)
    with_crds = plan(body, Observed(monitoring_kinds=frozenset({"ServiceMonitor", "PrometheusRule"})), NOW)
    kinds = by_kind(with_crds)
    assert kinds["ServiceMonitor"]["spec"]["endpoints"][0]["port"] == "http"
    assert kinds["PrometheusRule"]["spec"]["groups"][0]["rules"]
    off = cpu_body(monitoring={"serviceMonitor": False, "prometheusRule": True})
    assert "ServiceMonitor" not in by_kind(plan(off, Observed(monitoring_kinds=frozenset({"ServiceMonitor"})), NOW))


def test_a_foreign_object_with_the_childs_name_is_left_alone() -> None:
    body = cpu_body()
    foreign = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "smollm2-cpu", "namespace": "ns1"}}
    p = plan(body, Observed(children={"Service": foreign}), NOW)
    assert "Service" not in by_kind(p)
    degraded = cond(p, "Degraded")
    assert degraded["status"] == "True" and degraded["reason"] == "ChildConflict"


def test_crash_looping_pod_degrades_with_the_pods_reason() -> None:
    body = cpu_body()
    first = plan(body, Observed(), NOW)
    observed = live(first, ready=0)
    observed.pods = [{
        "metadata": {"name": "smollm2-cpu-abc"},
        "status": {"phase": "Running", "containerStatuses": [{
            "name": "server", "restartCount": 4,
            "state": {"waiting": {"reason": "CrashLoopBackOff", "message": "back-off 40s restarting"}}}]},
    }, {
        "metadata": {"name": "smollm2-cpu-def"},
        "status": {"phase": "Pending", "conditions": [{
            "type": "PodScheduled", "status": "False", "reason": "Unschedulable",
            "message": "0/2 nodes are available: 2 Insufficient nvidia.com/gpu."}]},
    }]
    p = plan(with_status(body, first), observed, LATER)
    degraded = cond(p, "Degraded")
    assert degraded["reason"] == "CrashLoopBackOff"
    assert "smollm2-cpu-abc" in degraded["message"] and "Insufficient nvidia.com/gpu" in degraded["message"]
    assert ("Warning", "CrashLoopBackOff") in [(e.type, e.reason) for e in p.events]


def test_crash_loop_stays_degraded_while_the_container_is_briefly_running() -> None:
    body = cpu_body()
    first = plan(body, Observed(), NOW)
    observed = live(first, ready=0)
    observed.pods = [{"metadata": {"name": "smollm2-cpu-abc"}, "status": {"phase": "Running", "containerStatuses": [{
        "name": "server", "restartCount": 3, "ready": False, "state": {"running": {}},
        "lastState": {"terminated": {"exitCode": 1, "reason": "Error"}}}]}}]
    degraded = cond(plan(with_status(body, first), observed, LATER), "Degraded")
    assert degraded["status"] == "True" and "last exit code 1" in degraded["message"]
    observed.pods[0]["status"]["containerStatuses"][0]["ready"] = True  # it recovered
    assert cond(plan(with_status(body, first), observed, LATER), "Degraded")["status"] == "False"


def test_template_hash_is_stable_and_sensitive() -> None:
    a = by_kind(plan(cpu_body(), Observed(), NOW))["Deployment"]
    b = by_kind(plan(cpu_body(), Observed(), LATER))["Deployment"]
    assert a == b and a["spec"]["template"]["metadata"]["annotations"][TEMPLATE_HASH]
    c = by_kind(plan(cpu_body(image="example.com/fleetserve:2"), Observed(), NOW))["Deployment"]
    assert template_hash(c) != template_hash(a)
