"""`dev-cluster up --karpenter`: the objects it applies and when the component runs (no binary needed)."""

from __future__ import annotations

import json
from pathlib import Path

from fleetserve_devcluster import karpenter
from fleetserve_devcluster.adopt import node_gpus
from fleetserve_devcluster.controlplane import Cluster, ClusterConfig, active


def test_instance_types_follow_upstreams_offering_format_with_gpus() -> None:
    types = karpenter.instance_types_file()
    assert {t["name"]: t["resources"]["nvidia.com/gpu"] for t in types} == {"gpu-1x-h100": "1", "gpu-4x-h100": "4"}
    for t in types:
        assert set(t) == {"name", "offerings", "architecture", "operatingSystems", "resources"}
        for offering in t["offerings"]:
            assert set(offering) == {"Price", "Available", "Requirements"}
            keys = {r["key"] for r in offering["Requirements"]}
            assert keys == {"karpenter.sh/capacity-type", "topology.kubernetes.io/zone"}


def test_node_pool_is_limited_tainted_and_consolidates() -> None:
    pool = karpenter.node_pool(3)["spec"]
    assert pool["limits"] == {"nodes": "3"}
    assert pool["template"]["spec"]["taints"] == [{"key": "nvidia.com/gpu", "effect": "NoSchedule"}]
    assert pool["disruption"]["consolidationPolicy"] == "WhenEmptyOrUnderutilized"
    assert pool["template"]["metadata"]["labels"]["nvidia.com/gpu.product"]
    assert karpenter.node_class(20)["spec"] == {"nodeRegistrationDelay": "20s"}


def test_the_karpenter_component_runs_only_on_a_karpenter_cluster(tmp_path: Path) -> None:
    plain = Cluster(tmp_path, ClusterConfig())
    with_k = Cluster(tmp_path, ClusterConfig(karpenter=True, node_provision_delay_s=0.0))
    assert "karpenter" not in [c.name for c in active(plain)]
    assert [c.name for c in active(with_k)][-1] == "karpenter"
    # Stored and loaded with the rest of the config; the node agent reads its own delay from it.
    with_k.config.save(tmp_path)
    assert ClusterConfig.load(tmp_path) == with_k.config
    assert json.loads((tmp_path / "cluster.json").read_text())["node_provision_delay_s"] == 0.0


def test_a_karpenter_nodes_gpus_come_from_allocatable() -> None:
    # Karpenter's kwok node: capacity = the NodeClaim's requests, allocatable = the instance type.
    node = {"status": {"capacity": {"nvidia.com/gpu": "1"}, "allocatable": {"nvidia.com/gpu": "4"}}}
    assert node_gpus(node, 2) == 4
    assert node_gpus({"status": {"capacity": {"nvidia.com/gpu": "3"}}}, 2) == 3
    assert node_gpus({}, 2) == 2
