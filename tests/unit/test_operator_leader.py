"""The Lease algorithm (fleetserve_operator.leader) and the /healthz verdicts (fleetserve_operator.health).

The Lease store below keeps the API server's one rule that matters here: a write must carry the
resourceVersion it read, else 409. The dev-cluster tests (test_operator_leader_election.py) run the
same code against a real API server; these cover the paths that need a broken API server.
"""

from __future__ import annotations

import copy
import threading
from typing import Any

from fleetserve_operator.health import Health
from fleetserve_operator.kube import KubeError
from fleetserve_operator.leader import LeaderElector, Timing


class LeaseStore:
    """One namespace's Leases with optimistic concurrency; ``down`` makes every call fail like a lost API server."""

    def __init__(self) -> None:
        self.leases: dict[str, dict[str, Any]] = {}
        self.version = 0
        self.down = False
        self.timeout = 1.0
        self.lock = threading.Lock()

    def request(self, method: str, path: str, *, body: Any = None, **_: Any) -> dict[str, Any]:
        with self.lock:
            if self.down:
                raise KubeError(0, "connection refused", "Unreachable")
            name = path.rsplit("/", 1)[-1]
            if method == "GET":
                if name not in self.leases:
                    raise KubeError(404, "not found", "NotFound")
                return copy.deepcopy(self.leases[name])
            if method == "POST":
                name = body["metadata"]["name"]
                if name in self.leases:
                    raise KubeError(409, "exists", "AlreadyExists")
            elif self.leases[name]["metadata"]["resourceVersion"] != body["metadata"].get("resourceVersion"):
                raise KubeError(409, "the object has been modified", "Conflict")
            self.version += 1
            stored = copy.deepcopy(body)
            stored["metadata"]["resourceVersion"] = str(self.version)
            self.leases[name] = stored
            return copy.deepcopy(stored)


def elector(store: LeaseStore, identity: str, lost: list[str], lease: float = 3.0) -> LeaderElector:
    return LeaderElector(store, "ns", "fleetserve-operator", identity, Timing(lease),  # type: ignore[arg-type]
                         on_lost=lost.append)


def test_one_leader_and_a_standby_that_takes_over_only_after_the_lease_expires() -> None:
    store, lost = LeaseStore(), []
    a, b = elector(store, "a", lost), elector(store, "b", lost)
    assert a._attempt() and not b._attempt()
    assert store.leases["fleetserve-operator"]["spec"]["holderIdentity"] == "a"
    # a stops renewing (SIGKILL): b sees the same record until a whole lease duration passed on its clock.
    b._observed_at -= 2.9
    assert not b._attempt()
    b._observed_at -= 0.2
    assert b._attempt()
    spec = store.leases["fleetserve-operator"]["spec"]
    assert spec["holderIdentity"] == "b" and spec["leaseTransitions"] == 1
    assert not lost


def test_a_released_lease_is_taken_at_once() -> None:
    store, lost = LeaseStore(), []
    a, b = elector(store, "a", lost), elector(store, "b", lost)
    assert a._attempt()
    a._leader.set()
    a.release()
    assert store.leases["fleetserve-operator"]["spec"]["holderIdentity"] == ""
    assert b._attempt()


def test_leader_that_cannot_renew_gives_up_before_its_lease_expires() -> None:
    store, lost = LeaseStore(), []
    a = elector(store, "a", lost, lease=3.0)
    a.start()
    assert a.wait_until_leader(5)
    store.down = True
    renewed_last = a._last_renew
    a._thread.join(timeout=10)  # type: ignore[union-attr]
    assert lost and "could not renew" in lost[0]
    assert not a.is_leader()
    # It gave up at the renew deadline (2 s), before a standby could take the 3 s lease.
    assert a._last_renew == renewed_last


def test_leader_whose_lease_was_taken_stops() -> None:
    store, lost = LeaseStore(), []
    a = elector(store, "a", lost)
    a.start()
    assert a.wait_until_leader(5)
    with store.lock:
        store.leases["fleetserve-operator"]["spec"]["holderIdentity"] = "intruder"
        store.leases["fleetserve-operator"]["metadata"]["resourceVersion"] = "999"
    a._thread.join(timeout=10)  # type: ignore[union-attr]
    assert lost == ["Lease ns/fleetserve-operator is now held by intruder"]


def test_healthz_fails_at_once_on_rejected_credentials_and_after_the_threshold_without_contact() -> None:
    health = Health(unhealthy_after=30)
    health.record_contact(None)
    assert health.problems() == []
    health.record_contact(KubeError(409, "conflict"))  # an answer is contact
    assert health.problems() == []
    health.record_contact(KubeError(401, "Unauthorized", "Unauthorized"))
    assert "rejects the operator's credentials" in health.problems()[0]
    health.record_contact(None)
    health.record_contact(KubeError(0, "certificate verify failed", "Unreachable"))
    assert health.problems() == []  # not yet: one failure is not an outage
    health._last_ok -= 31
    assert "no API contact for 31 s: 0 Unreachable: certificate verify failed" in health.problems()[0]
    assert health.readiness() == (False, "unhealthy")


def test_readyz_standby_is_ready_leader_only_after_startup() -> None:
    health = Health()
    health.role = "standby"
    assert health.readiness() == (True, "standby (not the leader: ready, idle)")
    health.role = "leader"
    assert health.readiness() == (False, "starting")
    health.started = True
    assert health.readiness() == (True, "leader")
