"""Read queue length and KV-cache usage straight from each ready pod's /metrics.

No Prometheus in between: the operator GETs ``http://<podIP>:<port>/metrics``
of every ready pod concurrently, each bounded by a timeout, and parses the
exposition text with prometheus_client's own parser. It understands
fleetserve's names and vLLM's, so the same autoscaler scales vLLM pods:

==================  ==========================================================
queue (waiting)     ``fleetserve_requests_waiting`` | ``vllm:num_requests_waiting``
queue (running)     ``fleetserve_requests_running`` | ``vllm:num_requests_running``
KV-cache usage 0..1 ``fleetserve_kv_cache_usage_ratio`` | ``vllm:kv_cache_usage_perc``
                    | ``vllm:gpu_cache_usage_perc`` (vLLM before 0.10)
==================  ==========================================================

The first name present wins (a fleetserve server exports both families).
Samples of one name with different labels (vLLM's ``model_name``, ``engine``)
are summed for the queue and averaged for the KV usage.
"""

from __future__ import annotations

import asyncio
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import httpx
from prometheus_client.parser import text_string_to_metric_families

from fleetserve_operator.autoscaler.types import PodMetrics, ScrapeError

WAITING_NAMES = ("fleetserve_requests_waiting", "vllm:num_requests_waiting")
RUNNING_NAMES = ("fleetserve_requests_running", "vllm:num_requests_running")
KV_USAGE_NAMES = ("fleetserve_kv_cache_usage_ratio", "vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc")
_WANTED = frozenset((*WAITING_NAMES, *RUNNING_NAMES, *KV_USAGE_NAMES))

DEFAULT_PORT = 8000


@dataclass(frozen=True)
class ScrapeTarget:
    """Where one ready pod serves /metrics."""

    pod: str
    host: str
    port: int = DEFAULT_PORT

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host  # IPv6 pod IPs
        return f"http://{host}:{self.port}/metrics"


@dataclass(frozen=True)
class ScrapeFailure:
    pod: str
    reason: ScrapeError
    message: str


