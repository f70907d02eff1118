"""The children cache the reconcile and the autoscaler read instead of the API server."""

from __future__ import annotations

from typing import Any

from fleetserve_operator.reconcile.cache import ChildCache


def obj(kind: str, name: str, uid: str, namespace: str = "ns", **labels: str) -> dict[str, Any]:
    return {"kind": kind, "metadata": {"name": name, "namespace": namespace, "uid": uid, "labels": labels,
                                       "managedFields": [{"manager": "kubectl"}]}, "spec": {"n": 1}}


def test_put_get_and_deleted_events() -> None:
    cache = ChildCache()
    cache.put(obj("Service", "a", "u1"))
    got = cache.get("Service", "ns", "a")
    assert got is not None and got["metadata"]["uid"] == "u1"
    assert "managedFields" not in got["metadata"]
    assert cache.get("Service", "other", "a") is None and cache.get("ConfigMap", "ns", "a") is None
    cache.forget(obj("Service", "a", "u1"))
    assert cache.get("Service", "ns", "a") is None


def test_a_late_deleted_event_keeps_the_object_that_replaced_it() -> None:
    cache = ChildCache()
    cache.put(obj("Deployment", "a", "old"))
    cache.put(obj("Deployment", "a", "new"))  # deleted and created again; the new one's event came first
    cache.forget(obj("Deployment", "a", "old"))
    got = cache.get("Deployment", "ns", "a")
    assert got is not None and got["metadata"]["uid"] == "new"


def test_reads_are_copies() -> None:
    cache = ChildCache()
    cache.put(obj("Pod", "p", "u", app="x"))
    got = cache.get("Pod", "ns", "p")
    assert got is not None
    got["spec"]["n"] = 2
    cache.select("Pod", "ns", {"app": "x"})[0]["spec"]["n"] = 3
    again = cache.get("Pod", "ns", "p")
    assert again is not None and again["spec"]["n"] == 1


def test_select_by_labels() -> None:
    cache = ChildCache()
    cache.put(obj("Pod", "b", "u2", app="x", instance="one"))
    cache.put(obj("Pod", "a", "u1", app="x", instance="one"))
    cache.put(obj("Pod", "c", "u3", app="x", instance="two"))
    cache.put(obj("Pod", "d", "u4", namespace="elsewhere", app="x", instance="one"))
    names = [p["metadata"]["name"] for p in cache.select("Pod", "ns", {"app": "x", "instance": "one"})]
    assert names == ["a", "b"]
    assert cache.select("Pod", "ns", {"app": "y"}) == []


def test_a_fresh_read_drops_only_what_it_proves_gone() -> None:
    """A deletion the watch never reported (kopf re-listed after 410 Gone) is dropped by the resync's
    fresh read; an object the watch delivered while the read ran stays."""
    cache = ChildCache()
    cache.put(obj("Pod", "ghost", "g", app="x"))
    cache.put(obj("Pod", "alive", "a", app="x"))
    before = cache.select("Pod", "ns", {"app": "x"})
    cache.put(obj("Pod", "newer", "n", app="x"))  # arrived while the LIST ran, not in its answer
    cache.forget_gone("Pod", "ns", before, [obj("Pod", "alive", "a", app="x")])
    assert [p["metadata"]["name"] for p in cache.select("Pod", "ns", {"app": "x"})] == ["alive", "newer"]
    # A GET that found another object of the name (recreated): the cached uid is gone, the new one is kept.
    cache.put(obj("Service", "s", "old"))
    before_get = [cache.get("Service", "ns", "s")]
    cache.put(obj("Service", "s", "new"))
    cache.forget_gone("Service", "ns", [o for o in before_get if o], [obj("Service", "s", "new")])
    got = cache.get("Service", "ns", "s")
    assert got is not None and got["metadata"]["uid"] == "new"
    cache.forget_gone("Service", "ns", [got], [None])  # a GET answered 404
    assert cache.get("Service", "ns", "s") is None


def test_clear_unsyncs() -> None:
    cache = ChildCache()
    cache.put(obj("Service", "a", "u1"))
    cache.synced = True
    cache.clear()
    assert not cache.synced and cache.get("Service", "ns", "a") is None
