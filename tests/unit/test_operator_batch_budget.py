"""The server's step budget (engine.maxBatchTokens) is the server's own unless the CR sets it.

The server sizes ``max_batch_tokens`` itself when it is unset: 2048 on CUDA, and on a CPU a
budget for a ~1 s step on the cores it may use (issue 13 point 6). The operator must not
pin the GPU value into every server's config, or a CPU pod runs 2048-token steps.
"""

from __future__ import annotations

import yaml
from fleetserve_operator.api.spec import spec_from_body
from fleetserve_operator.reconcile.fit import check_memory_fit
from fleetserve_operator.resources.server import render_server_config
from fleetserve_server.config import ServerConfig
from operator_fixtures import example


def rendered(name: str, **engine: object) -> ServerConfig:
    body = example(name)
    body["spec"].setdefault("engine", {}).pop("maxBatchTokens", None)
    body["spec"]["engine"].update(engine)
    spec = spec_from_body(body)
    return ServerConfig.model_validate(yaml.safe_load(render_server_config(spec, check_memory_fit(spec))))


def test_unset_max_batch_tokens_leaves_the_step_budget_to_the_server() -> None:
    for name in ("smollm2-cpu.yaml", "llama-3.1-8b-nf4.yaml"):
        assert rendered(name).max_batch_tokens is None, name


def test_max_batch_tokens_set_in_the_cr_reaches_the_server() -> None:
    assert rendered("smollm2-cpu.yaml", maxBatchTokens=256).max_batch_tokens == 256
