"""The real nodes' pure parts: the default cluster keeps its Service range and flags; the addresses stay in
198.18.0.0/15; the OCI archive is a valid image layout (its import into containerd is tested in
tests/integration/test_devcluster_real_nodes.py)."""

from __future__ import annotations

import hashlib
import io
import ipaddress
import json
import tarfile
from pathlib import Path

import pytest
from fleetserve_devcluster import controlplane, pki, realnodes

BENCHMARK_RANGE = ipaddress.ip_network("198.18.0.0/15")


@pytest.fixture(autouse=True)
def _fake_tools(monkeypatch: pytest.MonkeyPatch) -> None:
    # tool_path() needs a provisioned binary; the flags are what matter here.
    monkeypatch.setattr(controlplane.tools, "tool_path", lambda name: Path(f"/bin/{name}"))


def _apiserver_argv(tmp_path: Path, **config: int) -> list[str]:
    cluster = controlplane.Cluster(tmp_path, controlplane.ClusterConfig(**config))
    return controlplane.apiserver_argv(cluster) + controlplane.controller_manager_argv(cluster)


def test_default_cluster_keeps_its_service_range_and_kubelet_address_types(tmp_path: Path) -> None:
    argv = _apiserver_argv(tmp_path)
    assert argv.count(f"--service-cluster-ip-range={pki.SERVICE_CIDR}") == 2  # apiserver, controller-manager
    assert pki.SERVICE_CIDR == "10.0.0.0/24"
    assert not any(a.startswith("--kubelet-preferred-address-types") for a in argv)
    assert [c.name for c in controlplane.active(controlplane.Cluster(tmp_path, controlplane.ClusterConfig()))] == [
        "etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "node-agent"]


def test_real_nodes_move_the_service_range_into_the_benchmark_range(tmp_path: Path) -> None:
    argv = _apiserver_argv(tmp_path, real_nodes=2)
    assert argv.count(f"--service-cluster-ip-range={realnodes.SERVICE_CIDR}") == 2
    assert "--kubelet-preferred-address-types=InternalIP" in argv
    names = [c.name for c in controlplane.active(controlplane.Cluster(tmp_path, controlplane.ClusterConfig(
        real_nodes=2)))]
    assert names[5:] == ["containerd-real-0", "kubelet-real-0", "containerd-real-1", "kubelet-real-1", "kube-proxy"]
    with pytest.raises(controlplane.DevClusterError):
        controlplane.ClusterConfig(real_nodes=5)


def test_every_real_node_address_is_in_198_18_0_0_15_and_disjoint() -> None:
    nets = [ipaddress.ip_network(realnodes.pod_cidr(i)) for i in range(realnodes.MAX_REAL_NODES)]
    service = ipaddress.ip_network(realnodes.SERVICE_CIDR)
    cluster = ipaddress.ip_network(realnodes.CLUSTER_CIDR)
    for i, net in enumerate(nets):
        assert net.subnet_of(cluster) and net.subnet_of(BENCHMARK_RANGE)  # type: ignore[arg-type]
        assert ipaddress.ip_address(realnodes.node_ip(i)) in net
        assert not net.overlaps(service)
    assert service.subnet_of(BENCHMARK_RANGE)  # type: ignore[arg-type]
    assert len(set(nets)) == len(nets)
    conflist = realnodes.cni_conflist(Path("/s"), 0)
    bridge = conflist["plugins"][0]
    assert bridge["ipMasq"] is False and bridge["ipam"]["routes"] == [{"dst": "198.18.0.0/15"}]  # no default route


def test_oci_archive_is_an_image_layout_whose_digests_match() -> None:
    archive = realnodes.oci_archive("fleetserve.local/x:1", {"/bin/x": (b"#!x\n", 0o755)}, ["/bin/x"], user="1000")
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        files = {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}  # type: ignore[union-attr]
    assert json.loads(files["oci-layout"]) == {"imageLayoutVersion": "1.0.0"}
    for name, data in files.items():
        if name.startswith("blobs/sha256/"):
            assert hashlib.sha256(data).hexdigest() == name.rsplit("/", 1)[1]
    entry = json.loads(files["index.json"])["manifests"][0]
    assert entry["annotations"]["io.containerd.image.name"] == "fleetserve.local/x:1"
    manifest = json.loads(files[f"blobs/sha256/{entry['digest'].split(':')[1]}"])
    config = json.loads(files[f"blobs/sha256/{manifest['config']['digest'].split(':')[1]}"])
    assert config["config"] == {"Entrypoint": ["/bin/x"], "User": "1000"}
    layer = files[f"blobs/sha256/{manifest['layers'][0]['digest'].split(':')[1]}"]
    with tarfile.open(fileobj=io.BytesIO(layer)) as tar:
        member = tar.getmember("bin/x")
        assert member.mode == 0o755 and tar.extractfile(member).read() == b"#!x\n"  # type: ignore[union-attr]
