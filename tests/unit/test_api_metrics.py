"""/metrics: every contract name with its type, aliases equal to native values, counters that move."""

from __future__ import annotations

import httpx
import pytest
from api_fakes import MODEL, FakeEngine, FakeTokenizer
from fleetserve_server.api.app import create_app
from fleetserve_server.engine.interfaces import RequestOutputDelta
from fleetserve_server.metrics import time_per_output_token
from prometheus_client.parser import text_string_to_metric_families

pytestmark = pytest.mark.anyio

CONTRACT = {
    "fleetserve_requests_waiting": "gauge",
    "fleetserve_requests_running": "gauge",
    "fleetserve_kv_cache_usage_ratio": "gauge",
    "fleetserve_kv_cache_blocks_total": "gauge",
    "fleetserve_kv_cache_blocks_free": "gauge",
    "fleetserve_kv_cache_capacity_tokens": "gauge",
    "fleetserve_prefix_cache_queries": "counter",
    "fleetserve_prefix_cache_hits": "counter",
    "fleetserve_kv_cache_evictions": "counter",
    "fleetserve_preemptions": "counter",
    "fleetserve_prompt_tokens": "counter",
    "fleetserve_generation_tokens": "counter",
    "fleetserve_requests": "counter",
    "fleetserve_requests_rejected": "counter",
    "fleetserve_time_to_first_token_seconds": "histogram",
    "fleetserve_time_per_output_token_seconds": "histogram",
    "fleetserve_e2e_request_latency_seconds": "histogram",
    "fleetserve_request_queue_time_seconds": "histogram",
    "fleetserve_batch_size": "histogram",
    "fleetserve_model_memory_bytes": "gauge",
    "fleetserve_model_info": "gauge",
    "vllm:num_requests_waiting": "gauge",
    "vllm:num_requests_running": "gauge",
    "vllm:kv_cache_usage_perc": "gauge",
    "vllm:gpu_cache_usage_perc": "gauge",
}


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def families(text: str) -> dict:
    return {f.name: f for f in text_string_to_metric_families(text)}


def value(fams: dict, name: str, sample: str | None = None, **labels: str) -> float:
    for s in fams[name].samples:
        if (sample is None or s.name == sample) and all(s.labels.get(k) == v for k, v in labels.items()):
            return s.value
    raise KeyError((name, sample, labels))


async def test_contract_names_types_and_movement() -> None:
    engine = FakeEngine()
    app = create_app(engine, served_name="fake-model", tokenizer=FakeTokenizer(), model=MODEL)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        before = families((await c.get("/metrics")).text)
        for name, kind in CONTRACT.items():
            assert name in before, f"{name} missing"
            assert before[name].type == kind, (name, before[name].type)
        r = await c.post("/v1/completions", json={"model": "fake-model", "prompt": "abcd", "max_tokens": 5})
        assert r.status_code == 200
        await c.post("/v1/completions", json={"model": "fake-model", "prompt": "abcd", "n": 0})
        resp = await c.get("/metrics")
        after = families(resp.text)
    assert resp.headers["content-type"].startswith("text/plain")
    assert value(after, "fleetserve_requests", "fleetserve_requests_total", finish_reason="length") == 1
    assert value(after, "fleetserve_requests_rejected", reason="invalid") == 1
    assert value(after, "fleetserve_generation_tokens") == 5
    assert value(after, "fleetserve_prompt_tokens") == 4
    assert value(after, "fleetserve_e2e_request_latency_seconds", "fleetserve_e2e_request_latency_seconds_count") == 1
    assert value(after, "fleetserve_time_per_output_token_seconds",
                 "fleetserve_time_per_output_token_seconds_count") == 1
    assert value(after, "fleetserve_batch_size", "fleetserve_batch_size_count") == 5
    assert value(after, "fleetserve_model_info", model="fake-model", quantization="none",
                 max_model_len="256") == 1
    assert value(after, "fleetserve_kv_cache_blocks_total") == 256
    for alias, native in (("vllm:num_requests_waiting", "fleetserve_requests_waiting"),
                          ("vllm:num_requests_running", "fleetserve_requests_running"),
                          ("vllm:kv_cache_usage_perc", "fleetserve_kv_cache_usage_ratio"),
                          ("vllm:gpu_cache_usage_perc", "fleetserve_kv_cache_usage_ratio")):
        assert value(after, alias, model_name="fake-model") == value(after, native, model="fake-model")


async def test_engine_metrics_absent_while_loading_but_counters_present() -> None:
    app = create_app(None, served_name="m")
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        fams = families((await c.get("/metrics")).text)
    assert "fleetserve_requests" in fams and "fleetserve_requests_waiting" not in fams


def test_tpot_needs_two_tokens() -> None:
    one = RequestOutputDelta("r", "", [], "stop", completion_tokens=1, time_to_first_token=0.5, e2e_latency=0.5)
    five = RequestOutputDelta("r", "", [], "stop", completion_tokens=5, time_to_first_token=1.0, e2e_latency=3.0)
    assert time_per_output_token(one) is None
    assert time_per_output_token(five) == pytest.approx(0.5)
