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


def test_70b_nf4_on_two_24gib_gpus_does_not_fit_because_the_server_uses_one() -> None:
    fit = check_memory_fit(spec_70b(**TWO_24GIB_NF4))
    assert (fit.status, fit.reason) == ("False", "DoesNotFit")
    memory = fit.to_status()
    # per device: one 24 GiB GPU holds all 37.8 GiB of nf4 weights (the server does not shard yet)
    assert memory["availableBytes"] == 24 * GiB
    assert memory["devices"] == 2 and memory["tensorParallelSize"] == 1
    arch = known_architecture("Llama-3.1-70B-Instruct")
    assert arch is not None
    whole = plan_memory(arch, quantization="nf4", dtype="auto", device="cuda", device_memory_bytes=24 * GiB,
                        max_model_len=8192, max_num_seqs=16)
    assert memory["weightsBytes"] == whole.weights_bytes > 24 * GiB
    assert memory["kvCapacityTokens"] == 0 and memory["fits"] is False
    assert memory["kvBytesPerToken"] == 320 * 1024
    message = fit.message
    assert "does not shard a model across GPUs yet" in message and "the other 1 stay idle" in message
    assert "does not fit on one device" in message and "19.4 GiB short per device" in message
    assert "use a GPU with more memory" in message
    assert "use 2 GPUs" not in message  # more GPUs would not help until the server shards


def test_one_gpu_of_two_is_planned_when_the_model_fits_one() -> None:
    fit = check_memory_fit(LLMDeploymentSpec.model_validate(example("llama-3.1-8b-nf4.yaml")["spec"] | {
        "resources": {"gpus": 2, "gpuMemory": "24Gi", "cpu": "4", "memory": "32Gi"}}))
    single = check_memory_fit(LLMDeploymentSpec.model_validate(example("llama-3.1-8b-nf4.yaml")["spec"]))
    assert fit.status == single.status == "True"
    assert fit.plan is not None and single.plan is not None
    # the second GPU adds nothing: the same per-device plan as one GPU
    assert fit.plan.kv_capacity_tokens == single.plan.kv_capacity_tokens
    assert fit.to_status()["availableBytes"] == 24 * GiB and "stay idle" in fit.message
    assert "stay idle" not in single.message and single.to_status()["devices"] == 1


def test_cpu_status_is_one_device() -> None:
    body = example("smollm2-cpu.yaml")
    memory = check_memory_fit(LLMDeploymentSpec.model_validate(body["spec"])).to_status()
    assert memory["device"] == "cpu" and memory["devices"] == 1 and memory["tensorParallelSize"] == 1
