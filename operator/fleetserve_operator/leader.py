"""Leader election on a coordination.k8s.io/v1 Lease, so that two operator replicas never both reconcile.

kopf's peering only pauses the other operators when it notices them; it does not
guarantee that one replica alone acts. This is client-go's algorithm instead:

* A candidate takes the Lease when it is free (no holder: released on a clean
  exit), absent, or when the record has not changed for ``lease_duration`` as
  measured on the candidate's own monotonic clock since it last saw it change
  (so clocks of different machines never matter). Every write carries the
  resourceVersion it read: two candidates racing for one Lease get one 200 and
  one 409.
* The leader renews every ``retry_period`` (a third of the lease); a standby reads the Lease every
  ``standby_period`` (2 s at 15 s). If no renewal succeeded for
  ``renew_deadline`` (< ``lease_duration``), or the Lease names another holder,
  leadership is lost: :attr:`LeaderElector.on_lost` runs (the CLI exits the
  process at once, non-zero), before any standby can take the Lease over.

The elector runs in a thread of its own with its own API client: a busy event
loop or a full reconcile thread pool never delays a renewal.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from .kube import Kube, KubeError

log = logging.getLogger(__name__)

LEASE_API = "/apis/coordination.k8s.io/v1"
DEFAULT_LEASE_NAME = "fleetserve-operator"
DEFAULT_LEASE_DURATION_SECONDS = 15.0


def _micro_time(moment: datetime) -> str:
    """A Lease's MicroTime (RFC 3339 with microseconds, UTC)."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass(frozen=True)
class Timing:
    """Lease duration, renew deadline, renew and standby periods, in seconds (15/10/5/2 by default)."""

    lease_duration: float = DEFAULT_LEASE_DURATION_SECONDS

    def __post_init__(self) -> None:
        if self.lease_duration < 3:
            raise ValueError(f"--lease-duration must be at least 3 seconds, got {self.lease_duration:g}")

    @property
    def renew_deadline(self) -> float:
        """The leader gives up when it could not renew for this long: a third of a lease before it expires."""
        return self.lease_duration * 2 / 3

    @property
    def retry_period(self) -> float:
        """The leader renews this often (two tries before the renew deadline)."""
        return self.lease_duration / 3

    @property
    def standby_period(self) -> float:
        """A standby reads the Lease this often (client-go's 2 s at 15 s): it notices the last renewal, and
        so the expiry, at most this late (a read is one GET; a renewal is a GET and a PUT)."""
        return max(0.5, self.lease_duration * 2 / 15)


