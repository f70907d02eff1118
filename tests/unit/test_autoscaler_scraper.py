"""The scraper against real HTTP servers on 127.0.0.1: fleetserve's own exposition
(rendered by the server's metrics module), vLLM's names only (current and
pre-0.10), and every way a pod can fail to answer."""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import prometheus_client
import pytest
from fleetserve_operator.autoscaler import AutoscalingPolicy, FleetObservation, History, plan_replicas
from fleetserve_operator.autoscaler.scraper import (
    MetricsError,
    ScrapeTarget,
    parse_pod_metrics,
    scrape_pods,
)
from fleetserve_operator.autoscaler.types import ScrapeError
from fleetserve_server.engine.interfaces import EngineStats
from fleetserve_server.metrics import ServerMetrics
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

Load = tuple[int, int, float]  # waiting, running, KV usage


def fleetserve_exposition(load: Load) -> bytes:
    """What a fleetserve pod serves, from the server's own metrics module."""
    waiting, running, kv = load
    stats = EngineStats(requests_waiting=waiting, requests_running=running, kv_blocks_total=1000,
                        kv_blocks_free=int(1000 * (1 - kv)), kv_cache_usage_ratio=kv, kv_capacity_tokens=16000)
    return ServerMetrics("smollm2-135m-instruct", lambda: stats).render()


def vllm_exposition(load: Load, *, old: bool = False) -> bytes:
    """What a vLLM pod serves: only `vllm:` names, labels `model_name` and `engine`,
    plus neighbours the scraper must skip. ``old`` = vLLM < 0.10 (gpu_cache_usage_perc only)."""
    waiting, running, kv = load
    registry = CollectorRegistry()
    labels = ["model_name", "engine"]
    model = ("meta-llama/Llama-3.1-8B-Instruct", "0")
    Gauge("vllm:num_requests_running", "Number of requests in model execution batches.", labels,
          registry=registry).labels(*model).set(running)
    Gauge("vllm:num_requests_waiting", "Number of requests waiting to be processed.", labels,
          registry=registry).labels(*model).set(waiting)
    kv_name = "vllm:gpu_cache_usage_perc" if old else "vllm:kv_cache_usage_perc"
    Gauge(kv_name, "KV-cache usage. 1 means 100 percent usage.", labels, registry=registry).labels(*model).set(kv)
    Counter("vllm:prompt_tokens", "Number of prefill tokens processed.", labels,
            registry=registry).labels(*model).inc(12345)
    Histogram("vllm:time_to_first_token_seconds", "Histogram of time to first token in seconds.", labels,
              registry=registry).labels(*model).observe(0.2)
    return prometheus_client.generate_latest(registry)


