"""The dev cluster's informer (watch.py) on the real API server, and what the node agent and the proxy
cost the API server now that they watch instead of listing several times a second.

Informer tests use ConfigMaps, Events or Pods in the test's own namespace; expiry is provoked for real:
the test compacts etcd through etcd's own API (with the API server's etcd client certificate) past the
version the informer resumes from, so the API server answers 410.
"""

from __future__ import annotations

import http.client
import json
import ssl
import time
from pathlib import Path
from typing import Any

import pytest
from fleetserve_devcluster import pki
from fleetserve_devcluster.agent import REQUESTS_FILE
from fleetserve_devcluster.controlplane import ClusterConfig
from fleetserve_devcluster.kube import Kube, ns_path
from fleetserve_devcluster.testing import DevClusterHandle
from fleetserve_devcluster.watch import Informer, ObjectCache
from nodeagent_util import wait_until


@pytest.fixture
def kube(dev_cluster: DevClusterHandle, tmp_path: Path) -> Kube:
    return Kube.from_kubeconfig(dev_cluster.kubeconfig, secrets_dir=tmp_path / "kube")


def _configmap(cluster: DevClusterHandle, namespace: str, name: str, value: str) -> None:
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name}, "data": {"v": value}}))


def _value(informer: Informer, key: str) -> str | None:
    obj = informer.get(key)
    return None if obj is None else str((obj.get("data") or {}).get("v"))


