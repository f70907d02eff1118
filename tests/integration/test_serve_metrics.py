"""/metrics of a real server, parsed with prometheus_client's parser: the ARCHITECTURE.md contract."""

from __future__ import annotations

import httpx
import openai
from fleetserve_server.bench.launch import ServerProcess
from prometheus_client.parser import text_string_to_metric_families
from serve_util import MODEL, metric, scrape, server, tiny_model  # noqa: F401 - fixtures

# family name as the parser reports it (counters without `_total`) -> type
CONTRACT = {
    "fleetserve_requests_waiting": "gauge", "fleetserve_requests_running": "gauge",
    "fleetserve_kv_cache_usage_ratio": "gauge", "fleetserve_kv_cache_blocks_total": "gauge",
    "fleetserve_kv_cache_blocks_free": "gauge", "fleetserve_kv_cache_capacity_tokens": "gauge",
    "fleetserve_prefix_cache_queries": "counter", "fleetserve_prefix_cache_hits": "counter",
    "fleetserve_kv_cache_evictions": "counter", "fleetserve_preemptions": "counter",
    "fleetserve_prompt_tokens": "counter", "fleetserve_generation_tokens": "counter",
    "fleetserve_requests": "counter", "fleetserve_requests_rejected": "counter",
    "fleetserve_time_to_first_token_seconds": "histogram",
    "fleetserve_time_per_output_token_seconds": "histogram",
    "fleetserve_e2e_request_latency_seconds": "histogram",
    "fleetserve_request_queue_time_seconds": "histogram",
    "fleetserve_batch_size": "histogram",
    "fleetserve_output_tokens": "histogram", "fleetserve_output_token_nll_nats": "histogram",
    "fleetserve_output_mean_token_entropy_nats": "histogram", "fleetserve_request_temperature": "histogram",
    "fleetserve_requests_max_tokens": "counter",
    "fleetserve_model_memory_bytes": "gauge", "fleetserve_model_info": "gauge",
    "vllm:num_requests_waiting": "gauge", "vllm:num_requests_running": "gauge",
    "vllm:kv_cache_usage_perc": "gauge", "vllm:gpu_cache_usage_perc": "gauge",
}
LABELS = {
    "fleetserve_kv_cache_evictions": {"reason": {"expired", "pressure"}},
    "fleetserve_requests": {"finish_reason": {"stop", "length", "abort", "error"}},
    "fleetserve_requests_rejected": {"reason": {"queue_full", "invalid", "unauthorized", "draining"}},
    "fleetserve_model_memory_bytes": {"kind": {"weights", "kv_cache"}},
}


def test_every_contract_metric_with_its_type_and_labels(server: ServerProcess) -> None:  # noqa: F811
    text = httpx.get(server.base_url + "/metrics").text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    for name, kind in CONTRACT.items():
        assert name in families, f"{name} missing from /metrics"
        assert families[name].type == kind, f"{name}: {families[name].type} != {kind}"
    for name, wanted in LABELS.items():
        for label, values in wanted.items():
            assert {s.labels[label] for s in families[name].samples} == values, name
    info = families["fleetserve_model_info"].samples[0].labels
    assert info == {"model": MODEL, "quantization": "none", "dtype": "float32", "max_model_len": "2048"}
    assert metric(server.base_url, "fleetserve_kv_cache_capacity_tokens") == 32768
    assert metric(server.base_url, "fleetserve_model_memory_bytes", kind="weights") > 0


def test_counters_move_and_aliases_equal_native(server: ServerProcess) -> None:  # noqa: F811
    url = server.base_url
    before = {name: metric(url, name) for name in ("fleetserve_prompt_tokens", "fleetserve_generation_tokens")}
    length_before = metric(url, "fleetserve_requests", finish_reason="length")
    e2e_before = scrape(url)["fleetserve_e2e_request_latency_seconds"][
        ("fleetserve_e2e_request_latency_seconds_count", (("model", MODEL),))]
    client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
    r = client.completions.create(model=MODEL, prompt="count me", max_tokens=7, extra_body={"ignore_eos": True})
    assert r.usage is not None
    assert metric(url, "fleetserve_requests", finish_reason="length") == length_before + 1
    assert metric(url, "fleetserve_prompt_tokens") >= before["fleetserve_prompt_tokens"] + r.usage.prompt_tokens
    assert metric(url, "fleetserve_generation_tokens") >= before["fleetserve_generation_tokens"] + 7
    e2e_after = scrape(url)["fleetserve_e2e_request_latency_seconds"][
        ("fleetserve_e2e_request_latency_seconds_count", (("model", MODEL),))]
    assert e2e_after == e2e_before + 1
    # Aliases and natives come from one snapshot per scrape, so they must be equal in it.
    samples = scrape(url)
    pairs = (("vllm:num_requests_waiting", "fleetserve_requests_waiting"),
             ("vllm:num_requests_running", "fleetserve_requests_running"),
             ("vllm:kv_cache_usage_perc", "fleetserve_kv_cache_usage_ratio"),
             ("vllm:gpu_cache_usage_perc", "fleetserve_kv_cache_usage_ratio"))
    for alias, native in pairs:
        assert samples[alias][(alias, (("model_name", MODEL),))] == samples[native][(native, (("model", MODEL),))]
