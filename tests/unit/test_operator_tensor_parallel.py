"""The operator runs the server with ``--tensor-parallel-size`` = ``resources.gpus``, the size its
memory proof planned, and the server reads that ``server.yaml`` as it is."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from fleetserve_operator.api.spec import LLMDeploymentSpec
from fleetserve_operator.reconcile.fit import check_memory_fit
from fleetserve_operator.resources.server import render_server_config, server_config
from fleetserve_server.config import build_config
from fleetserve_server.memory import SERVER_MAX_TENSOR_PARALLEL_SIZE
from operator_fixtures import example


def _spec(gpus: int) -> LLMDeploymentSpec:
    body: dict[str, Any] = example("llama-3.1-8b-nf4.yaml")["spec"]
    resources = {"gpus": gpus, "cpu": "4", "memory": "32Gi"} | ({"gpuMemory": "24Gi"} if gpus else {})
    return LLMDeploymentSpec.model_validate(body | {"resources": resources})


@pytest.mark.parametrize("gpus", [2, 4, 8])
def test_server_config_splits_the_model_over_the_pods_gpus(gpus: int, tmp_path: Path) -> None:
    spec = _spec(gpus)
    fit = check_memory_fit(spec)
    assert fit.status == "True" and fit.tensor_parallel_size == gpus
    config = server_config(spec, fit)
    assert config["tensor_parallel_size"] == gpus
    # the KV cache the proof sized per device is what each rank allocates
    assert fit.plan is not None and config["kv_cache_tokens"] == fit.plan.kv_capacity_tokens
    path = tmp_path / "server.yaml"
    path.write_text(render_server_config(spec, fit))
    assert build_config({}, config_file=path, environ={}).tensor_parallel_size == gpus


@pytest.mark.parametrize("gpus", [0, 1])
def test_one_device_leaves_the_default(gpus: int) -> None:
    spec = _spec(gpus)
    assert "tensor_parallel_size" not in server_config(spec, check_memory_fit(spec))


def test_more_gpus_than_the_server_splits_over_run_the_largest_size() -> None:
    spec = _spec(SERVER_MAX_TENSOR_PARALLEL_SIZE + 8)
    fit = check_memory_fit(spec)
    assert yaml.safe_load(render_server_config(spec, fit))["tensor_parallel_size"] == SERVER_MAX_TENSOR_PARALLEL_SIZE
