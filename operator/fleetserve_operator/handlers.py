"""All kopf handlers of the operator, thin and with explicit ids.

Every handler calls :func:`fleetserve_operator.reconcile.execute.reconcile`,
which is level-triggered (observe → plan → execute, writes only differences
between the desired children and the live ones), so it does not matter which
event woke it: the spec changed (create, update, resume), a child changed or
vanished, or the periodic resync fired. Handlers register on :data:`registry`
(not kopf's global one), which ``fleetserve operator`` and
``KopfRunner(..., registry=registry)`` run.

No handler here needs a finalizer — no ``@kopf.daemon``, ``@kopf.timer`` or
``@kopf.on.delete`` — so deleting an LLMDeployment or its namespace never
waits for the operator. The periodic work (resync, the autoscaler) runs in
:class:`fleetserve_operator.fleets.Fleets`, one loop per operator process,
started and stopped by the LLMDeployment watch; kopf removes the finalizer an
older operator left on an object when it sees it.

Kubernetes API verbs the operator uses (the Helm chart's ClusterRole):

* ``fleetserve.io`` ``llmdeployments``: get, list, watch, patch
  (kopf's annotations, the removal of an older operator's finalizer, and ``spec.replicas``,
  which the autoscaler keeps equal to the size in effect); ``llmdeployments/status``: get, patch
* ``apps`` ``deployments``: get, list, watch, create + patch (server-side apply; an apply
  that creates the object is also authorized as create), delete (the router's, when
  ``spec.router.enabled`` turns false)
* core ``configmaps``: get, list, watch, create, patch; ``services``: the same and delete
* the router's identity (``spec.router``): core ``serviceaccounts`` and ``rbac.authorization.k8s.io``
  ``roles``, ``rolebindings``: get, create, patch, delete — and ``discovery.k8s.io``
  ``endpointslices``: list, watch, never called, only held so that the API server lets the
  operator grant them to the router's Role (RBAC escalation prevention)
* ``policy`` ``poddisruptionbudgets``: get, list, watch, create, patch, delete
* core ``pods``: get, list, watch (status and Degraded; the autoscaler scrapes pod IPs), patch
  (only the ``controller.kubernetes.io/pod-deletion-cost`` annotation, before a scale-down)
* core ``nodes``: list (cluster-wide; node ages order a scale-down so the newest node empties first)
* core ``events``: create (and ``events.k8s.io`` ``events``: create, which kopf uses)
* ``monitoring.coreos.com`` ``servicemonitors``, ``prometheusrules``: get, create, patch, delete
  (only used when those CRDs exist; discovery of ``/apis/monitoring.coreos.com/v1`` needs no grant)
* ``apiextensions.k8s.io`` ``customresourcedefinitions``: list, watch (kopf's resource discovery)
* core ``namespaces``: list, watch (kopf, only with ``--all-namespaces`` patterns)

The operator serves ``/healthz`` and ``/metrics`` on port 8080 (``--metrics-port``).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import kopf

from . import metrics
from .api.spec import GROUP, PLURAL, VERSION
from .fleets import Fleets
from .kube import Kube, KubeError, load_configuration
from .reconcile import locks
from .reconcile.cache import CHILDREN
from .reconcile.execute import reconcile
from .resources.labels import LABEL_INSTANCE, LABEL_MANAGED_BY, MANAGED_BY
from .status.conditions import set_condition

registry = kopf.OperatorRegistry()

RETRY_DELAY_SECONDS = 5
# The safety-net full reconcile of each LLMDeployment (see fleets.py). Slow on purpose: every change the
# operator must react to arrives by a watch, and each resync costs ~6 reads per LLMDeployment.
RESYNC_INTERVAL_SECONDS = 600.0
CHILD_LABELS = {LABEL_MANAGED_BY: MANAGED_BY}
CHILD_SELECTOR = f"{LABEL_MANAGED_BY}={MANAGED_BY}"
CHILD_WATCHES = (("apps", "v1", "deployments"), ("", "v1", "pods"), ("", "v1", "services"), ("", "v1", "configmaps"),
                 ("policy", "v1", "poddisruptionbudgets"))


@dataclass
class Options:
    """Process-wide settings the CLI (or a test) sets before the operator starts."""

    metrics_port: int = metrics.DEFAULT_METRICS_PORT  # 0 disables /metrics and /healthz
    metrics_host: str = "0.0.0.0"
    resync_seconds: float = RESYNC_INTERVAL_SECONDS  # full reconcile of every LLMDeployment this often


OPTIONS = Options()
_kube: Kube | None = None
_managed: set[tuple[str, str]] = set()


def kube() -> Kube:
    """The process's API client, created on first use from the environment."""
    global _kube
    if _kube is None:
        _kube = Kube.from_environment()
    return _kube


