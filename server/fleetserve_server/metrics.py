"""Prometheus metrics of the server: the only module that imports prometheus_client.

Two sources feed it. The engine's ``EngineStats`` snapshot (queue lengths, KV
blocks, cumulative token and cache counters) is read when ``/metrics`` is
scraped, so gauges are never stale and counters are exactly the engine's.
Per-request timings (queue time, TTFT, TPOT, end-to-end) and output statistics
(tokens, mean token negative log-probability and entropy, temperature, cut at
max_tokens) are observed into histograms when a request finishes, from its last
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
# Output-quality statistics: a request's generated tokens, the mean log-probability of its sampled
# tokens and the mean entropy (nats) of the model's next-token distributions, the temperature asked.
OUTPUT_TOKENS_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)
# (The log-probability is exported negated, as a negative log-likelihood: a histogram with negative
# buckets has no _sum in the exposition format, and the fleet's mean needs it.)
TOKEN_NLL_BUCKETS = (0.05, 0.1, 0.15, 0.25, 0.35, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0, 2.5, 3.0, 3.5, 4.0, 5.0, 6.0,
                     8.0)
TOKEN_ENTROPY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0, 2.5, 3.0, 3.5, 4.0, 5.0, 6.0, 8.0)
TEMPERATURE_BUCKETS = (0.0, 0.1, 0.2, 0.3, 0.5, 0.7, 0.8, 0.9, 1.0, 1.2, 1.5, 2.0)


EVICTION_REASONS = ("expired", "pressure")

# The series rendered from the engine snapshot at scrape time: (family, native name,
# help, EngineStats field, vLLM aliases). The aliases follow all native series.
_SNAPSHOT_SERIES: tuple[tuple[type[GaugeMetricFamily] | type[CounterMetricFamily], str, str, str,
                              tuple[str, ...]], ...] = (
    (GaugeMetricFamily, "fleetserve_requests_waiting", "Requests waiting to be scheduled.",
     "requests_waiting", ("vllm:num_requests_waiting",)),
    (GaugeMetricFamily, "fleetserve_requests_running", "Requests being generated.",
     "requests_running", ("vllm:num_requests_running",)),
    (GaugeMetricFamily, "fleetserve_kv_cache_usage_ratio", "KV cache blocks in use / total (0..1).",
     "kv_cache_usage_ratio", ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc")),
    (GaugeMetricFamily, "fleetserve_kv_cache_blocks_total", "KV cache blocks in the pool.",
     "kv_blocks_total", ()),
    (GaugeMetricFamily, "fleetserve_kv_cache_blocks_free", "KV cache blocks not in use.",
     "kv_blocks_free", ()),
    (GaugeMetricFamily, "fleetserve_kv_cache_capacity_tokens", "Tokens the KV cache can hold.",
     "kv_capacity_tokens", ()),
    (CounterMetricFamily, "fleetserve_prefix_cache_queries_total", "Prompt tokens looked up in the prefix cache.",
     "prefix_cache_queries_tokens", ()),
    (CounterMetricFamily, "fleetserve_prefix_cache_hits_total", "Prompt tokens found in the prefix cache.",
     "prefix_cache_hits_tokens", ()),
    (CounterMetricFamily, "fleetserve_kv_cache_evictions_total", "Cached KV blocks freed, by reason.",
     "evictions", ()),
    (CounterMetricFamily, "fleetserve_preemptions_total", "Running sequences preempted for KV space.",
     "preemptions", ()),
    (CounterMetricFamily, "fleetserve_prompt_tokens_total", "Prompt tokens processed.", "prompt_tokens", ()),
    (CounterMetricFamily, "fleetserve_generation_tokens_total", "Tokens generated.", "generation_tokens", ()),
)


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
        def histogram(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
            return Histogram(name, doc, ["model"], buckets=buckets, registry=r)

        self.ttft = histogram("fleetserve_time_to_first_token_seconds",
                              "Seconds from arrival to the first output token.", TTFT_BUCKETS)
        self.tpot = histogram("fleetserve_time_per_output_token_seconds",
                              "Mean seconds between output tokens after the first.", TPOT_BUCKETS)
        self.e2e = histogram("fleetserve_e2e_request_latency_seconds",
                             "Seconds from arrival to the last output token.", E2E_BUCKETS)
        self.queue_time = histogram("fleetserve_request_queue_time_seconds",
                                    "Seconds a request waited before its first schedule.", QUEUE_BUCKETS)
        self.batch_size = histogram("fleetserve_batch_size", "Sequences per engine step.", BATCH_SIZE_BUCKETS)
        self.output_tokens = histogram("fleetserve_output_tokens", "Tokens generated per finished request.",
                                       OUTPUT_TOKENS_BUCKETS)
        self.token_nll = histogram(
            "fleetserve_output_token_nll_nats",
            "Per finished request: mean negative log-probability (nats) of its sampled tokens under the "
            "model's raw distribution (the log of the output's perplexity).", TOKEN_NLL_BUCKETS)
        self.token_entropy = histogram(
            "fleetserve_output_mean_token_entropy_nats",
            "Per finished request: mean entropy (nats) of the model's next-token distribution "
            "(temperature 1) over its generated tokens.", TOKEN_ENTROPY_BUCKETS)
        self.temperature = histogram("fleetserve_request_temperature", "Sampling temperature of finished requests.",
                                     TEMPERATURE_BUCKETS)
        self.max_tokens_total = Counter(
            "fleetserve_requests_max_tokens_total",
            "Finished requests whose output was cut at their max_tokens.", ["model"], registry=r)
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
        for hist in (self.ttft, self.tpot, self.e2e, self.queue_time, self.batch_size, self.output_tokens,
                     self.token_nll, self.token_entropy, self.temperature):
            hist.labels(model)
        self.max_tokens_total.labels(model)
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
        stats = final.output_stats
        if stats is not None and finish_reason in ("stop", "length"):  # outputs the model completed
            self.output_tokens.labels(self.model).observe(final.completion_tokens)
            self.temperature.labels(self.model).observe(stats.temperature)
            if stats.max_tokens_reached:
                self.max_tokens_total.labels(self.model).inc()
            if stats.mean_token_logprob is not None:
                self.token_nll.labels(self.model).observe(-stats.mean_token_logprob)
            if stats.mean_token_entropy is not None:
                self.token_entropy.labels(self.model).observe(stats.mean_token_entropy)

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
        families: list[Metric] = []
        aliases: list[Metric] = []
        for family, name, doc, field, alias_names in _SNAPSHOT_SERIES:
            value = getattr(s, field)
            if isinstance(value, dict):  # evictions by reason
                f = family(name, doc, labels=["model", "reason"])
                for reason in EVICTION_REASONS:
                    f.add_metric([model, reason], value.get(reason, 0))
            else:
                f = family(name, doc, labels=["model"])
                f.add_metric([model], value)
            families.append(f)
            for alias in alias_names:  # vLLM-compatible aliases (label `model_name`, as vLLM spells it)
                a = family(alias, f"Alias of {name}{' (0..1)' if '(0..1)' in doc else ''}.", labels=["model_name"])
                a.add_metric([model], value)
                aliases.append(a)
        yield from families
        yield from aliases