class MetricsError(Exception):
    """The exposition text was unusable; ``reason`` says which way."""

    def __init__(self, reason: ScrapeError, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class ScrapeResult:
    """What one scrape round got: numbers from the pods that answered, and why the others did not."""

    metrics: tuple[PodMetrics, ...]
    failures: tuple[ScrapeFailure, ...]

    @property
    def errors_by_reason(self) -> dict[ScrapeError, int]:
        return dict(Counter(f.reason for f in self.failures))


def parse_pod_metrics(pod: str, text: str) -> PodMetrics:
    """Extract the queue and KV usage from one exposition text.

    Raises ``MetricsError`` with reason ``parse`` for text that is not valid
    exposition format or holds a non-finite / out-of-range value, and
    ``missing_metric`` naming the names it looked for when a signal is absent.
    """
    samples: dict[str, list[float]] = {}
    try:
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name in _WANTED:
                    samples.setdefault(sample.name, []).append(float(sample.value))
    except (ValueError, TypeError, IndexError) as exc:
        raise MetricsError(ScrapeError.PARSE, f"pod {pod}: /metrics is not Prometheus text format: {exc}") from exc

    waiting = _first(samples, WAITING_NAMES, pod)
    running = _first(samples, RUNNING_NAMES, pod)
    kv_values = _first(samples, KV_USAGE_NAMES, pod)
    for value in (*waiting, *running, *kv_values):
        if not math.isfinite(value) or value < 0:
            raise MetricsError(ScrapeError.PARSE, f"pod {pod}: metric value {value} is not a finite count >= 0")
    kv = sum(kv_values) / len(kv_values)
    if kv > 1.0:
        raise MetricsError(ScrapeError.PARSE,
                           f"pod {pod}: KV-cache usage {kv} is above 1; the autoscaler expects a fraction 0..1 "
                           f"in one of {', '.join(KV_USAGE_NAMES)}")
    return PodMetrics(pod=pod, queue_length=sum(waiting) + sum(running), kv_cache_usage=kv)


def _first(samples: dict[str, list[float]], names: Sequence[str], pod: str) -> list[float]:
    for name in names:
        if name in samples:
            return samples[name]
    raise MetricsError(ScrapeError.MISSING_METRIC, f"pod {pod}: /metrics has none of {', '.join(names)}")


async def scrape_pod(client: httpx.AsyncClient, target: ScrapeTarget, timeout_s: float) -> PodMetrics | ScrapeFailure:
    """GET and parse one pod's /metrics; never raises for a pod's fault."""
    try:
        async with asyncio.timeout(timeout_s):  # bounds slow-drip bodies too, not just each read
            response = await client.get(target.url, timeout=timeout_s)
            body = response.text
    except (TimeoutError, httpx.TimeoutException):
        return ScrapeFailure(target.pod, ScrapeError.TIMEOUT, f"pod {target.pod}: no answer from {target.url} "
                                                              f"within {timeout_s:g} s")
    except httpx.HTTPError as exc:
        return ScrapeFailure(target.pod, ScrapeError.CONNECTION,
                             f"pod {target.pod}: {target.url}: {type(exc).__name__}: {exc}")
    if response.status_code != 200:
        return ScrapeFailure(target.pod, ScrapeError.HTTP_STATUS,
                             f"pod {target.pod}: {target.url} answered HTTP {response.status_code}")
    try:
        return parse_pod_metrics(target.pod, body)
    except MetricsError as exc:
        return ScrapeFailure(target.pod, exc.reason, str(exc))


async def scrape_pods(targets: Sequence[ScrapeTarget], timeout_s: float,
                      client: httpx.AsyncClient | None = None) -> ScrapeResult:
    """Scrape all targets concurrently; the round takes at most about ``timeout_s``."""
    if not targets:
        return ScrapeResult(metrics=(), failures=())
    own_client = client is None
    # trust_env=False: a proxy from the operator's environment must not sit between it and pod IPs.
    http = client or httpx.AsyncClient(trust_env=False, follow_redirects=False)
    try:
        results = await asyncio.gather(*(scrape_pod(http, t, timeout_s) for t in targets))
    finally:
        if own_client:
            await http.aclose()
    metrics = tuple(r for r in results if isinstance(r, PodMetrics))
    failures = tuple(r for r in results if isinstance(r, ScrapeFailure))
    return ScrapeResult(metrics=metrics, failures=failures)


# The router's gauge of requests waiting for a ready replica, and its counter of routed requests.
ROUTER_HELD_NAME = "fleetserve_router_requests_held"
ROUTER_ROUTED_NAME = "fleetserve_router_requests_total"


@dataclass(frozen=True)
class RouterMetrics:
    """One router pod's held requests (gauge) and requests routed so far (counter, all routes)."""

    pod: str
    held: float
    routed: float


def parse_router_metrics(pod: str, text: str) -> RouterMetrics:
    """``fleetserve_router_requests_held`` and the sum of ``fleetserve_router_requests_total``."""
    held: float | None = None
    routed = 0.0
    try:
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == ROUTER_HELD_NAME:
                    held = (held or 0.0) + float(sample.value)
                elif sample.name == ROUTER_ROUTED_NAME:
                    routed += float(sample.value)
    except (ValueError, TypeError, IndexError) as exc:
        raise MetricsError(ScrapeError.PARSE, f"router pod {pod}: /metrics is not Prometheus text format: {exc}") from exc
    if held is None:
        raise MetricsError(ScrapeError.MISSING_METRIC, f"router pod {pod}: /metrics has no {ROUTER_HELD_NAME}")
    if not (math.isfinite(held) and math.isfinite(routed)) or held < 0:
        raise MetricsError(ScrapeError.PARSE, f"router pod {pod}: {ROUTER_HELD_NAME} {held} is not a count >= 0")
    return RouterMetrics(pod=pod, held=held, routed=routed)


async def scrape_routers(targets: Sequence[ScrapeTarget], timeout_s: float) -> tuple[list[RouterMetrics], list[str]]:
    """Scrape every ready router pod concurrently: (what answered, why the others did not)."""
    if not targets:
        return [], []
    async with httpx.AsyncClient(trust_env=False, follow_redirects=False) as http:
        async def one(target: ScrapeTarget) -> RouterMetrics | str:
            try:
                async with asyncio.timeout(timeout_s):
                    response = await http.get(target.url, timeout=timeout_s)
                    body = response.text
            except (TimeoutError, httpx.HTTPError) as exc:
                return f"router pod {target.pod}: {target.url}: {type(exc).__name__}: {exc}"
            if response.status_code != 200:
                return f"router pod {target.pod}: {target.url} answered HTTP {response.status_code}"
            try:
                return parse_router_metrics(target.pod, body)
            except MetricsError as exc:
                return str(exc)

        results = await asyncio.gather(*(one(t) for t in targets))
    return [r for r in results if isinstance(r, RouterMetrics)], [r for r in results if isinstance(r, str)]