def _report_failure(namespace: str, name: str, reason: str, message: str) -> None:
    """Put a failure that the plan could not foresee into the Ready condition (best effort)."""
    client = kube()
    with locks.cr_lock(namespace, name):
        cr = client.get("LLMDeployment", namespace, name)
        if cr is None:
            return
        generation = int(cr["metadata"].get("generation") or 0)
        old = (cr.get("status") or {}).get("conditions") or []
        new = set_condition(old, "Ready", "False", reason, message, generation, datetime.now(UTC))
        if new != old:
            client.patch_status("LLMDeployment", namespace, name, {"conditions": new})
            client.post_event(cr, "Warning", reason, message)


def run_reconcile(namespace: str, name: str, trigger: str, coalesce: bool = False) -> None:
    """Reconcile with metrics, turning API failures into kopf's retry semantics.

    ``coalesce`` (child events, resync) skips the run when another one for the
    same LLMDeployment is already waiting: it will see the same or newer state.
    """
    started = time.perf_counter()
    try:
        # The resync reads every child from the API server: the safety net for what the watches missed.
        result = reconcile(kube(), namespace, name, coalesce=coalesce, fresh=trigger == "resync")
    except KubeError as exc:
        metrics.ERRORS.labels(namespace, name, "api_retriable" if exc.retriable else "api_rejected").inc()
        if exc.retriable:
            metrics.RECONCILES.labels(trigger, "retry").inc()
            raise kopf.TemporaryError(f"API server: {exc}; retrying", delay=RETRY_DELAY_SECONDS) from exc
        metrics.RECONCILES.labels(trigger, "rejected").inc()
        # The API server refused an object built from this spec: retrying the same spec cannot help.
        _report_failure(namespace, name, "ApplyRejected", f"the API server rejected a child object: {exc}")
        raise kopf.PermanentError(f"API server rejected a child: {exc}") from exc
    finally:
        metrics.DURATION.observe(time.perf_counter() - started)
    if result is not None:
        for obj in result.apply:
            metrics.APPLIES.labels(obj["kind"]).inc()
        if result.invalid:
            metrics.RECONCILES.labels(trigger, "invalid").inc()
            raise kopf.PermanentError(f"invalid spec: {result.invalid}")
    metrics.RECONCILES.labels(trigger, "success").inc()


@kopf.on.startup(registry=registry, id="configure")
async def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    # Kopf's bookkeeping goes into annotations: the status schema is strict and owned by us.
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="fleetserve.io")
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix="fleetserve.io", key="last-handled-configuration"
    )
    settings.persistence.finalizer = "fleetserve.io/finalizer"
    # Our own events say what happened; kopf's per-handler "succeeded" events would be noise.
    settings.posting.level = logging.WARNING
    settings.execution.max_workers = 16
    settings.watching.server_timeout = 300
    # Server-side label selectors on every child watch (kopf's labels= filters apply client-side, after
    # the API server streamed every Pod, Service, ConfigMap and Deployment of the watched namespaces).
    for group, version, plural in CHILD_WATCHES:
        settings.watching.label_selectors[group, version, plural] = CHILD_SELECTOR
    if OPTIONS.metrics_port:
        memo.metrics_runner = await metrics.start_http_server(OPTIONS.metrics_port, OPTIONS.metrics_host)
    # A fresh start knows no LLMDeployment yet: the watch's initial listing fills the table again.
    _managed.clear()
    CHILDREN.clear()  # and no child: the index handlers fill it before any resource handler runs
    metrics.MANAGED.set(0)
    memo.fleets = Fleets(kube, lambda ns, name, trigger, coalesce: run_reconcile(ns, name, trigger, coalesce),
                         OPTIONS.resync_seconds)


@kopf.on.login(registry=registry, id="login")
def login(**_: Any) -> kopf.ConnectionInfo:
    """In-cluster service account or $KUBECONFIG: the same credentials as :func:`kube`.

    (A registry of our own does not get kopf's fallback logins, so say it explicitly.)
    """
    cfg = load_configuration()
    header = cfg.get_api_key_with_prefix("BearerToken") or cfg.get_api_key_with_prefix("authorization")
    parts = header.split(" ", 1) if header else []
    scheme, token = (None, None) if not parts else (None, parts[0]) if len(parts) == 1 else (parts[0], parts[1])
    return kopf.ConnectionInfo(
        server=cfg.host,
        ca_path=cfg.ssl_ca_cert,
        insecure=not cfg.verify_ssl,
        username=cfg.username or None,
        password=cfg.password or None,
        scheme=scheme,
        token=token,
        certificate_path=cfg.cert_file,
        private_key_path=cfg.key_file,
    )


@kopf.on.cleanup(registry=registry, id="stop-metrics")
async def stop_metrics(memo: kopf.Memo, **_: Any) -> None:
    CHILDREN.clear()  # no watch feeds it any more
    fleets = getattr(memo, "fleets", None)
    if fleets is not None:
        await fleets.close()
    runner = getattr(memo, "metrics_runner", None)
    if runner is not None:
        await runner.cleanup()


