"""EndpointSlice -> ready endpoints, and /metrics -> load (plain data)."""

from __future__ import annotations

from fleetserve_router.discovery import ready_endpoints
from fleetserve_router.fleet import parse_load


def slice_(endpoints: list[dict], ports: list[dict] | None = None) -> dict:  # type: ignore[type-arg]
    return {"ports": ports if ports is not None else [{"name": "http", "port": 8000}], "endpoints": endpoints}


def test_only_ready_non_terminating_endpoints_on_the_named_port() -> None:
    slices = {
        "s1": slice_([
            {"addresses": ["198.18.0.5"], "conditions": {"ready": True}},
            {"addresses": ["198.18.0.6"], "conditions": {"ready": False}},
            {"addresses": ["198.18.0.7"], "conditions": {"ready": True, "terminating": True}},
            {"addresses": ["198.18.0.8"], "conditions": {}},  # nil ready means ready
        ]),
        "s2": slice_([{"addresses": ["fd00::1"], "conditions": {"ready": True}}],
                     ports=[{"name": "metrics", "port": 9000}, {"name": "http", "port": 8001}]),
        "s3": slice_([{"addresses": ["198.18.0.9"]}], ports=[{"name": "other", "port": 1}, {"name": "x", "port": 2}]),
    }
    assert ready_endpoints(slices, "http") == {"198.18.0.5:8000", "198.18.0.8:8000", "[fd00::1]:8001"}


def test_parse_load_prefers_native_names_and_sums_labels() -> None:
    text = ('fleetserve_requests_running{model="m"} 2\nfleetserve_requests_waiting{model="m"} 3\n'
            'fleetserve_kv_cache_usage_ratio{model="m"} 0.5\nvllm:num_requests_running{model_name="m"} 9\n')
    assert parse_load(text) == {"running": 2.0, "waiting": 3.0, "kv_usage": 0.5}
    assert parse_load('vllm:num_requests_waiting{model_name="m"} 4\n') == {"waiting": 4.0}
