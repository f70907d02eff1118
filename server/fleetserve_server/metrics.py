"""Prometheus metrics of the server: the only module that imports prometheus_client.

Two sources feed it. The engine's ``EngineStats`` snapshot (queue lengths, KV
blocks, cumulative token and cache counters) is read when ``/metrics`` is
scraped, so gauges are never stale and counters are exactly the engine's.
Per-request timings (queue time, TTFT, TPOT, end-to-end) are observed into
histograms when a request finishes, from the timings on its last
``RequestOutputDelta``. The ``vllm:`` aliases are rendered from the same
snapshot as their native twins, so the two always agree within a scrape.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from fleetserve_server.engine.interfaces import EngineStats, RequestOutputDelta

# `_created` samples double every counter's series for no value to the autoscaler.
prometheus_client.disable_created_metrics()

CONTENT_TYPE = prometheus_client.CONTENT_TYPE_LATEST

FINISH_REASONS = ("stop", "length", "abort", "error")
REJECT_REASONS = ("queue_full", "invalid", "unauthorized", "draining")

# LLM latencies span milliseconds (a cached short prompt on a GPU) to minutes
# (a long generation on a CPU), so the buckets are roughly log-spaced over that range.
TTFT_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0)
TPOT_BUCKETS = (0.001, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3,
                0.4, 0.5, 0.75, 1.0, 2.5, 5.0)
E2E_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
               240.0, 480.0, 960.0)
QUEUE_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0,
                 160.0)
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256, 512)


class ServerMetrics:
    """The server's metric registry for one served model.

    ``stats_source`` returns the engine's current snapshot, or None while the
    model is loading (then the engine-derived metrics are simply absent).
    """

    def __init__(self, model: str, stats_source: Callable[[], EngineStats | None]) -> None:
        self.model = model
        self._stats_source = stats_source
        self._snapshot: EngineStats | None = None
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests_total = Counter(
            "fleetserve_requests_total", "Finished requests by finish reason.",
            ["model", "finish_reason"], registry=r)
        self.rejected_total = Counter(
            "fleetserve_requests_rejected_total", "Requests refused before reaching the engine, by reason.",
            ["model", "reason"], registry=r)
        self.ttft = Histogram(
            "fleetserve_time_to_first_token_seconds", "Seconds from arrival to the first output token.",
            ["model"], buckets=TTFT_BUCKETS, registry=r)
        self.tpot = Histogram(
            "fleetserve_time_per_output_token_seconds", "Mean seconds between output tokens after the first.",
            ["model"], buckets=TPOT_BUCKETS, registry=r)
        self.e2e = Histogram(
            "fleetserve_e2e_request_latency_seconds", "Seconds from arrival to the last output token.",
            ["model"], buckets=E2E_BUCKETS, registry=r)
        self.queue_time = Histogram(
            "fleetserve_request_queue_time_seconds", "Seconds a request waited before its first schedule.",
            ["model"], buckets=QUEUE_BUCKETS, registry=r)
        self.batch_size = Histogram(
            "fleetserve_batch_size", "Sequences per engine step.",
            ["model"], buckets=BATCH_SIZE_BUCKETS, registry=r)
        self.memory_bytes = Gauge(
            "fleetserve_model_memory_bytes", "Device memory held by the model, by kind.",
            ["model", "kind"], registry=r)
        self.info = Gauge(
            "fleetserve_model_info", "The served model's configuration (value is always 1).",
            ["model", "quantization", "dtype", "max_model_len"], registry=r)
        for reason in FINISH_REASONS:
            self.requests_total.labels(model, reason)
        for reason in REJECT_REASONS:
            self.rejected_total.labels(model, reason)
        for hist in (self.ttft, self.tpot, self.e2e, self.queue_time, self.batch_size):
            hist.labels(model)
        r.register(_EngineStatsCollector(self))

    def set_model(self, *, quantization: str, dtype: str, max_model_len: int,
                  weights_bytes: int, kv_cache_bytes: int) -> None:
        """Record the loaded model's static facts (called once, after loading)."""
        self.info.labels(self.model, quantization, dtype, str(max_model_len)).set(1)
        self.memory_bytes.labels(self.model, "weights").set(weights_bytes)
        self.memory_bytes.labels(self.model, "kv_cache").set(kv_cache_bytes)

    def observe_finished(self, final: RequestOutputDelta, finish_reason: str) -> None:
        """Count one finished request and observe its timings (those the engine measured)."""
        self.requests_total.labels(self.model, finish_reason).inc()
        if final.queue_time is not None:
            self.queue_time.labels(self.model).observe(final.queue_time)
        if final.time_to_first_token is not None:
            self.ttft.labels(self.model).observe(final.time_to_first_token)
        if final.e2e_latency is not None:
            self.e2e.labels(self.model).observe(final.e2e_latency)
            tpot = time_per_output_token(final)
            if tpot is not None:
                self.tpot.labels(self.model).observe(tpot)

    def observe_rejected(self, reason: str) -> None:
        self.rejected_total.labels(self.model, reason).inc()

    def refresh(self) -> EngineStats | None:
        """Take a fresh engine snapshot and fold its per-step batch sizes into the histogram.

        Called before every scrape and periodically (the engine buffers batch
        sizes only until the next snapshot).
        """
        snapshot = self._stats_source()
        if snapshot is not None:
            hist = self.batch_size.labels(self.model)
            for size in snapshot.recent_batch_sizes:
                hist.observe(size)
            self._snapshot = snapshot
        return snapshot

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric, from a fresh snapshot."""
        self.refresh()
        return prometheus_client.generate_latest(self.registry)


def time_per_output_token(final: RequestOutputDelta) -> float | None:
    """(e2e - TTFT) / (completion tokens - 1); undefined for fewer than two tokens."""
    if final.e2e_latency is None or final.time_to_first_token is None or final.completion_tokens < 2:
        return None
    return max(final.e2e_latency - final.time_to_first_token, 0.0) / (final.completion_tokens - 1)


class _EngineStatsCollector(Collector):
    """Renders the last engine snapshot as gauges and counters at scrape time."""

    def __init__(self, metrics: ServerMetrics) -> None:
        self._metrics = metrics

    def describe(self) -> list[Metric]:
        # Names are fixed; returning none keeps registration from calling collect() early.
        return []

    def collect(self) -> Iterator[Metric]:
        s = self._metrics._snapshot
        if s is None:
            return
        model = self._metrics.model

        def gauge(name: str, doc: str, value: float, label: str = "model") -> GaugeMetricFamily:
            g = GaugeMetricFamily(name, doc, labels=[label])
            g.add_metric([model], value)
            return g

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            c = CounterMetricFamily(name, doc, labels=["model"])
            c.add_metric([model], value)
            return c

        yield gauge("fleetserve_requests_waiting", "Requests waiting to be scheduled.", s.requests_waiting)
        yield gauge("fleetserve_requests_running", "Requests being generated.", s.requests_running)
        yield gauge("fleetserve_kv_cache_usage_ratio", "KV cache blocks in use / total (0..1).",
                    s.kv_cache_usage_ratio)
        yield gauge("fleetserve_kv_cache_blocks_total", "KV cache blocks in the pool.", s.kv_blocks_total)
        yield gauge("fleetserve_kv_cache_blocks_free", "KV cache blocks not in use.", s.kv_blocks_free)
        yield gauge("fleetserve_kv_cache_capacity_tokens", "Tokens the KV cache can hold.",
                    s.kv_capacity_tokens)
        yield counter("fleetserve_prefix_cache_queries_total", "Prompt tokens looked up in the prefix cache.",
                      s.prefix_cache_queries_tokens)
        yield counter("fleetserve_prefix_cache_hits_total", "Prompt tokens found in the prefix cache.",
                      s.prefix_cache_hits_tokens)
        evictions = CounterMetricFamily("fleetserve_kv_cache_evictions_total",
                                        "Cached KV blocks freed, by reason.", labels=["model", "reason"])
        for reason in ("expired", "pressure"):
            evictions.add_metric([model, reason], s.evictions.get(reason, 0))
        yield evictions
        yield counter("fleetserve_preemptions_total", "Running sequences preempted for KV space.",
                      s.preemptions)
        yield counter("fleetserve_prompt_tokens_total", "Prompt tokens processed.", s.prompt_tokens)
        yield counter("fleetserve_generation_tokens_total", "Tokens generated.", s.generation_tokens)
        # vLLM-compatible aliases (label `model_name`, as vLLM spells it).
        yield gauge("vllm:num_requests_waiting", "Alias of fleetserve_requests_waiting.",
                    s.requests_waiting, "model_name")
        yield gauge("vllm:num_requests_running", "Alias of fleetserve_requests_running.",
                    s.requests_running, "model_name")
        yield gauge("vllm:kv_cache_usage_perc", "Alias of fleetserve_kv_cache_usage_ratio (0..1).",
                    s.kv_cache_usage_ratio, "model_name")
        yield gauge("vllm:gpu_cache_usage_perc", "Alias of fleetserve_kv_cache_usage_ratio (0..1).",
                    s.kv_cache_usage_ratio, "model_name")
