"""The node agent's persistentVolumeClaim volumes on the real control plane: the PV controller
binds a claim to a `local` PersistentVolume, the scheduler honours the PV's node affinity, and the
agent bind-mounts the PV's directory into every pod of the claim (readOnly honoured); a PV that
points outside the allowed roots fails the pod, as a hostPath there would."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fleetserve_devcluster.testing import DevClusterHandle
from fleetserve_devcluster.volumes import PERSISTENT_VOLUMES_DIR
from nodeagent_util import (
    READY_PROBE,
    apply,
    echo_container,
    echo_pod,
    get_json,
    in_container,
    pod,
    wait_until,
)

NODE = "fs-node-1"


def local_pv(name: str, namespace: str, path: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "PersistentVolume", "metadata": {"name": name}, "spec": {
        "capacity": {"storage": "1Gi"}, "accessModes": ["ReadWriteOnce"], "persistentVolumeReclaimPolicy": "Retain",
        "storageClassName": "nodeagent-test-local", "claimRef": {"namespace": namespace, "name": "data"},
        "local": {"path": path},
        "nodeAffinity": {"required": {"nodeSelectorTerms": [{"matchExpressions": [
            {"key": "kubernetes.io/hostname", "operator": "In", "values": [NODE]}]}]}}}}


CLAIM = {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": "data"}, "spec": {
    "storageClassName": "nodeagent-test-local", "accessModes": ["ReadWriteOnce"],
    "resources": {"requests": {"storage": "1Gi"}}}}


@pytest.fixture
def pv(dev_cluster: DevClusterHandle, namespace: str) -> Iterator[str]:
    name = f"{namespace}-data"
    yield name
    dev_cluster.kubectl("delete", "persistentvolume", name, "--wait=false", "--ignore-not-found", check=False)


def claim_pod(name: str, read_only: bool = False) -> dict[str, Any]:
    container = echo_container(readinessProbe=READY_PROBE, volumeMounts=[{"name": "data", "mountPath": "/data"}])
    return echo_pod(name, container=container, volumes=[
        {"name": "data", "persistentVolumeClaim": {"claimName": "data", "readOnly": read_only}}])


def test_pods_of_a_claim_share_its_local_volume(dev_cluster: DevClusterHandle, namespace: str, pv: str) -> None:
    disk = Path(dev_cluster.state_dir) / PERSISTENT_VOLUMES_DIR / namespace
    disk.mkdir(parents=True)
    try:
        (disk / "seed.txt").write_text("from the host")
        dev_cluster.kubectl("apply", "-f", "-", input=json.dumps(local_pv(pv, namespace, str(disk))))
        apply(dev_cluster, namespace, CLAIM)
        wait_until(lambda: get_json(dev_cluster, "pvc", "data", "-n", namespace).get("status", {}).get("phase")
                   == "Bound", 60, "the claim to be bound")
        apply(dev_cluster, namespace, claim_pod("writer"))
        apply(dev_cluster, namespace, claim_pod("reader", read_only=True))

        def running(name: str) -> dict[str, Any] | None:
            p = pod(dev_cluster, namespace, name)
            return p if p and any(c["type"] == "Ready" and c["status"] == "True"
                                  for c in p.get("status", {}).get("conditions", [])) else None

        writer = wait_until(lambda: running("writer"), 120, "pod writer Ready")
        reader = wait_until(lambda: running("reader"), 120, "pod reader Ready")
        assert writer["spec"]["nodeName"] == reader["spec"]["nodeName"] == NODE  # the PV's node affinity
        assert in_container(writer, "/data/seed.txt").read_text() == "from the host"
        in_container(writer, "/data/model.bin").write_text("written by one replica")
        assert (disk / "model.bin").read_text() == "written by one replica"
        assert in_container(reader, "/data/model.bin").read_text() == "written by one replica"
        with pytest.raises(OSError, match="Read-only file system"):
            in_container(reader, "/data/other.bin").write_text("x")
    finally:
        dev_cluster.kubectl("delete", "pod", "--all", "-n", namespace, "--wait=true", timeout=120, check=False)
        shutil.rmtree(disk, ignore_errors=True)


def test_a_pv_outside_the_allowed_roots_fails_the_pod(dev_cluster: DevClusterHandle, namespace: str, pv: str) -> None:
    dev_cluster.kubectl("apply", "-f", "-", input=json.dumps(local_pv(pv, namespace, "/etc")))
    apply(dev_cluster, namespace, CLAIM)
    wait_until(lambda: get_json(dev_cluster, "pvc", "data", "-n", namespace).get("status", {}).get("phase")
               == "Bound", 60, "the claim to be bound")
    apply(dev_cluster, namespace, claim_pod("etc"))
    p = wait_until(lambda: (lambda x: x if x and x.get("status", {}).get("phase") == "Failed" else None)(
        pod(dev_cluster, namespace, "etc")), 60, "pod etc Failed")
    assert p["status"]["reason"] == "HostPathNotAllowed", json.dumps(p["status"])
    assert "/etc" in p["status"]["message"] and PERSISTENT_VOLUMES_DIR in p["status"]["message"]
