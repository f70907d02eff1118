"""What the operator's ``/healthz`` and ``/readyz`` say, and the checks behind them.

``/healthz`` (liveness; the chart restarts the pod after ``failureThreshold`` failures) is 503 when

* the API server rejected the operator's credentials (401) on the last contact — at once;
* no API round trip succeeded for ``unhealthy_after`` seconds (a new cluster CA, an
  unreachable API server, RBAC taken away: whatever also stops the watch streams); the
  contact comes from the Lease renewals/attempts (every lease/3 s) or, without leader
  election, a SelfSubjectAccessReview for ``watch llmdeployments`` every few seconds, whose
  answer must also be "allowed";
* the reconcile workers are stuck: a no-op submitted to kopf's handler thread pool has
  not run for ``unhealthy_after`` seconds (all workers hang);
* and, implicitly, when kopf's event loop is wedged: the HTTP server runs on it, so the
  probe times out.

``/readyz`` is 200 for a standby that has API contact (Ready but idle: it only waits for
the Lease), and for the leader (or a process without leader election) once kopf finished its
startup and the LLMDeployment watch's first listing arrived; 503 otherwise.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from .kube import Kube, KubeError

log = logging.getLogger(__name__)

DEFAULT_UNHEALTHY_AFTER_SECONDS = 30.0


@dataclass
class Health:
    """Thread-safe record of the operator's last API contact, role and startup progress."""

    unhealthy_after: float = DEFAULT_UNHEALTHY_AFTER_SECONDS
    role: str = "starting"  # standby | leader | standalone
    started: bool = False  # kopf's startup finished and the watch listed the LLMDeployments
    _last_ok: float = field(default_factory=time.monotonic)
    _last_error: str = ""
    _rejected: bool = False
    _workers_pending_since: float | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def record_contact(self, error: KubeError | None) -> None:
        """One API round trip ended: None when it succeeded (any answer of the API server that is not a
        401/403 or a transport failure counts as contact)."""
        with self._lock:
            if error is None or error.status not in (0, 401, 403) and error.status < 500:
                self._last_ok = time.monotonic()
                self._rejected = False
                return
            self._last_error = str(error)
            self._rejected = error.status == 401

    def problems(self) -> list[str]:
        """Why the process is unhealthy; empty when healthy."""
        now = time.monotonic()
        found = []
        with self._lock:
            if self._rejected:
                found.append(f"the API server rejects the operator's credentials: {self._last_error}")
            elif now - self._last_ok > self.unhealthy_after:
                found.append(f"no API contact for {now - self._last_ok:.0f} s: {self._last_error}")
            pending = self._workers_pending_since
        if pending is not None and now - pending > self.unhealthy_after:
            found.append(f"reconcile workers stuck: a no-op waited {now - pending:.0f} s for a free worker")
        return found

    def readiness(self) -> tuple[bool, str]:
        if self.problems():
            return False, "unhealthy"
        if self.role == "standby":
            return True, "standby (not the leader: ready, idle)"
        if not self.started:
            return False, "starting"
        return True, self.role

    # --- the checks that run in the background ------------------------------------

    async def watch_workers(self, executor: concurrent.futures.Executor, period: float) -> None:
        """Submit a no-op to the reconcile thread pool every ``period`` seconds; record how long it waits."""
        loop = asyncio.get_running_loop()
        while True:
            self._workers_pending_since = time.monotonic()
            await loop.run_in_executor(executor, _noop)
            self._workers_pending_since = None
            await asyncio.sleep(period)

    def probe_api_forever(self, kube: Kube, namespace: str | None, period: float,
                          stop: threading.Event) -> None:
        """Without leader election: ask the API server every ``period`` s whether we may watch LLMDeployments."""
        while not stop.is_set():
            self.record_contact(probe_api(kube, namespace))
            stop.wait(period)


def _noop() -> None:
    return None


def probe_api(kube: Kube, namespace: str | None) -> KubeError | None:
    """A SelfSubjectAccessReview: authenticated (401 on bad credentials), allowed to every user, and its
    answer says whether the watch of LLMDeployments is still authorized (403-equivalent when not)."""
    attributes: dict[str, Any] = {"group": "fleetserve.io", "resource": "llmdeployments", "verb": "watch"}
    if namespace:
        attributes["namespace"] = namespace
    body = {"apiVersion": "authorization.k8s.io/v1", "kind": "SelfSubjectAccessReview",
            "spec": {"resourceAttributes": attributes}}
    try:
        review = kube.request("POST", "/apis/authorization.k8s.io/v1/selfsubjectaccessreviews", body=body,
                              content_type="application/json")
    except KubeError as exc:
        return exc
    if not (review.get("status") or {}).get("allowed"):
        where = f"in namespace {namespace}" if namespace else "cluster-wide"
        return KubeError(403, f"the operator may no longer watch llmdeployments {where}", "Forbidden")
    return None
