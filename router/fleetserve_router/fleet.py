"""The endpoint table: replicas from discovery, their load from /metrics, their cache epochs, and
the prefix index corrected by the servers' ground truth."""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable, Mapping

import httpx
from prometheus_client.parser import text_string_to_metric_families

from fleetserve_router.hold import HoldQueue
from fleetserve_router.metrics import RouterMetrics
from fleetserve_router.prefill import PendingPrefill, PrefillQueue
from fleetserve_router.prefix_index import PrefixIndex
from fleetserve_router.scoring import Decision, Replica, pick

log = logging.getLogger("fleetserve.router")

EPOCH_HEADER = "x-fleetserve-cache-epoch"
CACHED_TOKENS_HEADER = "x-fleetserve-cached-tokens"

_LOAD_FAMILIES = {"fleetserve_requests_running": "running", "fleetserve_requests_waiting": "waiting",
                  "fleetserve_kv_cache_usage_ratio": "kv_usage",
                  "vllm:num_requests_running": "running", "vllm:num_requests_waiting": "waiting",
                  "vllm:kv_cache_usage_perc": "kv_usage"}


def parse_load(text: str) -> dict[str, float]:
    """running / waiting / kv_usage from a server's /metrics (fleetserve's names, else vLLM's)."""
    found: dict[str, dict[str, float]] = {}
    for family in text_string_to_metric_families(text):
        field = _LOAD_FAMILIES.get(family.name)
        if field is None:
            continue
        native = "native" if family.name.startswith("fleetserve_") else "compat"
        values = found.setdefault(native, {})
        values[field] = values.get(field, 0.0) + sum(s.value for s in family.samples)
    return found.get("native") or found.get("compat") or {}


