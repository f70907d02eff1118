"""Conditions: one per type, transition time moves only on a status change."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from fleetserve_operator.status.compute import status_patch
from fleetserve_operator.status.conditions import get_condition, set_condition

T0 = datetime(2026, 1, 1, tzinfo=UTC)
T1 = datetime(2026, 1, 1, 0, 5, tzinfo=UTC)


def test_transition_time_moves_only_when_status_changes() -> None:
    c = set_condition([], "Ready", "False", "Creating", "0/1", 1, T0)
    c = set_condition(c, "Ready", "False", "ReplicasNotReady", "0/1 ready", 2, T1)
    ready = get_condition(c, "Ready")
    assert ready is not None and ready["lastTransitionTime"] == "2026-01-01T00:00:00Z"
    assert ready["reason"] == "ReplicasNotReady" and ready["observedGeneration"] == 2
    c = set_condition(c, "Ready", True, "ReplicasReady", "1/1", 2, T1)
    ready = get_condition(c, "Ready")
    assert ready is not None and ready["lastTransitionTime"] == "2026-01-01T00:05:00Z" and ready["status"] == "True"
    assert len(c) == 1


def test_known_order_and_input_untouched() -> None:
    original = [{"type": "Degraded", "status": "False", "reason": "AsExpected", "message": "",
                 "lastTransitionTime": "2026-01-01T00:00:00Z"}]
    c = set_condition(original, "Ready", "True", "ReplicasReady", "", 1, T0)
    assert [x["type"] for x in c] == ["Ready", "Degraded"]
    assert len(original) == 1


def test_rejects_bad_status() -> None:
    with pytest.raises(ValueError, match="True, False or Unknown"):
        set_condition([], "Ready", "Yes", "R", "", 1, T0)


def test_status_patch_names_only_changed_keys_and_nulls_removed_memory_fields() -> None:
    current = {"replicas": 1, "memory": {"fits": True, "weightsBytes": 5}}
    assert status_patch(current, {"replicas": 1, "memory": {"fits": True, "weightsBytes": 5}}) is None
    patch = status_patch(current, {"replicas": 2, "memory": {"fits": False}})
    assert patch == {"replicas": 2, "memory": {"fits": False, "weightsBytes": None}}