@kopf.on.resume(GROUP, VERSION, PLURAL, registry=registry, id="reconcile-resume")
@kopf.on.create(GROUP, VERSION, PLURAL, registry=registry, id="reconcile-create")
@kopf.on.update(GROUP, VERSION, PLURAL, registry=registry, id="reconcile-spec", field="spec")
def reconcile_llmdeployment(name: str, namespace: str | None, reason: str, **_: Any) -> None:
    """The spec is new, changed, or the operator restarted: converge."""
    _cache_synced()
    run_reconcile(_ns(namespace), name, str(getattr(reason, "value", reason)))  # create, update, resume


@kopf.on.event(GROUP, VERSION, PLURAL, registry=registry, id="track-llmdeployments")
async def track(type: str, name: str, namespace: str | None, body: kopf.Body, memo: kopf.Memo,  # noqa: A002
                **_: Any) -> None:
    """Start, feed and stop the LLMDeployment's background loop (resync, autoscaler), and keep
    the managed-deployments gauge, the per-LLMDeployment series and the lock table in step with
    the cluster (a deleted LLMDeployment's series go with it)."""
    key = (_ns(namespace), name)
    fleets: Fleets | None = getattr(memo, "fleets", None)
    _cache_synced()  # before the fleet's autoscaler reads from it
    if type == "DELETED":
        _managed.discard(key)
        locks.forget(*key)
        metrics.forget_fleet(*key)
        if fleets is not None:
            fleets.forget(*key)
    else:
        _managed.add(key)
        if fleets is not None:
            fleets.track(*key, dict(body))
    metrics.MANAGED.set(len(_managed))


def _ns(namespace: str | None) -> str:
    if not namespace:  # LLMDeployments and their children are namespaced
        raise kopf.PermanentError("a namespaced object arrived without a namespace")
    return namespace


def _cache_synced() -> None:
    """Called by resource handlers only: kopf runs none of them before every index handler below
    has seen its kind's initial listing (kopf's ``operator_indexed``), so the cache is complete."""
    CHILDREN.synced = True


@kopf.index("apps", "v1", "deployments", registry=registry, id="cache-deployments", labels=CHILD_LABELS)
@kopf.index("", "v1", "pods", registry=registry, id="cache-pods", labels=CHILD_LABELS)
@kopf.index("", "v1", "services", registry=registry, id="cache-services", labels=CHILD_LABELS)
@kopf.index("", "v1", "configmaps", registry=registry, id="cache-configmaps", labels=CHILD_LABELS)
@kopf.index("policy", "v1", "poddisruptionbudgets", registry=registry, id="cache-pdbs", labels=CHILD_LABELS)
async def cache_child(body: kopf.Body, **_: Any) -> None:
    """Every listed, added or changed child goes into the cache the reconcile and the autoscaler
    read (reconcile/cache.py); the DELETED ones leave it in :func:`_child_event`. Nothing goes into
    kopf's own index (None)."""
    CHILDREN.put(body)


def _child_event(body: kopf.Body, namespace: str | None, trigger: str, logger: Any, deleted: bool = False) -> None:
    _cache_synced()
    if deleted:
        CHILDREN.forget(body)
    owner = (body.get("metadata", {}).get("labels") or {}).get(LABEL_INSTANCE)
    if not owner:
        return
    try:
        run_reconcile(_ns(namespace), owner, trigger, coalesce=True)
    except (kopf.TemporaryError, kopf.PermanentError) as exc:
        # Event handlers are not retried; the owner's own handlers and the resync are.
        logger.warning("reconcile of %s/%s after a %s event: %s", namespace, owner, trigger, exc)


@kopf.on.event("apps", "v1", "deployments", registry=registry, id="child-deployment", labels=CHILD_LABELS)
def deployment_changed(type: str, body: kopf.Body, namespace: str | None, logger: Any, **_: Any) -> None:  # noqa: A002
    """Roll-out progress and readiness come from the Deployment's status."""
    _child_event(body, namespace, "deployment", logger, deleted=type == "DELETED")


@kopf.on.event("", "v1", "pods", registry=registry, id="child-pod", labels=CHILD_LABELS)
def pod_changed(type: str, body: kopf.Body, namespace: str | None, logger: Any, **_: Any) -> None:  # noqa: A002
    """Crash loops and unschedulable pods become the Degraded condition."""
    _child_event(body, namespace, "pod", logger, deleted=type == "DELETED")


@kopf.on.event("", "v1", "services", registry=registry, id="child-service", labels=CHILD_LABELS)
@kopf.on.event("", "v1", "configmaps", registry=registry, id="child-configmap", labels=CHILD_LABELS)
@kopf.on.event("policy", "v1", "poddisruptionbudgets", registry=registry, id="child-pdb", labels=CHILD_LABELS)
def child_changed(type: str, body: kopf.Body, namespace: str | None, logger: Any, **_: Any) -> None:  # noqa: A002
    """Someone edited or deleted a child: put it back (a no-op read when it is our own write).
    PodDisruptionBudgets are watched too: the resync, the only other repair, runs every 10 minutes."""
    if type is not None:  # not the initial listing: the resume handler covers that
        _child_event(body, namespace, "child-changed" if type != "DELETED" else "child-deleted", logger,
                     deleted=type == "DELETED")