class Fleet:
    """Replicas by ``host:port``; owns the prefix index and wakes held requests when one turns ready.

    ``static`` mode (no Kubernetes): readiness comes from each replica's /ready; otherwise from
    the EndpointSlices (``set_endpoints``), and /ready is not probed.
    """

    def __init__(self, index: PrefixIndex, hold: HoldQueue, metrics: RouterMetrics, *,
                 static: bool = False, poll_interval: float = 1.0, load_factor: float = 1.25,
                 down_seconds: float = 2.0, chunk_tokens: float = 16.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.index = index
        self.hold = hold
        self.metrics = metrics
        self.static = static
        self.poll_interval = poll_interval
        self.load_factor = load_factor
        self.down_seconds = down_seconds
        self.chunk_tokens = chunk_tokens  # tokens a prompt chunk stands for (the metric's unit)
        self.clock = clock
        self.replicas: dict[str, Replica] = {}
        self._metrics_at: dict[str, float] = {}
        self._down_until: dict[str, float] = {}
        self._pollers: dict[str, asyncio.Task[None]] = {}
        self._tiebreak: dict[str, float] = {}
        self._prefill: dict[str, PrefillQueue] = {}  # per replica: its pending prefill in dispatch order
        self._http = httpx.AsyncClient(timeout=httpx.Timeout(2.0))

    # ---- membership ---------------------------------------------------------------------------

    def set_endpoints(self, keys: set[str]) -> None:
        """Discovery's current ready set (in static mode: the configured list, readiness polled)."""
        for key in set(self.replicas) - keys:
            self.replicas.pop(key)
            self._prefill.pop(key, None)
            self.index.forget_replica(key)  # a replacement pod starts cold
            self.metrics.forget_replica(key)
            task = self._pollers.pop(key, None)
            if task is not None:
                task.cancel()
        for key in keys - set(self.replicas):
            self.replicas[key] = Replica(key, ready=not self.static)
            self._prefill[key] = PrefillQueue()
            self._pollers[key] = asyncio.get_running_loop().create_task(self._poll(key))
        self._changed()

    def mark_down(self, key: str) -> None:
        """A dispatch to ``key`` failed before any response: skip it for a moment."""
        self._down_until[key] = self.clock() + self.down_seconds

    def ready_keys(self) -> list[str]:
        now = self.clock()
        return [k for k, r in self.replicas.items() if r.ready and self._down_until.get(k, 0.0) <= now]

    def _changed(self) -> None:
        ready = self.ready_keys()
        self.metrics.ready_replicas.set(len(ready))
        if ready:
            self.hold.release()

    # ---- picking --------------------------------------------------------------------------------

    def choose(self, hashes: list[bytes], exclude: set[str]) -> Decision | None:
        now = self.clock()
        candidates = []
        for key in self.ready_keys():
            if key in exclude:
                continue
            replica = self.replicas[key]
            replica.metrics_fresh = now - self._metrics_at.get(key, -1e9) <= 3 * self.poll_interval
            queue = self._prefill.get(key)
            replica.prefill_ahead = queue.ahead(now) if queue is not None else None
            candidates.append(replica)
        matches = self.index.match(hashes, [r.key for r in candidates]) if hashes else {}
        for key in self.replicas:
            self._tiebreak[key] = random.random()
        decision = pick(candidates, matches, len(hashes), load_factor=self.load_factor,
                        tiebreak=lambda r: self._tiebreak.get(r.key, 0.0))
        if decision is not None and decision.moved is not None:
            self.metrics.moved[decision.moved].inc()
        if decision is not None and decision.matched_chunks:
            decision.credit_time = self.index.last_used(decision.replica.key, hashes[decision.matched_chunks - 1])
        if decision is not None and hashes:
            self.index.record(decision.replica.key, hashes)  # later requests follow this one at once
            self.metrics.index_entries.set(len(self.index))
        return decision

    def start_prefill(self, decision: Decision) -> PendingPrefill:
        """The chosen replica computes the request's uncached chunks before its first output: they
        count as pending there until ``done()`` (proxy.py calls it at the first output, or at the end)."""
        return PendingPrefill(decision.replica, decision.uncached_chunks, self._show_prefill,
                              self._prefill.get(decision.replica.key), self.clock)

    def _show_prefill(self, replica: Replica) -> None:
        key, pending = replica.key, replica.pending_prefill
        if self.replicas.get(key) is replica:  # a removed replica's label stays removed
            self.metrics.set_pending_prefill(key, pending * self.chunk_tokens)

    # ---- ground truth ----------------------------------------------------------------------------

    def observe_epoch(self, key: str, epoch: str | None) -> None:
        replica = self.replicas.get(key)
        if replica is None or not epoch:
            return
        if replica.cache_epoch is not None and replica.cache_epoch != epoch:
            dropped = self.index.forget_replica(key)
            self.metrics.epoch_resets.inc()
            log.info("replica %s has a new cache epoch; dropped its credit for %d prefix chunks", key, dropped)
        replica.cache_epoch = epoch

    def observe_response(self, key: str, headers: Mapping[str, str], hashes: list[bytes],
                         decision: Decision) -> int | None:
        """Correct the index from a replica's response headers: a new cache epoch drops all its credit
        (the replica now holds this prompt, so that credit is recorded again). Returns the header's
        cached-token count, already applied by ``observe_cached``; None when the headers have none (a
        stream that started before its first output: its final usage event says it)."""
        replica = self.replicas.get(key)
        before = replica.cache_epoch if replica is not None else None
        epoch = headers.get(EPOCH_HEADER)
        self.observe_epoch(key, epoch)
        if before is not None and epoch is not None and epoch != before and hashes:
            self.index.record(key, hashes)
        if decision.matched_chunks > 0:
            self.metrics.prefix_predicted.inc()
        raw = headers.get(CACHED_TOKENS_HEADER)
        cached = int(raw) if raw is not None and raw.isdigit() else None
        if cached is not None:
            self.observe_cached(key, cached, hashes, decision)
        return cached

    def observe_cached(self, key: str, cached: int, hashes: list[bytes], decision: Decision) -> None:
        """The replica's ground truth for one request: ``cached`` prompt tokens were in its prefix cache.
        None where the index predicted a hit means the replica evicted that prefix, and (LRU)
        everything it was credited with no later than that prefix: dropped, and this prompt's credit
        recorded again (the replica holds it now)."""
        self.metrics.cached_tokens.inc(cached)
        if decision.matched_chunks == 0:
            return
        if cached > 0:
            self.metrics.prefix_confirmed.inc()
            return
        self.metrics.prefix_false.inc()
        if decision.credit_time is not None:
            self.index.forget_older(key, decision.credit_time)
        if hashes:
            self.index.record(key, hashes)

    # ---- polling ---------------------------------------------------------------------------------

    async def _poll(self, key: str) -> None:
        base = f"http://{key}"
        while True:
            try:
                if self.static:
                    ready = (await self._http.get(base + "/ready")).status_code == 200
                    replica = self.replicas.get(key)
                    if replica is not None and replica.ready != ready:
                        replica.ready = ready
                        self._changed()
                resp = await self._http.get(base + "/metrics")
                if resp.status_code == 200 and key in self.replicas:
                    load = parse_load(resp.text)
                    replica = self.replicas[key]
                    replica.running = load.get("running", 0.0)
                    replica.waiting = load.get("waiting", 0.0)
                    replica.kv_usage = load.get("kv_usage", 0.0)
                    replica.inflight_at_scrape = replica.inflight
                    self._metrics_at[key] = self.clock()
                    self.observe_epoch(key, resp.headers.get(EPOCH_HEADER))
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if self.static and key in self.replicas and self.replicas[key].ready:
                    self.replicas[key].ready = False
                    self._changed()
                log.debug("polling %s failed: %s", key, exc)
            await asyncio.sleep(self.poll_interval)

    def release_if_ready(self) -> None:
        """Wake held requests if a replica is (again) usable, e.g. after a mark_down expired."""
        self._changed()

    async def close(self) -> None:
        for task in self._pollers.values():
            task.cancel()
        await asyncio.gather(*self._pollers.values(), return_exceptions=True)
        self._pollers.clear()
        await self._http.aclose()