class LeaderElector:
    """Acquires and holds one Lease ``namespace/name`` as ``identity``.

    Invariants: :meth:`is_leader` is true only between a successful acquire and
    the first failed renewal deadline (or :meth:`release`); ``on_lost`` runs at
    most once. ``on_contact(ok, error)`` is called after every API round trip
    (the operator's /healthz uses it as its proof of API contact).
    """

    def __init__(self, kube: Kube, namespace: str, name: str, identity: str, timing: Timing,
                 on_lost: Callable[[str], None],
                 on_contact: Callable[[KubeError | None], None] = lambda _e: None) -> None:
        self.kube = kube
        self.namespace = namespace
        self.name = name
        self.identity = identity
        self.timing = timing
        self.on_lost = on_lost
        self.on_contact = on_contact
        self._leader = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        # What this candidate last saw of the Lease: its resourceVersion and when (monotonic).
        self._observed_version: str | None = None
        self._observed_at = 0.0
        self._last_renew = 0.0
        self.holder: str | None = None  # the holder named by the last Lease read

    @property
    def path(self) -> str:
        return f"{LEASE_API}/namespaces/{self.namespace}/leases/{self.name}"

    def is_leader(self) -> bool:
        return self._leader.is_set()

    # --- the loop ------------------------------------------------------------------

    def start(self) -> None:
        """Campaign (and, once leader, renew) in a daemon thread."""
        self._thread = threading.Thread(target=self._run, name="leader-election", daemon=True)
        self._thread.start()

    def wait_until_leader(self, timeout: float | None = None) -> bool:
        return self._leader.wait(timeout)

    def _run(self) -> None:
        period = self.timing.retry_period
        while not self._stop.is_set():
            if not self._leader.is_set():
                if self._attempt():
                    self._last_renew = time.monotonic()
                    self._leader.set()
                    log.info("leader election: %s now holds Lease %s/%s", self.identity, self.namespace, self.name)
                # Jitter: standbys started together do not hit the API server in step.
                self._stop.wait(self.timing.standby_period * random.uniform(1.0, 1.2))
                continue
            renewed = self._attempt()
            if self._stop.is_set():
                return
            now = time.monotonic()
            if renewed:
                self._last_renew = now
            elif self.holder not in (None, self.identity):
                self._lose(f"Lease {self.namespace}/{self.name} is now held by {self.holder}")
                return
            elif now - self._last_renew >= self.timing.renew_deadline:
                self._lose(f"could not renew Lease {self.namespace}/{self.name} for "
                           f"{now - self._last_renew:.1f} s (renew deadline {self.timing.renew_deadline:g} s)")
                return
            # After a failed renewal retry sooner, but never past the renew deadline.
            wait = period if renewed else min(period / 2, max(0.1, self._last_renew + self.timing.renew_deadline - now))
            self._stop.wait(wait)

    def _lose(self, why: str) -> None:
        self._leader.clear()
        log.error("leader election: lost leadership: %s", why)
        self.on_lost(why)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=self.timing.retry_period + self.kube.timeout)

    def release(self) -> None:
        """Stop, and if leader, hand the Lease back so a standby takes over at once (a clean exit)."""
        was_leader = self._leader.is_set()
        self.stop()
        if not was_leader:
            return
        self._leader.clear()
        try:
            lease = self.kube.request("GET", self.path)
            if (lease.get("spec") or {}).get("holderIdentity") != self.identity:
                return
            lease["spec"]["holderIdentity"] = ""
            lease["spec"]["leaseDurationSeconds"] = 1
            self.kube.request("PUT", self.path, body=lease, content_type="application/json")
            log.info("leader election: released Lease %s/%s", self.namespace, self.name)
        except KubeError as exc:
            log.warning("leader election: could not release Lease %s/%s: %s (a standby takes over when it "
                        "expires)", self.namespace, self.name, exc)

    # --- one attempt -----------------------------------------------------------------

    def _attempt(self) -> bool:
        """Acquire or renew once; False when another holder's lease is still valid or on any API error."""
        try:
            acquired = self._try_acquire_or_renew()
        except KubeError as exc:
            self.on_contact(exc)
            if exc.status != 409:  # a 409 is a lost race, not trouble
                log.warning("leader election: Lease %s/%s: %s", self.namespace, self.name, exc)
            return False
        self.on_contact(None)
        return acquired

    def _try_acquire_or_renew(self) -> bool:
        now = datetime.now(UTC)
        try:
            lease: dict[str, Any] | None = self.kube.request("GET", self.path)
        except KubeError as exc:
            if exc.status != 404:
                raise
            lease = None
        if lease is None:
            self.kube.request("POST", f"{LEASE_API}/namespaces/{self.namespace}/leases",
                              body=self._record(None, now), content_type="application/json")
            self.holder = self.identity
            return True
        spec = lease.get("spec") or {}
        self.holder = spec.get("holderIdentity") or None
        version = lease["metadata"].get("resourceVersion")
        if version != self._observed_version:
            self._observed_version = version
            self._observed_at = time.monotonic()
        if self.holder and self.holder != self.identity:
            duration = float(spec.get("leaseDurationSeconds") or self.timing.lease_duration)
            if time.monotonic() < self._observed_at + duration:
                return False  # another holder's lease is still valid
            log.info("leader election: Lease %s/%s of %s expired (unchanged for %.0f s)",
                     self.namespace, self.name, self.holder, time.monotonic() - self._observed_at)
        lease["spec"] = self._record(spec, now)["spec"]
        updated = self.kube.request("PUT", self.path, body=lease, content_type="application/json")
        self._observed_version = updated["metadata"].get("resourceVersion")
        self._observed_at = time.monotonic()
        self.holder = self.identity
        return True

    def _record(self, old: dict[str, Any] | None, now: datetime) -> dict[str, Any]:
        """The Lease as this candidate writes it: renewTime now; acquireTime and transitions on a change of hands."""
        old = old or {}
        same_holder = old.get("holderIdentity") == self.identity
        spec = {
            "holderIdentity": self.identity,
            "leaseDurationSeconds": max(1, round(self.timing.lease_duration)),
            "acquireTime": old.get("acquireTime") if same_holder and old.get("acquireTime") else _micro_time(now),
            "renewTime": _micro_time(now),
            "leaseTransitions": int(old.get("leaseTransitions") or 0) + (0 if same_holder or not old else 1),
        }
        return {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                "metadata": {"name": self.name, "namespace": self.namespace}, "spec": spec}
