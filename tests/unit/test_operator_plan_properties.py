"""Property: any spec the models accept plans without raising and ends in conditions."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from fleetserve_operator.api.spec import LLMDeploymentSpec
from fleetserve_operator.reconcile.plan import Observed, plan
from fleetserve_operator.status.conditions import get_condition
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

quantities = st.one_of(
    st.integers(0, 2**40),
    st.builds(lambda n, u: f"{n}{u}", st.integers(0, 4096), st.sampled_from(["", "Ki", "Mi", "Gi", "Ti", "k", "M", "G", "m"])),
)
sources = st.one_of(
    st.sampled_from(["builtin:smollm2-135m-instruct", "hf:meta-llama/Llama-3.1-8B-Instruct",
                     "hf:meta-llama/Llama-3.1-70B-Instruct", "hf:Qwen/Qwen2.5-72B-Instruct", "mistral-7b"]),
    st.text(min_size=1, max_size=40),
)
specs = st.fixed_dictionaries(
    {"model": st.fixed_dictionaries({"source": sources})},
    optional={
        "quantization": st.sampled_from(["none", "int8", "nf4", "fp4"]),
        "dtype": st.sampled_from(["auto", "float32", "bfloat16", "float16"]),
        "replicas": st.integers(0, 20),
        "resources": st.fixed_dictionaries({"gpus": st.integers(0, 8)},
                                           optional={"gpuMemory": quantities, "memory": quantities, "cpu": quantities}),
        "engine": st.fixed_dictionaries({}, optional={
            "maxModelLen": st.integers(1, 1_048_576), "maxNumSeqs": st.integers(1, 4096),
            "maxBatchTokens": st.integers(1, 1_048_576), "blockSize": st.integers(1, 256),
            "kvCacheMemoryFraction": st.floats(0.0, 1.0), "maxQueueLength": st.integers(1, 1000),
            "prefixCaching": st.booleans(), "cacheTTLSeconds": st.integers(1, 10_000),
        }),
        "autoscaling": st.fixed_dictionaries({}, optional={
            "enabled": st.booleans(), "minReplicas": st.integers(1, 10), "maxReplicas": st.integers(1, 10)}),
    },
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.filter_too_much])
@given(spec=specs, desired=st.one_of(st.none(), st.integers(0, 50)))
def test_any_admitted_spec_plans_to_conditions(spec: dict[str, Any], desired: int | None) -> None:
    try:
        LLMDeploymentSpec.model_validate(spec)
    except ValidationError:
        assume(False)
    body: dict[str, Any] = {
        "apiVersion": "fleetserve.io/v1alpha1", "kind": "LLMDeployment",
        "metadata": {"name": "p", "namespace": "ns", "uid": "u", "generation": 3}, "spec": spec,
    }
    if desired is not None:
        body["status"] = {"desiredReplicas": desired}
    result = plan(body, Observed(), datetime(2026, 1, 1, tzinfo=UTC))
    assert result.status is not None
    for type_ in ("Ready", "Progressing", "MemoryFits", "Degraded"):
        assert get_condition(result.status["conditions"], type_) is not None
    fits = get_condition(result.status["conditions"], "MemoryFits")
    assert fits is not None
    deployments = [o for o in result.apply if o["kind"] == "Deployment"]
    if fits["status"] == "False":
        assert deployments == []
    else:
        assert len(deployments) == 1 and deployments[0]["spec"]["replicas"] == result.replicas