@contextmanager
def metrics_server(respond: Callable[[BaseHTTPRequestHandler], None]) -> Iterator[ScrapeTarget]:
    """A real HTTP server on 127.0.0.1 with an OS-chosen port."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            respond(self)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    try:
        yield ScrapeTarget(pod=f"pod-{server.server_address[1]}", host="127.0.0.1", port=server.server_address[1])
    finally:
        server.shutdown()
        server.server_close()


def serving(body: bytes, status: int = 200) -> Callable[[BaseHTTPRequestHandler], None]:
    def respond(handler: BaseHTTPRequestHandler) -> None:
        assert handler.path == "/metrics"
        handler.send_response(status)
        handler.send_header("Content-Type", prometheus_client.CONTENT_TYPE_LATEST)
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        handler.wfile.write(body)
    return respond


@contextmanager
def fleet_of(bodies: list[bytes]) -> Iterator[list[ScrapeTarget]]:
    targets: list[ScrapeTarget] = []
    managers = [metrics_server(serving(b)) for b in bodies]
    try:
        for m in managers:
            targets.append(m.__enter__())
        yield targets
    finally:
        for m in reversed(managers[:len(targets)]):
            m.__exit__(None, None, None)


POLICY = AutoscalingPolicy(min_replicas=1, max_replicas=8, target_queue_length=4, target_kv_cache_usage=0.7,
                           scale_down_stabilization_s=0)

SCENARIOS: list[list[Load]] = [
    [(10, 4, 0.30), (9, 4, 0.35), (12, 4, 0.20)],   # queue-driven scale-up
    [(0, 2, 0.95), (1, 2, 0.90), (0, 1, 0.85)],     # KV-driven scale-up, short queue
    [(0, 0, 0.01), (0, 1, 0.02), (0, 0, 0.00)],     # idle: scale down
    [(3, 1, 0.70), (4, 0, 0.72), (3, 1, 0.69)],     # on target: stay
]


def decide(targets: list[ScrapeTarget]) -> tuple[int, str, tuple[tuple[float, float], ...]]:
    result = asyncio.run(scrape_pods(targets, timeout_s=5.0))
    assert result.failures == ()
    obs = FleetObservation(current_replicas=len(targets), ready=len(targets), metrics=result.metrics)
    decision = plan_replicas(obs, POLICY, History(), now=0)
    values = tuple(sorted((m.queue_length, m.kv_cache_usage) for m in result.metrics))
    return decision.desired, decision.reason, values


@pytest.mark.parametrize("loads", SCENARIOS)
def test_vllm_only_pods_yield_the_same_decisions_as_fleetserve_pods(loads: list[Load]) -> None:
    with fleet_of([fleetserve_exposition(x) for x in loads]) as targets:
        native = decide(targets)
    with fleet_of([vllm_exposition(x) for x in loads]) as targets:
        vllm = decide(targets)
    with fleet_of([vllm_exposition(x, old=True) for x in loads]) as targets:
        old_vllm = decide(targets)
    assert native == vllm == old_vllm
    expected_queue = sorted(float(w + r) for w, r, _ in loads)
    assert [q for q, _ in native[2]] == expected_queue


def test_scenarios_cover_up_down_and_stay() -> None:
    """Guards the equivalence test above against comparing only trivial decisions."""
    desired = []
    for loads in SCENARIOS:
        with fleet_of([fleetserve_exposition(x) for x in loads]) as targets:
            desired.append(decide(targets)[0])
    # queue 43 / 4 → 11, limited to 7 per step; KV 3 × 0.9 / 0.7 → 4; idle 3 → 1, limited to 2 (half
    # per minute); on target → 3
    assert desired == [7, 4, 2, 3]


def test_each_failure_is_counted_under_its_reason() -> None:
    release = threading.Event()

    def slow(handler: BaseHTTPRequestHandler) -> None:
        release.wait(10)  # answers nothing; the scraper has given up by then

    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        dead_port = closed.getsockname()[1]
    # The port is closed again: connecting to it is refused.
    dead = ScrapeTarget(pod="dead", host="127.0.0.1", port=dead_port)
    try:
        with metrics_server(slow) as slow_t, \
                metrics_server(serving(b"this is { not metrics\n")) as garbage, \
                metrics_server(serving(b"# TYPE up gauge\nup 1\n")) as bare, \
                metrics_server(serving(b"oops", status=500)) as broken, \
                metrics_server(serving(fleetserve_exposition((2, 1, 0.5)))) as good:
            result = asyncio.run(scrape_pods([slow_t, garbage, bare, broken, good, dead], timeout_s=0.5))
            release.set()
    finally:
        release.set()
    assert [m.pod for m in result.metrics] == [good.pod]
    assert result.metrics[0].queue_length == 3 and result.metrics[0].kv_cache_usage == 0.5
    reasons = {f.pod: f.reason for f in result.failures}
    assert reasons == {slow_t.pod: ScrapeError.TIMEOUT, garbage.pod: ScrapeError.PARSE,
                       bare.pod: ScrapeError.MISSING_METRIC, broken.pod: ScrapeError.HTTP_STATUS,
                       "dead": ScrapeError.CONNECTION}
    assert result.errors_by_reason == {ScrapeError.TIMEOUT: 1, ScrapeError.PARSE: 1, ScrapeError.MISSING_METRIC: 1,
                                       ScrapeError.HTTP_STATUS: 1, ScrapeError.CONNECTION: 1}
    missing = next(f for f in result.failures if f.pod == bare.pod)
    assert "fleetserve_requests_waiting" in missing.message and "vllm:num_requests_waiting" in missing.message


def test_kv_usage_above_one_is_rejected_not_guessed() -> None:
    text = "vllm:num_requests_waiting 0\nvllm:num_requests_running 1\nvllm:kv_cache_usage_perc 85\n"
    with pytest.raises(MetricsError, match="fraction 0..1") as info:
        parse_pod_metrics("p", text)
    assert info.value.reason is ScrapeError.PARSE


def test_samples_with_several_label_sets_sum_the_queue_and_average_kv() -> None:
    text = ('vllm:num_requests_waiting{engine="0"} 2\nvllm:num_requests_waiting{engine="1"} 3\n'
            'vllm:num_requests_running{engine="0"} 1\nvllm:num_requests_running{engine="1"} 1\n'
            'vllm:kv_cache_usage_perc{engine="0"} 0.2\nvllm:kv_cache_usage_perc{engine="1"} 0.6\n')
    metrics = parse_pod_metrics("p", text)
    assert metrics.queue_length == 7
    assert metrics.kv_cache_usage == pytest.approx(0.4)
