"""The node agent's adoption of cluster-autoscaler nodes (kwok.x-k8s.io/node: fake), as a pure
state machine: provisioning delay, Ready, drain on deletion, finalizer released only when empty."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from fleetserve_devcluster.adopt import (
    DEFAULT_PROVISION_DELAY_S,
    FINALIZER,
    PROVISION_ENV,
    PROVISIONED_ANNOTATION,
    Action,
    Adopted,
    Phase,
    adoption_step,
    is_adoptable,
    node_gpus,
    provision_delay,
    without_taint,
)


def node(*, deleting: bool = False, finalizer: bool = True, provisioned: bool = False,
         kwok: bool = True, gpus: str | None = "1") -> dict[str, Any]:
    meta: dict[str, Any] = {"name": "gpu-pool-abc", "annotations": {}}
    if kwok:
        meta["annotations"]["kwok.x-k8s.io/node"] = "fake"
    if provisioned:
        meta["annotations"][PROVISIONED_ANNOTATION] = "2026-01-01T00:00:00Z"
    if finalizer:
        meta["finalizers"] = [FINALIZER]
    if deleting:
        meta["deletionTimestamp"] = "2026-01-01T00:01:00Z"
    return {"metadata": meta, "status": {"capacity": {"nvidia.com/gpu": gpus} if gpus else {}}}


def test_only_kwok_annotated_nodes_are_adopted() -> None:
    assert is_adoptable(node())
    assert not is_adoptable(node(kwok=False))
    assert node_gpus(node(gpus="3"), 2) == 3 and node_gpus(node(gpus=None), 2) == 2


def test_a_new_node_is_provisioning_until_the_delay_has_passed() -> None:
    phase, action = adoption_step(node(finalizer=False), None, now=100.0, delay_s=20, pods_left=0)
    assert (phase, action) == (Phase.PROVISIONING, Action.ADOPT)
    record = Adopted("gpu-pool-abc", 2, 100.0, Phase.PROVISIONING)
    assert adoption_step(node(), record, now=119.9, delay_s=20, pods_left=0) == (Phase.PROVISIONING, Action.NONE)
    assert adoption_step(node(), record, now=120.0, delay_s=20, pods_left=0) == (Phase.READY, Action.MAKE_READY)
    ready = Adopted("gpu-pool-abc", 2, 100.0, Phase.READY)
    assert adoption_step(node(), ready, now=500.0, delay_s=20, pods_left=0) == (Phase.READY, Action.NONE)


def test_a_node_an_earlier_agent_provisioned_is_ready_at_once_after_a_restart() -> None:
    assert adoption_step(node(provisioned=True), None, now=0.0, delay_s=20, pods_left=0) == \
        (Phase.READY, Action.MAKE_READY)


def test_a_deleted_node_is_drained_and_released_only_when_no_pod_is_left() -> None:
    ready = Adopted("gpu-pool-abc", 2, 0.0, Phase.READY)
    assert adoption_step(node(deleting=True), ready, now=60.0, delay_s=20, pods_left=2) == \
        (Phase.DRAINING, Action.DRAIN)
    assert adoption_step(node(deleting=True), ready, now=61.0, delay_s=20, pods_left=0) == (None, Action.RELEASE)
    # Already released (finalizer gone) while the object lingers: nothing more to do.
    assert adoption_step(node(deleting=True, finalizer=False), ready, now=62.0, delay_s=20, pods_left=0) == \
        (None, Action.NONE)


def test_provision_delay_env_beats_cluster_json_beats_default(tmp_path: Path) -> None:
    assert provision_delay(tmp_path, {}) == DEFAULT_PROVISION_DELAY_S == 20.0
    (tmp_path / "cluster.json").write_text(json.dumps({"nodes": 1, "node_provision_delay_s": 7}))
    assert provision_delay(tmp_path, {}) == 7.0
    assert provision_delay(tmp_path, {PROVISION_ENV: "2.5"}) == 2.5


@pytest.mark.parametrize("raw", ["-1", "soon", "nan"])
def test_a_bad_provision_delay_names_the_setting(tmp_path: Path, raw: str) -> None:
    with pytest.raises(ValueError, match=PROVISION_ENV):
        provision_delay(tmp_path, {PROVISION_ENV: raw})


def test_removing_the_not_ready_taint_keeps_the_others() -> None:
    taints = [{"key": "node.kubernetes.io/not-ready", "effect": "NoSchedule"},
              {"key": "nvidia.com/gpu", "effect": "NoSchedule"}]
    assert without_taint(taints, "node.kubernetes.io/not-ready") == [taints[1]]
