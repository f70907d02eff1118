"""The drift comparison: what counts as a change of a field fleetserve sets, and what does not."""

from __future__ import annotations

import copy

from fleetserve_operator.reconcile.drift import describe, differences
from fleetserve_operator.reconcile.plan import Observed, plan
from operator_fixtures import cpu_body
from test_operator_plan import NOW, live, with_status


def deployment() -> dict:
    p = plan(cpu_body(), Observed(), NOW)
    return copy.deepcopy(next(o for o in p.apply if o["kind"] == "Deployment"))


def test_defaults_and_other_managers_fields_are_no_drift() -> None:
    want = deployment()
    have = copy.deepcopy(want)
    c = have["spec"]["template"]["spec"]["containers"][0]
    c["terminationMessagePath"] = "/dev/termination-log"  # an API server default
    c["readinessProbe"]["successThreshold"] = 1
    have["spec"]["template"]["metadata"]["annotations"]["kubectl.kubernetes.io/restartedAt"] = "now"
    c["env"].append({"name": "INJECTED_BY_A_WEBHOOK", "value": "1"})
    have["status"] = {"replicas": 1}
    have["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"] = "2000m"  # "2" by value
    assert differences(want, have) == []


def test_changed_or_removed_fields_are_drift_and_named() -> None:
    want = deployment()
    have = copy.deepcopy(want)
    have["spec"]["template"]["spec"]["containers"][0]["image"] = "other:1"
    del have["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]
    have["spec"]["replicas"] = 3
    paths = differences(want, have)
    assert paths == ["spec.replicas", "spec.template.spec.containers[server].image",
                     "spec.template.spec.containers[server].readinessProbe"]
    text = describe(want, have, paths)
    assert "'other:1' -> 'ghcr.io/fleetserve/fleetserve:" in text and "(absent) -> {" in text


def test_a_hand_scaled_deployment_is_reverted_with_a_warning() -> None:
    body = cpu_body()
    first = plan(body, Observed(), NOW)
    observed = live(first, ready=1)
    observed.children["Deployment"]["spec"]["replicas"] = 3  # type: ignore[index]
    again = plan(with_status(body, first), observed, NOW)
    [dep] = [o for o in again.apply if o["kind"] == "Deployment"]
    assert dep["spec"]["replicas"] == 1
    [event] = [e for e in again.events if e.reason == "ScaledOutsideOperator"]
    assert event.type == "Warning" and "kubectl scale llmd/smollm2-cpu --replicas=3" in event.message
    assert not [e for e in again.events if e.reason == "Repaired"]


def test_an_edit_is_repaired_and_a_deletion_recreated_with_events() -> None:
    body = cpu_body()
    first = plan(body, Observed(), NOW)
    body = with_status(body, first)
    observed = live(first, ready=1)
    observed.children["ConfigMap"]["data"]["server.yaml"] = "model: x\n"  # type: ignore[index]
    observed.children["Service"] = None
    again = plan(body, observed, NOW)
    assert {o["kind"] for o in again.apply} == {"ConfigMap", "Service"}
    [event] = [e for e in again.events if e.reason == "Repaired"]
    assert event.type == "Warning"
    assert "restored ConfigMap smollm2-cpu-config: data.server.yaml" in event.message
    assert "recreated Service smollm2-cpu" in event.message