def _etcd_compact(cluster: DevClusterHandle, revision: int) -> dict[str, Any]:
    """Compact etcd's history below `revision` through etcd's v3 JSON gateway, as the API server's
    etcd client (the API server itself compacts every 5 minutes)."""
    config = ClusterConfig.load(cluster.state_dir)
    body = json.dumps({"revision": str(revision), "physical": True})
    conn: http.client.HTTPConnection
    if config.etcd_tls:
        paths = pki.PKIPaths(cluster.state_dir / "pki")
        ctx = ssl.create_default_context(cafile=str(paths.crt(pki.ETCD_CA)))
        ctx.load_cert_chain(str(paths.crt("apiserver-etcd-client")), str(paths.key("apiserver-etcd-client")))
        conn = http.client.HTTPSConnection("127.0.0.1", config.ports["etcd"], timeout=30, context=ctx)
    else:
        conn = http.client.HTTPConnection("127.0.0.1", config.ports["etcd"], timeout=30)
    try:
        conn.request("POST", "/v3/kv/compaction", body=body, headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        answer = json.loads(resp.read() or b"{}")
    finally:
        conn.close()
    # Already compacted further (by the API server): fine, the revision is gone either way.
    assert resp.status == 200 or "compacted" in json.dumps(answer), (resp.status, answer)
    return dict(answer)


def test_informer_follows_adds_changes_and_deletes_through_one_list(dev_cluster: DevClusterHandle,
                                                                     namespace: str, kube: Kube) -> None:
    _configmap(dev_cluster, namespace, "before", "0")
    informer = Informer(kube, ns_path(namespace, "configmaps"), name="test configmaps").start()
    try:
        wait_until(informer.synced.is_set, 30, "the first list")
        assert _value(informer, f"{namespace}/before") == "0"
        seen = informer.changes.count
        _configmap(dev_cluster, namespace, "a", "1")
        # A consumer waiting for a change is woken by it (the timeout is only a bound on a hang).
        assert informer.changes.wait(seen, 60) != seen
        wait_until(lambda: _value(informer, f"{namespace}/a") == "1", 30, "ADDED a")
        _configmap(dev_cluster, namespace, "a", "2")
        wait_until(lambda: _value(informer, f"{namespace}/a") == "2", 30, "MODIFIED a")
        dev_cluster.kubectl("delete", "configmap", "a", "-n", namespace)
        wait_until(lambda: informer.get(f"{namespace}/a") is None, 30, "DELETED a")
        assert informer.get(f"{namespace}/before") is not None
        # All of it came through the watch: one list, no re-list, no error.
        assert informer.stats["lists"] == 1 and informer.stats["errors"] == 0, informer.stats
        assert kube.counts["LIST configmaps"] == 1 and kube.counts["WATCH configmaps"] >= 1, kube.counts
        assert informer.stats["events"] >= 3
    finally:
        informer.stop()


def _event(kube: Kube, namespace: str, name: str, message: str) -> None:
    kube.create(ns_path(namespace, "events"), {
        "apiVersion": "v1", "kind": "Event", "metadata": {"name": name}, "type": "Normal", "reason": "Test",
        "message": message, "involvedObject": {"apiVersion": "v1", "kind": "Pod", "namespace": namespace, "name": "any"}})


def _message(informer: Informer, key: str) -> str | None:
    obj = informer.get(key)
    return None if obj is None else str(obj.get("message"))


def test_informer_lists_again_when_its_resource_version_was_compacted(dev_cluster: DevClusterHandle,
                                                                       namespace: str, kube: Kube) -> None:
    # Events: the API server keeps no watch cache for them (a watch reads etcd's history), so a
    # version etcd has compacted is answered with 410 at once, as any resource's is once its
    # version falls out of the watch cache too.
    for name in ("a", "b"):
        _event(kube, namespace, name, "1")
    informer = Informer(kube, ns_path(namespace, "events"), name="test events").start()
    try:
        wait_until(lambda: informer.get(f"{namespace}/b") is not None, 30, "the first list")
    finally:
        informer.stop()
    listed = int(informer.resource_version)
    # While the informer is away: one object goes, one changes, one comes ...
    kube.delete(ns_path(namespace, "events", "a"))
    kube.patch(ns_path(namespace, "events", "b"), {"message": "2"})
    _event(kube, namespace, "c", "1")
    # ... and etcd compacts its history past the informer's version (the API server does the same every
    # 5 minutes; here only the revisions up to listed+1 go, which no one else needs any more).
    _etcd_compact(dev_cluster, listed + 2)
    informer.start()
    try:
        wait_until(lambda: informer.stats["lists"] == 2, 60, "a second list after the 410")
        assert informer.stats["expired"] == 1 and informer.stats["errors"] == 0, informer.stats
        assert informer.get(f"{namespace}/a") is None
        assert _message(informer, f"{namespace}/b") == "2"
        assert _message(informer, f"{namespace}/c") == "1"
        assert int(informer.resource_version) > listed
        # And it watches on from the new list.
        _event(kube, namespace, "d", "1")
        wait_until(lambda: _message(informer, f"{namespace}/d") == "1", 30, "ADDED d after the re-list")
        assert informer.stats["lists"] == 2, informer.stats
    finally:
        informer.stop()


def test_informer_lists_again_after_its_connection_drops(dev_cluster: DevClusterHandle,
                                                         namespace: str, kube: Kube) -> None:
    informer = Informer(kube, ns_path(namespace, "configmaps"), name="test configmaps").start()
    try:
        wait_until(lambda: informer.synced.is_set() and informer.stats["watches"] == 1, 30, "the watch")
        informer.drop_connection()  # the TCP connection ends mid-stream
        _configmap(dev_cluster, namespace, "after-drop", "1")
        wait_until(lambda: _value(informer, f"{namespace}/after-drop") == "1", 60, "the object made after the drop")
        assert informer.stats["errors"] == 1 and informer.stats["lists"] == 2, informer.stats
    finally:
        informer.stop()


def test_bookmarks_move_the_resource_version_without_any_object_change(dev_cluster: DevClusterHandle,
                                                                        namespace: str, kube: Kube) -> None:
    # Pods of an empty namespace, watches of 5 s: the API server sends a BOOKMARK 2 s before each
    # watch's end, with the pods cache's current version, which moves with the rest of the cluster.
    informer = Informer(kube, ns_path(namespace, "pods"), timeout_s=5, name="test pods").start()
    try:
        wait_until(informer.synced.is_set, 30, "the first list")
        listed = int(informer.resource_version)
        wait_until(lambda: informer.stats["bookmarks"] >= 1 and int(informer.resource_version) > listed, 120,
                   f"a BOOKMARK past resourceVersion {listed}")
        assert informer.items() == [] and informer.stats["events"] == 0
        # Each ended watch was resumed from the bookmarked version, never by listing again.
        assert informer.stats["lists"] == 1 and informer.stats["errors"] == 0, informer.stats
    finally:
        informer.stop()


def _requests(cluster: DevClusterHandle) -> dict[str, Any]:
    return dict(json.loads((cluster.state_dir / REQUESTS_FILE).read_text()))


def _lists_and_watches(counts: dict[str, int], resources: tuple[str, ...]) -> int:
    return sum(n for kind, n in counts.items()
               if kind.split()[0] in ("LIST", "WATCH") and kind.split()[1] in resources)


def test_node_agent_and_proxy_send_no_lists_while_nothing_changes(dev_cluster: DevClusterHandle) -> None:
    """Counted by the agent's own Kube clients (node-agent.requests.json), over 20 s.

    Before informers, the agent listed every pod and every node each 0.5 s pass (80 lists in 20 s)
    and the proxy every Service and EndpointSlice each 0.25 s (160 lists in 20 s), whatever changed.
    Now a list happens once per informer at start (and after a 410 or a failure), and a watch is
    re-opened every 300 s, so 20 s see at most a few of either, even on a busy shared cluster.
    """
    path = dev_cluster.state_dir / REQUESTS_FILE
    wait_until(path.exists, 30, f"{path} (an agent from before watch.py writes none: restart the dev cluster's agent)")
    first, start = _requests(dev_cluster), time.monotonic()
    time.sleep(20)
    last, took = _requests(dev_cluster), time.monotonic() - start
    assert last["started"] == first["started"], "the agent restarted during the test"
    agent = {k: n - first["agent"].get(k, 0) for k, n in last["agent"].items()}
    proxy = {k: n - first["proxy"].get(k, 0) for k, n in last["proxy"].items()}
    assert _lists_and_watches(agent, ("pods", "nodes")) <= 10, (took, agent)
    assert _lists_and_watches(proxy, ("services", "endpointslices")) <= 4, (took, proxy)
    assert sum(proxy.values()) < 40, (took, proxy)  # what is left are its annotation patches of new Services


def test_object_cache_follows_one_configmap_by_watch(dev_cluster: DevClusterHandle, namespace: str,
                                                     kube: Kube) -> None:
    """What the pod workers read their ConfigMap/Secret volumes and env from: one informer per object."""
    objects = ObjectCache(kube)
    try:
        assert objects.get("configmaps", namespace, "later") is None  # not there yet: a pod would wait
        _configmap(dev_cluster, namespace, "later", "1")
        _configmap(dev_cluster, namespace, "other", "1")  # not asked for: not cached
        wait_until(lambda: (objects.get("configmaps", namespace, "later") or {}).get("data") == {"v": "1"}, 30,
                   "the ConfigMap made after the first read")
        _configmap(dev_cluster, namespace, "later", "2")
        wait_until(lambda: (objects.get("configmaps", namespace, "later") or {}).get("data") == {"v": "2"}, 30,
                   "its change")
        dev_cluster.kubectl("delete", "configmap", "later", "-n", namespace)
        wait_until(lambda: objects.get("configmaps", namespace, "later") is None, 30, "its deletion")
        # Every read after the first came from the cache: one list and one watch, no GET.
        assert kube.counts["LIST configmaps"] == 1 and kube.counts["GET configmaps"] == 0, kube.counts
    finally:
        objects.close()
