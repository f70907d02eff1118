"""The operator's memory-fit proof is per device: GPU memory never adds up across GPUs."""

from __future__ import annotations

from typing import Any

from fleetserve_operator.api.spec import LLMDeploymentSpec
from fleetserve_operator.reconcile.fit import check_memory_fit
from fleetserve_server.memory import GiB, known_architecture, plan_memory
from operator_fixtures import example

TWO_24GIB_NF4: dict[str, Any] = {
    "quantization": "nf4",
    "resources": {"gpus": 2, "gpuMemory": "24Gi", "cpu": "8", "memory": "64Gi"},
    "engine": {"maxModelLen": 8192, "maxNumSeqs": 16},
}


def spec_70b(**overrides: Any) -> LLMDeploymentSpec:
    body = example("llama-3.1-70b-does-not-fit.yaml")
    body["spec"].update(overrides)
    return LLMDeploymentSpec.model_validate(body["spec"])


def test_70b_nf4_on_two_24gib_gpus_fits_as_two_tensor_parallel_ranks() -> None:
    fit = check_memory_fit(spec_70b(**TWO_24GIB_NF4))
    assert (fit.status, fit.reason) == ("True", "Fits")
    memory = fit.to_status()
    # per device: each 24 GiB GPU holds its half of the nf4 weights and its 4 of the 8 KV heads
    assert memory["availableBytes"] == 24 * GiB
    assert memory["devices"] == 2 and memory["tensorParallelSize"] == 2
    arch = known_architecture("Llama-3.1-70B-Instruct")
    assert arch is not None
    split = plan_memory(arch, quantization="nf4", dtype="auto", device="cuda", device_memory_bytes=24 * GiB,
                        max_model_len=8192, max_num_seqs=16, tensor_parallel_size=2)
    whole = plan_memory(arch, quantization="nf4", dtype="auto", device="cuda", device_memory_bytes=24 * GiB,
                        max_model_len=8192, max_num_seqs=16)
    assert memory["weightsBytes"] == split.weights_bytes < 0.51 * whole.weights_bytes
    assert whole.weights_bytes > 24 * GiB and not whole.fits  # one GPU could not hold it
    assert memory["kvBytesPerToken"] == 160 * 1024 and memory["kvCapacityTokens"] == split.kv_capacity_tokens >= 8192
    assert "fits on each of 2 devices" in fit.message and "stay idle" not in fit.message


def test_more_gpus_than_the_server_splits_over_are_idle_and_say_so() -> None:
    from fleetserve_server.memory import SERVER_MAX_TENSOR_PARALLEL_SIZE

    gpus = SERVER_MAX_TENSOR_PARALLEL_SIZE * 2
    fit = check_memory_fit(spec_70b(**{**TWO_24GIB_NF4, "resources": {**TWO_24GIB_NF4["resources"], "gpus": gpus}}))
    assert fit.to_status()["tensorParallelSize"] == SERVER_MAX_TENSOR_PARALLEL_SIZE
    assert f"the other {gpus - SERVER_MAX_TENSOR_PARALLEL_SIZE} stay idle" in fit.message


def test_a_gpu_count_that_cannot_split_the_heads_never_fits() -> None:
    # the builtin SmolLM2 has 9 attention heads and 3 KV heads: 2 ranks cannot split them
    body = example("smollm2-cpu.yaml")["spec"] | {"resources": {"gpus": 2, "gpuMemory": "24Gi", "cpu": "4",
                                                                "memory": "16Gi"}}
    fit = check_memory_fit(LLMDeploymentSpec.model_validate(body))
    assert (fit.status, fit.reason) == ("False", "InvalidTensorParallelSize")
    assert "valid sizes: 1, 3, 9" in fit.message and "resources.gpus" in fit.message


def test_two_gpus_split_a_model_that_fits_one_and_hold_more_kv() -> None:
    fit = check_memory_fit(LLMDeploymentSpec.model_validate(example("llama-3.1-8b-nf4.yaml")["spec"] | {
        "resources": {"gpus": 2, "gpuMemory": "24Gi", "cpu": "4", "memory": "32Gi"}}))
    single = check_memory_fit(LLMDeploymentSpec.model_validate(example("llama-3.1-8b-nf4.yaml")["spec"]))
    assert fit.status == single.status == "True"
    assert fit.plan is not None and single.plan is not None
    # half the weights and half the KV heads per GPU: more than twice the tokens of one GPU
    assert fit.plan.kv_capacity_tokens > 2 * single.plan.kv_capacity_tokens
    assert fit.to_status()["availableBytes"] == 24 * GiB and fit.to_status()["tensorParallelSize"] == 2


def test_cpu_status_is_one_device() -> None:
    body = example("smollm2-cpu.yaml")
    memory = check_memory_fit(LLMDeploymentSpec.model_validate(body["spec"])).to_status()
    assert memory["device"] == "cpu" and memory["devices"] == 1 and memory["tensorParallelSize"] == 1
