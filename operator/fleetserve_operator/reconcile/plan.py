"""Plan: a pure function from an LLMDeployment and what exists to what must change.

``plan(cr, observed, now)`` reads nothing and writes nothing: it builds the
desired children, compares each with the live one — the applied-hash
annotation says whether the *spec* changed since the last apply, and a
field-by-field comparison (:mod:`.drift`) whether someone changed or deleted
the child since — and returns the objects to server-side apply, the ones to
delete, the status patch and the events. :mod:`.execute` carries it out.
Running it twice on the same inputs gives the same plan, and on the state its
own execution produced it gives an empty one — that is what makes the
reconcile level-triggered and safe to restart at any point.

The ServiceMonitor and PrometheusRule are *optional* children: they are
planned apart (``Plan.monitoring``), so that :mod:`.execute` can apply them
last and turn their failure into the ``MonitoringReady`` condition instead of
a failed reconcile.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import kopf
from pydantic import ValidationError

from ..api.spec import LLMDeploymentSpec, spec_from_body
from ..events import Event
from ..resources.hashing import applied_hash, stamp
from ..resources.labels import config_map_name, router_name, servers_service_name
from ..resources.monitoring import build_prometheus_rule, build_service_monitor
from ..resources.network import build_pdb, build_service, wants_pdb
from ..resources.router import (
    build_router_deployment,
    build_router_pdb,
    build_router_role,
    build_router_role_binding,
    build_router_service_account,
    build_servers_service,
    router_ready,
    wants_router_pdb,
)
from ..resources.server import build_config_map, build_deployment, template_hash
from ..status.compute import compute_status, invalid_spec_status, status_events, status_patch
from ..status.conditions import get_condition
from .drift import describe, differences
from .fit import MemoryFit, check_memory_fit

# Child slots in the order they are applied (the ConfigMap before the pods that mount it; the
# router's account before its pods). A slot is a kind, or ``Kind/role`` for a second object of a
# kind (``Deployment/router`` is ``<name>-router``): see :func:`slot_kind` and :func:`child_name`.
CHILD_KINDS = ("ConfigMap", "Service/servers", "Service", "Deployment", "PodDisruptionBudget",
               "ServiceAccount/router", "Role/router", "RoleBinding/router", "Deployment/router",
               "PodDisruptionBudget/router", "ServiceMonitor", "PrometheusRule")
MONITORING_KINDS = frozenset({"ServiceMonitor", "PrometheusRule"})
ROUTER_SLOTS = frozenset({"Service/servers", "ServiceAccount/router", "Role/router", "RoleBinding/router",
                          "Deployment/router", "PodDisruptionBudget/router"})


def slot_kind(slot: str) -> str:
    """The Kubernetes kind of a child slot (``Deployment/router`` -> ``Deployment``)."""
    return slot.split("/", 1)[0]


def child_name(slot: str, instance: str) -> str:
    """The object name of a child slot of LLMDeployment ``instance``."""
    if slot == "ConfigMap":
        return config_map_name(instance)
    if slot == "Service/servers":
        return servers_service_name(instance)
    if slot.endswith("/router"):
        return router_name(instance)
    return instance


@dataclass
class Observed:
    """What the operator read from the cluster for one LLMDeployment.

    ``children`` maps each kind of :data:`CHILD_KINDS` to the live object of
    the child's name, or None; ``monitoring_kinds`` holds the Prometheus
    Operator kinds whose CRDs exist.
    """

    children: dict[str, dict[str, Any] | None] = field(default_factory=dict)
    pods: list[dict[str, Any]] = field(default_factory=list)
    monitoring_kinds: frozenset[str] = frozenset()
    # optional kind -> (HTTP status, reason, message) of a read the API server refused
    unreadable: dict[str, tuple[int, str, str]] = field(default_factory=dict)
    # the slots read from the operator's watch cache, not by GET (read again before the plan writes them)
    cached: frozenset[str] = frozenset()


@dataclass
class Plan:
    """What to do. Empty ``apply``/``delete``, no ``status`` and no events: converged."""

    apply: list[dict[str, Any]] = field(default_factory=list)
    delete: list[dict[str, Any]] = field(default_factory=list)
    status: dict[str, Any] | None = None
    events: list[Event] = field(default_factory=list)
    replicas: int = 0
    fit: MemoryFit | None = None
    invalid: str | None = None
    monitoring: MonitoringPlan | None = None

    @property
    def converged(self) -> bool:
        monitoring_idle = self.monitoring is None or not (self.monitoring.apply or self.monitoring.delete)
        return not self.apply and not self.delete and self.status is None and monitoring_idle


@dataclass
class MonitoringPlan:
    """The optional children's part of a plan, executed after everything else.

    ``wanted`` lists the kinds the spec asks for whose CRDs exist; ``conflicts``
    names objects of those kinds that exist and belong to someone else.
    """

    apply: list[dict[str, Any]] = field(default_factory=list)
    delete: list[dict[str, Any]] = field(default_factory=list)
    wanted: list[str] = field(default_factory=list)
    requested: list[str] = field(default_factory=list)
    conflicts: list[str] = field(default_factory=list)
    unreadable: dict[str, tuple[int, str, str]] = field(default_factory=dict)


def plan_replicas(spec: LLMDeploymentSpec, status: dict[str, Any] | None) -> int:
    """Replicas the Deployment should have.

    Autoscaling off: ``spec.replicas`` (which an HPA/KEDA may drive through the
    scale subresource). On: the autoscaler's ``status.desiredReplicas``, or
    ``minReplicas`` until it has decided, always within [min, max].
    """
    auto = spec.autoscaling
    if not auto.enabled:
        return spec.replicas
    desired = (status or {}).get("desiredReplicas")
    # Until the autoscaler has decided: minReplicas, but one replica warm when that is 0 (it scales to
    # zero after the scale-down window without traffic).
    wanted = desired if isinstance(desired, int) else max(auto.min_replicas, 1)
    return max(auto.min_replicas, min(auto.max_replicas, wanted))


def _owned_by(obj: dict[str, Any], uid: str) -> bool:
    refs = (obj.get("metadata") or {}).get("ownerReferences") or []
    return any(ref.get("uid") == uid for ref in refs)


def desired_children(
    cr: dict[str, Any], spec: LLMDeploymentSpec, fit: MemoryFit, replicas: int, observed: Observed
) -> dict[str, dict[str, Any] | None]:
    """Every child kind -> its desired manifest (adopted by ``cr``), or None when it must not exist."""
    meta = cr["metadata"]
    name, namespace = meta["name"], meta["namespace"]
    out: dict[str, dict[str, Any] | None] = dict.fromkeys(CHILD_KINDS)
    out["ConfigMap"] = build_config_map(name, namespace, spec, fit)
    # The Service turns to the router once a router pod is ready (and back at once when it is
    # switched off), so clients never face a Service with no endpoint while the router starts.
    out["Service"] = build_service(name, namespace, via_router=routes_via_router(spec, observed))
    if spec.router.enabled:
        out["Service/servers"] = build_servers_service(namespace, name)
        out["ServiceAccount/router"] = build_router_service_account(namespace, name)
        out["Role/router"] = build_router_role(namespace, name)
        out["RoleBinding/router"] = build_router_role_binding(namespace, name)
        out["Deployment/router"] = build_router_deployment(namespace, name, spec)
        if wants_router_pdb(spec):
            out["PodDisruptionBudget/router"] = build_router_pdb(namespace, name)
    if fit.status != "False":
        out["Deployment"] = build_deployment(name, namespace, spec, fit, replicas)
        if wants_pdb(replicas):
            out["PodDisruptionBudget"] = build_pdb(name, namespace)
    elif observed.children.get("Deployment") is not None:
        # It cannot fit (any more): keep the object, run no pod.
        out["Deployment"] = build_deployment(name, namespace, spec, fit, 0)
    if "ServiceMonitor" in observed.monitoring_kinds and spec.monitoring.service_monitor:
        out["ServiceMonitor"] = build_service_monitor(name, namespace, spec.autoscaling.scrape_interval_seconds,
                                                      router=spec.router.enabled)
    if "PrometheusRule" in observed.monitoring_kinds and spec.monitoring.prometheus_rule:
        out["PrometheusRule"] = build_prometheus_rule(
            name, namespace, spec.engine.max_queue_length,
            servers_service=servers_service_name(name) if spec.router.enabled else None)
    for obj in out.values():
        if obj is not None:
            # Owner reference only: kopf.adopt() would also copy every label of the CR into the
            # children and the pod template, so relabelling it (or a Helm chart bump) rolled the pods.
            kopf.append_owner_reference(obj, owner=cr)  # type: ignore[arg-type]
    return out


def routes_via_router(spec: LLMDeploymentSpec, observed: Observed) -> bool:
    """Whether Service ``<name>`` selects the router pods: the router is on and one of its pods is
    ready (or the Service already points at it)."""
    if not spec.router.enabled:
        return False
    live = observed.children.get("Service") or {}
    already = ((live.get("spec") or {}).get("selector") or {}).get("app.kubernetes.io/name") == "fleetserve-router"
    return already or router_ready(observed.children.get("Deployment/router")) > 0


def plan(cr: dict[str, Any], observed: Observed, now: datetime) -> Plan:
    """The whole reconcile decision for one LLMDeployment."""
    meta = cr["metadata"]
    generation = int(meta.get("generation") or 0)
    current_status: dict[str, Any] = dict(cr.get("status") or {})
    try:
        spec = spec_from_body(cr)
    except ValidationError as exc:
        message = _describe_validation_error(exc)
        new = invalid_spec_status(current_status, message, generation, now)
        patch = status_patch(current_status, new)
        return Plan(status=patch, events=status_events(current_status, new), invalid=message)

    fit = check_memory_fit(spec)
    replicas = plan_replicas(spec, current_status)
    result = Plan(replicas=replicas, fit=fit, monitoring=MonitoringPlan(
        wanted=[k for k in MONITORING_KINDS_ORDER if _requested(spec, k) and k in observed.monitoring_kinds],
        requested=[k for k in MONITORING_KINDS_ORDER if _requested(spec, k)]))
    assert result.monitoring is not None
    conflicts: list[str] = []
    created: list[str] = []
    updated: list[str] = []
    repaired: list[str] = []
    desired = desired_children(cr, spec, fit, replicas, observed)
    for kind in CHILD_KINDS:
        optional = kind in MONITORING_KINDS
        applies, deletes = (result.monitoring.apply, result.monitoring.delete) if optional else (
            result.apply, result.delete)
        want, live = desired[kind], observed.children.get(kind)
        if optional and kind in observed.unreadable:
            if want is not None:  # cannot even read it (e.g. 403 on get): MonitoringReady says so
                result.monitoring.unreadable[kind] = observed.unreadable[kind]
            continue
        if live is not None and not _owned_by(live, meta["uid"]):
            if want is not None:
                text = f"{slot_kind(kind)} {live['metadata']['name']} exists and is not owned by this LLMDeployment"
                (result.monitoring.conflicts if optional else conflicts).append(text)
            continue
        if want is None:
            if live is not None and (not optional or kind in observed.monitoring_kinds):
                deletes.append(live)
            continue
        stamped = stamp(want)
        if live is None:
            applies.append(stamped)
            if _recreated(kind, cr, observed, replicas):
                repaired.append(f"recreated {slot_kind(kind)} {want['metadata']['name']} (it was deleted)")
            else:
                created.append(kind if "/" not in kind else f"{slot_kind(kind)} {want['metadata']['name']}")
        elif applied_hash(live) != applied_hash(stamped):
            applies.append(stamped)
            updated.append(_describe_update(kind, live, stamped))
        else:
            drift = differences(stamped, live)
            if drift:
                applies.append(stamped)
                if kind == "Deployment" and "spec.replicas" in drift:
                    drift.remove("spec.replicas")
                    result.events.append(_scaled_outside(cr, spec, live, replicas))
                if drift:
                    repaired.append(f"restored {slot_kind(kind)} {want['metadata']['name']}: "
                                    f"{describe(stamped, live, drift)}")
    if created:
        result.events.append(Event("Normal", "Created", "created " + ", ".join(created)))
    if updated:
        result.events.append(Event("Normal", "Updated", "updated " + "; ".join(updated)))
    if repaired:
        result.events.append(Event("Warning", "Repaired", "changed outside the operator, put back: "
                                   + "; ".join(repaired)))

    new = compute_status(
        cr, spec, fit, replicas,
        deployment=observed.children.get("Deployment"),
        router=observed.children.get("Deployment/router"),
        via_router=routes_via_router(spec, observed),
        pods=observed.pods,
        conflicts=conflicts,
        rolling=bool(updated or created or result.apply),
        now=now,
    )
    result.status = status_patch(current_status, new)
    result.events.extend(status_events(current_status, new))
    return result


MONITORING_KINDS_ORDER = ("ServiceMonitor", "PrometheusRule")


def _requested(spec: LLMDeploymentSpec, kind: str) -> bool:
    return spec.monitoring.service_monitor if kind == "ServiceMonitor" else spec.monitoring.prometheus_rule


def _recreated(kind: str, cr: dict[str, Any], observed: Observed, replicas: int) -> bool:
    """Whether a missing child existed before at this generation (someone deleted it), rather
    than being new: the spec was reconciled already, and nothing since asks for a new child."""
    meta, status = cr["metadata"], cr.get("status") or {}
    if status.get("observedGeneration") != meta.get("generation"):
        return False
    if kind in ROUTER_SLOTS:
        if get_condition(status.get("conditions"), "RouterReady") is None:
            return False  # the router was just switched on
        return kind != "PodDisruptionBudget/router" or observed.children.get("Deployment/router") is not None
    if kind in ("ConfigMap", "Service", "Deployment"):
        return True
    if kind == "PodDisruptionBudget":
        deployment = observed.children.get("Deployment") or {}
        return bool((deployment.get("spec") or {}).get("replicas") == replicas)
    monitoring = get_condition(status.get("conditions"), "MonitoringReady") or {}
    return monitoring.get("status") == "True" and monitoring.get("reason") == "Applied"


def _scaled_outside(cr: dict[str, Any], spec: LLMDeploymentSpec, live: dict[str, Any], replicas: int) -> Event:
    name = cr["metadata"]["name"]
    was = (live.get("spec") or {}).get("replicas")
    if spec.autoscaling.enabled:
        why = (f"the autoscaler's decision (status.desiredReplicas); to change the size, change "
               f"autoscaling.minReplicas/maxReplicas on llmd/{name}, or set autoscaling.enabled: false "
               f"and kubectl scale llmd/{name} --replicas={was}")
    else:
        why = f"spec.replicas of the LLMDeployment; scale the LLMDeployment instead: kubectl scale llmd/{name} --replicas={was}"
    return Event("Warning", "ScaledOutsideOperator",
                 f"Deployment {name} was scaled to {was} outside the operator; reverted to {replicas}, {why}")


def _describe_update(kind: str, live: dict[str, Any], desired: dict[str, Any]) -> str:
    if kind in ("Deployment", "Deployment/router"):
        old_hash, new_hash = template_hash(live), template_hash(desired)
        old_replicas = (live.get("spec") or {}).get("replicas")
        parts = []
        if old_hash != new_hash:
            parts.append(f"pod template {old_hash} -> {new_hash} (rolling the pods)")
        if old_replicas != desired["spec"]["replicas"]:
            parts.append(f"replicas {old_replicas} -> {desired['spec']['replicas']}")
        which = "Deployment" if kind == "Deployment" else f"Deployment {desired['metadata']['name']}"
        return f"{which}: " + (", ".join(parts) or "metadata")
    return kind if "/" not in kind else f"{slot_kind(kind)} {desired['metadata']['name']}"


def _describe_validation_error(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"])
        parts.append(f"spec.{loc}: {err['msg']}" if loc else err["msg"])
    return "; ".join(parts)
