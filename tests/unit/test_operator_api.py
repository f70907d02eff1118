"""The spec models: defaults, aliases and the cross-field rules on the Python side."""

from __future__ import annotations

import pytest
from fleetserve_operator.api.spec import LLMDeploymentSpec
from fleetserve_operator.api.status import LLMDeploymentStatus, observed_metrics
from pydantic import ValidationError


def spec(**kw: object) -> LLMDeploymentSpec:
    return LLMDeploymentSpec.model_validate({"model": {"source": "builtin:smollm2-135m-instruct"},
                                             "resources": {"gpus": 0, "memory": "2Gi"}, **kw})


def test_defaults_and_camel_case_round_trip() -> None:
    s = spec()
    assert s.quantization == "none" and s.engine.max_model_len == 2048 and s.replicas == 1
    wire = s.to_wire()
    assert wire["engine"]["cacheTTLSeconds"] == 600
    assert wire["autoscaling"]["targetKVCacheUsage"] == 0.8
    assert wire["resources"]["gpuResourceName"] == "nvidia.com/gpu"
    assert LLMDeploymentSpec.model_validate(wire) == s


@pytest.mark.parametrize(
    ("patch", "field"),
    [
        ({"autoscaling": {"minReplicas": 3, "maxReplicas": 1}}, "minReplicas"),
        ({"autoscaling": {"targetKVCacheUsage": 1.5}}, "targetKVCacheUsage"),
        ({"autoscaling": {"targetKVCacheUsage": 0}}, "targetKVCacheUsage"),
        ({"engine": {"kvCacheMemoryFraction": 1.0}}, "kvCacheMemoryFraction"),
        ({"engine": {"maxNumSeqs": 64, "maxBatchTokens": 32}}, "maxBatchTokens"),
        ({"resources": {"gpus": 1}}, "gpuMemory"),
        ({"resources": {"gpus": 0}}, "memory"),
        ({"resources": None}, "resources"),
    ],
)
def test_cross_field_rules_name_the_field(patch: dict[str, object], field: str) -> None:
    with pytest.raises(ValidationError) as err:
        spec(**patch)
    assert field in str(err.value)


@pytest.mark.parametrize(
    "patch",
    [
        {"quantization": "int3"},
        {"resources": {"gpus": 1, "gpuMemory": "lots"}},
        {"engine": {"maxModelLen": 0}},
        {"replicas": -1},
        {"engine": {"unknownKnob": 1}},
    ],
)
def test_schema_level_rejections(patch: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        spec(**patch)


def test_quantities_accept_ints_and_kubernetes_suffixes() -> None:
    s = spec(resources={"gpus": 2, "gpuMemory": "80Gi", "cpu": 4, "memory": "512Mi"})
    assert s.resources.cpu == "4" and s.resources.gpu_memory == "80Gi"


def test_status_model_accepts_what_the_operator_and_autoscaler_write() -> None:
    status = LLMDeploymentStatus.model_validate({
        "observedGeneration": 2, "replicas": 1, "readyReplicas": 1, "readySummary": "1/1",
        "memory": {"fits": True, "weightsBytes": 1, "kvBytesPerToken": 2, "kvCapacityTokens": 16},
        "autoscaler": {"lastDecision": {"from": 1, "to": 2, "reason": "queue"},
                       "observed": observed_metrics(3.0, 0.427, 2)},
        "conditions": [{"type": "Ready", "status": "True", "reason": "ReplicasReady",
                        "lastTransitionTime": "2026-01-01T00:00:00Z"}],
    })
    assert status.autoscaler and status.autoscaler.observed
    assert status.autoscaler.observed.kv_cache_usage_percent == 43
    assert status.autoscaler.last_decision and status.autoscaler.last_decision.from_ == 1
