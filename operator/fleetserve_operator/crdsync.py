"""The operator brings its own CRD up to date at start (``fleetserve operator --apply-crd``).

Helm installs ``crds/`` on the first install only and never upgrades it, so
after ``helm upgrade`` the new operator would run against the old schema: a
new spec field is pruned by the API server before the operator ever sees it.
With ``--apply-crd`` (the chart's default, ``operator.applyCRD``) the operator
server-side applies the CRD it was built with before it starts watching, then
waits until the API server serves it. It never downgrades: the CRD carries
the version of the operator that applied it, and an older operator (e.g. the
old pod of a rolling upgrade, or a rollback) leaves a newer CRD alone.

RBAC: ``get`` and ``patch`` on ``customresourcedefinitions`` for the one name
``llmdeployments.fleetserve.io`` (the chart's ClusterRole, ``resourceNames``);
creating the CRD stays with ``helm install`` (``crds/``).
"""

from __future__ import annotations

import logging
import re
import time
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from .api.crd import CRD_NAME, build_crd
from .kube import Kube, KubeError

log = logging.getLogger(__name__)

VERSION_ANNOTATION = "fleetserve.io/operator-version"
CRD_FIELD_MANAGER = "fleetserve-operator-crd"
CRD_PATH = f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{CRD_NAME}"


def operator_version() -> str:
    try:
        return version("fleetserve")
    except PackageNotFoundError:
        return "0.0.0"


def _release(text: str | None) -> tuple[int, ...] | None:
    """The numeric release of ``1.2.3`` (``1.2.3rc1``, ``v1.2``): None when it has none."""
    match = re.match(r"^v?(\d+(?:\.\d+)*)", text or "")
    return tuple(int(part) for part in match.group(1).split(".")) if match else None


def is_newer(live: str | None, ours: str) -> bool:
    """True when the live CRD was applied by a newer operator than ``ours`` (never for unknown versions)."""
    theirs, mine = _release(live), _release(ours)
    return theirs is not None and mine is not None and theirs > mine


def desired_crd(ours: str) -> dict[str, Any]:
    crd = build_crd()
    crd["metadata"]["annotations"] = {VERSION_ANNOTATION: ours}
    return crd


def apply_own_crd(kube: Kube, ours: str | None = None, timeout_seconds: float = 60.0) -> str:
    """Apply the CRD this operator was built with; returns what it did, for the log.

    Raises :class:`KubeError` when the API refuses (403 without the chart's grant,
    404 when the CRD was never installed) so the operator does not start against
    a schema it cannot rely on.
    """
    ours = ours or operator_version()
    try:
        live = kube.request("GET", CRD_PATH)
    except KubeError as exc:
        if exc.status == 404:
            raise KubeError(404, f"CRD {CRD_NAME} is not installed: install the chart (its crds/) or "
                                 "`kubectl apply --server-side -f crds/` first", "NotFound") from None
        raise
    live_version = ((live.get("metadata") or {}).get("annotations") or {}).get(VERSION_ANNOTATION)
    if is_newer(live_version, ours):
        return f"CRD {CRD_NAME} left as it is: applied by operator {live_version}, newer than {ours}"
    kube.request("PATCH", CRD_PATH, query=[("fieldManager", CRD_FIELD_MANAGER), ("force", "true")],
                 body=desired_crd(ours), content_type="application/apply-patch+yaml")
    deadline = time.monotonic() + timeout_seconds
    while True:
        crd = kube.request("GET", CRD_PATH)
        conditions = {c.get("type"): c.get("status") for c in (crd.get("status") or {}).get("conditions") or []}
        if conditions.get("Established") == "True" and conditions.get("NamesAccepted") == "True":
            return f"CRD {CRD_NAME} applied (operator {ours}, was {live_version or 'unmarked'})"
        if time.monotonic() > deadline:
            raise KubeError(0, f"CRD {CRD_NAME} not Established {timeout_seconds:g}s after the apply: {conditions}",
                            "Timeout")
        time.sleep(0.5)
