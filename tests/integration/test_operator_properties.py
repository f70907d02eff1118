"""Property: whatever spec the real API server admits, the operator ends it in conditions, never a crash."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from fleetserve_devcluster.testing import DevClusterHandle
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from operator_harness import NOWHERE, apply, condition, get, install_crds, operator, wait_until

quantities = st.one_of(
    st.integers(1, 2**38),
    st.builds(lambda n, u: f"{n}{u}", st.integers(0, 200), st.sampled_from(["Mi", "Gi", "G", "m", "", "Ti"])),
    st.sampled_from(["lots", "-1Gi", "1e3", "+2Gi"]),
)
specs = st.fixed_dictionaries(
    {"model": st.fixed_dictionaries({"source": st.sampled_from([
        "builtin:smollm2-135m-instruct", "hf:meta-llama/Llama-3.1-70B-Instruct", "hf:nobody/unknown", "mistral-7b"])})},
    optional={
        "quantization": st.sampled_from(["none", "int8", "nf4", "fp4", "int3"]),
        "replicas": st.integers(-1, 3),
        "resources": st.fixed_dictionaries({"gpus": st.integers(-1, 4)},
                                           optional={"gpuMemory": quantities, "memory": quantities}),
        "engine": st.fixed_dictionaries({}, optional={
            "maxModelLen": st.integers(0, 200_000), "maxNumSeqs": st.integers(1, 512),
            "maxBatchTokens": st.integers(1, 100_000), "kvCacheMemoryFraction": st.floats(-0.5, 1.5),
            "blockSize": st.integers(1, 300)}),
        "autoscaling": st.fixed_dictionaries({}, optional={
            "enabled": st.booleans(), "minReplicas": st.integers(0, 5), "maxReplicas": st.integers(1, 5)}),
    },
)


@pytest.fixture(scope="module", autouse=True)
def crds(dev_cluster: DevClusterHandle) -> None:
    install_crds(dev_cluster)


def test_admitted_specs_end_in_conditions(dev_cluster: DevClusterHandle, namespace: str) -> None:
    admitted: list[str] = []
    counter = iter(range(10_000))

    @settings(max_examples=25, deadline=None, derandomize=True,
              suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
    @given(spec=specs)
    def submit(spec: dict[str, Any]) -> None:
        name = f"p{next(counter)}"
        body = {"apiVersion": "fleetserve.io/v1alpha1", "kind": "LLMDeployment",
                "metadata": {"name": name}, "spec": {**copy.deepcopy(spec), "scheduling": NOWHERE}}
        if apply(dev_cluster, namespace, body, check=False).returncode == 0:
            admitted.append(name)

    with operator(dev_cluster, namespace) as runner:
        submit()
        assert len(admitted) >= 5, f"only {len(admitted)} admissible specs"

        def settled(name: str) -> bool:
            cr = get(dev_cluster, namespace, "llmd", name) or {}
            status = cr.get("status") or {}
            return bool(condition(cr, "Ready") and condition(cr, "MemoryFits")
                        and status.get("observedGeneration") == cr["metadata"]["generation"])

        for name in admitted:
            wait_until(lambda n=name: settled(n), 60, f"conditions on {name}")  # type: ignore[misc]
    assert "Handler 'reconcile-create' succeeded" in runner.output  # the operator's log was captured
    assert "failed with an exception" not in runner.output, runner.output[-3000:]
    assert "Traceback" not in runner.output, runner.output[-3000:]
