"""The operator's per-LLMDeployment series, read back from prometheus_client's exposition.

Drives the real plan() on the example body and the real export function the
reconcile calls after its status patch; no cluster. Each test uses its own
LLMDeployment name, since the registry is process-wide.
"""

from __future__ import annotations

import copy
from datetime import UTC, datetime
from typing import Any

from fleetserve_operator import metrics
from fleetserve_operator.reconcile.execute import export_metrics
from fleetserve_operator.reconcile.plan import Observed, Plan, plan
from operator_fixtures import cpu_body
from prometheus_client.parser import text_string_to_metric_families

NOW = datetime(2026, 1, 1, tzinfo=UTC)


def samples(namespace: str, name: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """(sample name, sorted extra labels) -> value for every series of one LLMDeployment in /metrics."""
    out = {}
    for family in text_string_to_metric_families(metrics.render().decode()):
        for s in family.samples:
            if s.labels.get("namespace") == namespace and s.labels.get("name") == name:
                if s.name.endswith("_created"):
                    continue
                extra = tuple(sorted((k, v) for k, v in s.labels.items() if k not in ("namespace", "name")))
                out[(s.name, extra)] = s.value
    return out


def named(body: dict[str, Any], name: str) -> dict[str, Any]:
    body = copy.deepcopy(body)
    body["metadata"]["name"] = name
    return body


def observed(p: Plan, ready: int) -> Observed:
    """The cluster after ``p``: its children exist, the Deployment has ``ready`` pods ready."""
    children = {obj["kind"]: copy.deepcopy(obj) for obj in p.apply}
    dep = children["Deployment"]
    dep["metadata"]["generation"] = 1
    replicas = dep["spec"]["replicas"]
    dep["status"] = {"observedGeneration": 1, "replicas": replicas, "updatedReplicas": replicas,
                     "readyReplicas": ready, "availableReplicas": ready}
    return Observed(children=children, pods=[], monitoring_kinds=frozenset())


def reconciled(body: dict[str, Any], ready: int) -> tuple[dict[str, Any], Plan]:
    """Two plans: create, then the one that sees ``ready`` pods; returns the body as the second saw it."""
    first = plan(body, Observed(children={}, pods=[], monitoring_kinds=frozenset()), NOW)
    body = copy.deepcopy(body)
    body["status"] = dict(first.status or {})
    return body, plan(body, observed(first, ready), NOW)


def condition(values: dict[Any, float], type_: str) -> dict[str, float]:
    return {
        dict(labels)["status"]: v for (n, labels), v in values.items()
        if n == "fleetserve_operator_condition" and dict(labels)["type"] == type_
    }


def test_ready_max_desired_and_conditions_without_autoscaling() -> None:
    body = named(cpu_body(replicas=3, autoscaling={"enabled": False}), "m-static")
    cr, result = reconciled(body, ready=2)
    export_metrics(cr, result)
    got = samples("ns1", "m-static")
    assert got[("fleetserve_operator_ready_replicas", ())] == 2
    assert got[("fleetserve_operator_max_replicas", ())] == 3
    assert got[("fleetserve_operator_desired_replicas", ())] == 3
    # Every condition type appears with all three statuses, exactly one of them 1.
    assert condition(got, "Ready") == {"True": 0, "False": 1, "Unknown": 0}
    assert condition(got, "MemoryFits") == {"True": 1, "False": 0, "Unknown": 0}
    types = {dict(labels)["type"] for (n, labels), _ in got.items() if n == "fleetserve_operator_condition"}
    assert {"Ready", "Progressing", "MemoryFits", "Degraded"} <= types
    for type_ in types:
        assert sorted(condition(got, type_).values()) == [0, 0, 1], type_


def test_a_condition_transition_leaves_no_stale_one() -> None:
    body = named(cpu_body(replicas=2, autoscaling={"enabled": False}), "m-transition")
    cr, result = reconciled(body, ready=1)
    export_metrics(cr, result)
    assert condition(samples("ns1", "m-transition"), "Ready") == {"True": 0, "False": 1, "Unknown": 0}
    # All pods ready: the next reconcile flips Ready to True (a status patch on top of cr's status).
    cr2 = copy.deepcopy(cr)
    cr2["status"].update(result.status or {})
    first = plan(body, Observed(children={}, pods=[], monitoring_kinds=frozenset()), NOW)
    result2 = plan(cr2, observed(first, ready=2), NOW)
    assert result2.status is not None and "conditions" in result2.status
    export_metrics(cr2, result2)
    got = samples("ns1", "m-transition")
    assert condition(got, "Ready") == {"True": 1, "False": 0, "Unknown": 0}
    assert got[("fleetserve_operator_ready_replicas", ())] == 2


def test_autoscaling_on_exports_max_replicas_and_leaves_desired_to_the_autoscaler() -> None:
    body = named(cpu_body(autoscaling={"enabled": True, "minReplicas": 1, "maxReplicas": 7}), "m-auto")
    metrics.AUTOSCALER_DESIRED_REPLICAS.labels("ns1", "m-auto").set(5)  # the autoscaler's last decision
    cr, result = reconciled(body, ready=1)
    export_metrics(cr, result)
    got = samples("ns1", "m-auto")
    assert got[("fleetserve_operator_max_replicas", ())] == 7
    assert got[("fleetserve_operator_desired_replicas", ())] == 5


def test_invalid_spec_sets_conditions_but_not_spec_series() -> None:
    body = named(cpu_body(replicas=-1), "m-invalid")
    result = plan(body, Observed(children={}, pods=[], monitoring_kinds=frozenset()), NOW)
    assert result.invalid
    export_metrics(body, result)
    got = samples("ns1", "m-invalid")
    assert got[("fleetserve_operator_ready_replicas", ())] == 0
    assert condition(got, "Ready") == {"True": 0, "False": 1, "Unknown": 0}
    assert ("fleetserve_operator_max_replicas", ()) not in got
    assert ("fleetserve_operator_desired_replicas", ()) not in got


def test_forget_fleet_drops_only_that_llmdeployments_series() -> None:
    for name in ("m-gone", "m-stays"):
        cr, result = reconciled(named(cpu_body(replicas=1, autoscaling={"enabled": False}), name), ready=1)
        export_metrics(cr, result)
        metrics.ERRORS.labels("ns1", name, "api_retriable").inc()
        metrics.AUTOSCALER_SCALE_EVENTS.labels("ns1", name, "up").inc()
    assert samples("ns1", "m-gone")[("fleetserve_operator_reconcile_errors_total", (("error", "api_retriable"),))] == 1
    metrics.forget_fleet("ns1", "m-gone")
    assert samples("ns1", "m-gone") == {}
    stays = samples("ns1", "m-stays")
    assert stays[("fleetserve_operator_ready_replicas", ())] == 1
    assert stays[("fleetserve_operator_reconcile_errors_total", (("error", "api_retriable"),))] == 1
    assert condition(stays, "Ready") == {"True": 1, "False": 0, "Unknown": 0}
