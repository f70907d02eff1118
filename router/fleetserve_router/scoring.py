"""Endpoint picking, llm-d style: filters -> weighted scorers -> picker. Pure functions on plain data.

A request's candidates are the ready replicas; filters drop the saturated ones and, for bounded
load, those already over 1.25x the mean load (consistent hashing with bounded loads: a hot prefix
spills to the next best replica instead of piling up). Each scorer maps a replica to [0, 1]; the
picker takes the highest weighted sum. With no prefix credit anywhere the choice is least-load;
with stale load figures it fails open to the router's own in-flight counts.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

ROUTE_PREFIX = "prefix"
ROUTE_LEAST_LOAD = "least_load"
ROUTE_FAIL_OPEN = "fail_open"


@dataclass
class Replica:
    """What the router knows about one server replica (``key`` is ``host:port``).

    ``inflight`` is exact (the router's own open requests); ``running``/``waiting``/``kv_usage``
    come from the replica's /metrics and are trusted only while ``metrics_fresh``.
    """

    key: str
    ready: bool = True
    inflight: int = 0
    running: float = 0.0
    waiting: float = 0.0
    kv_usage: float = 0.0
    metrics_fresh: bool = False
    cache_epoch: str | None = None

    @property
    def load(self) -> float:
        """Requests on the replica: its own count when fresh (other routers' requests too), never
        below what this router has open on it (metrics lag a scrape behind)."""
        if self.metrics_fresh:
            return max(float(self.inflight), self.running + self.waiting)
        return float(self.inflight)


@dataclass(frozen=True)
class Weights:
    """Scorer weights. Prefix dominates because a hit saves a whole prefill; load and KV break
    ties and steer unshared prompts (see BENCHMARKS.md for how they were checked)."""

    prefix: float = 2.0
    queue: float = 1.0
    kv: float = 0.5


@dataclass
class Decision:
    replica: Replica
    route: str
    matched_chunks: int = 0
    # when the index last credited the chosen replica with the matched prefix (before this request)
    credit_time: float | None = None
    scores: dict[str, float] = field(default_factory=dict)


# ---- filters ---------------------------------------------------------------------------------

def filter_ready(replicas: Sequence[Replica]) -> list[Replica]:
    return [r for r in replicas if r.ready]


def filter_saturated(replicas: Sequence[Replica], kv_threshold: float = 0.95) -> list[Replica]:
    """Drop replicas whose KV cache is nearly full with requests already waiting; if every replica
    is saturated keep them all (the servers queue, which beats refusing here)."""
    kept = [r for r in replicas if not (r.metrics_fresh and r.kv_usage >= kv_threshold and r.waiting > 0)]
    return kept or list(replicas)


MIN_CAPACITY = 2.0


def bounded_load_capacity(replicas: Sequence[Replica], factor: float = 1.25) -> float:
    """The most load a replica may carry after taking one more request: ``factor`` x the mean
    load including that request, as in consistent hashing with bounded loads — but at least
    ``MIN_CAPACITY``: near idle the strict bound (1 while the mean is below 0.8) would send a
    conversation's next turn away from its cache whenever its replica had a single request running,
    which continuous batching serves side by side at almost no cost."""
    total = sum(r.load for r in replicas) + 1.0
    return max(MIN_CAPACITY, math.ceil(factor * total / len(replicas)))


def filter_bounded_load(replicas: Sequence[Replica], factor: float = 1.25) -> list[Replica]:
    """Replicas that stay within the bound after one more request. Never empty: the least loaded
    replica is always within it (its load is at most the mean)."""
    if not replicas:
        return []
    capacity = bounded_load_capacity(replicas, factor)
    return [r for r in replicas if r.load + 1.0 <= capacity] or [min(replicas, key=lambda r: r.load)]


# ---- scorers (each -> [0, 1]) ----------------------------------------------------------------

def score_prefix(matched_chunks: int, total_chunks: int) -> float:
    return matched_chunks / total_chunks if total_chunks > 0 else 0.0


def score_queue(replica: Replica, max_load: float) -> float:
    return 1.0 - replica.load / max_load if max_load > 0 else 1.0


def score_kv(replica: Replica) -> float:
    return 1.0 - min(max(replica.kv_usage, 0.0), 1.0) if replica.metrics_fresh else 0.5


# ---- picker ----------------------------------------------------------------------------------

def pick(replicas: Sequence[Replica], matches: dict[str, int], total_chunks: int, *,
         weights: Weights = Weights(), load_factor: float = 1.25,
         tiebreak: Callable[[Replica], float] = lambda r: 0.0) -> Decision | None:
    """The replica for one request, or None when no replica is ready (the caller holds it).

    ``matches``: leading prompt chunks each replica is credited with (the prefix index);
    ``tiebreak``: a small per-replica value that orders exact ties (random in production, so equal
    replicas share unshared traffic).
    """
    candidates = filter_ready(replicas)
    if not candidates:
        return None
    if not any(r.metrics_fresh for r in candidates):
        # Load figures are stale: fall back to what the router knows for sure.
        chosen = min(candidates, key=lambda r: (r.inflight, tiebreak(r)))
        return Decision(chosen, ROUTE_FAIL_OPEN, matches.get(chosen.key, 0))
    candidates = filter_bounded_load(filter_saturated(candidates), load_factor)
    if not any(matches.get(r.key, 0) for r in candidates):
        chosen = min(candidates, key=lambda r: (r.load, r.kv_usage, tiebreak(r)))
        return Decision(chosen, ROUTE_LEAST_LOAD, 0)
    max_load = max(r.load for r in candidates) + 1.0
    best: tuple[float, float] | None = None
    decision: Decision | None = None
    for r in candidates:
        scores = {"prefix": score_prefix(matches.get(r.key, 0), total_chunks),
                  "queue": score_queue(r, max_load), "kv": score_kv(r)}
        total = weights.prefix * scores["prefix"] + weights.queue * scores["queue"] + weights.kv * scores["kv"]
        key = (total, -tiebreak(r))
        if best is None or key > best:
            best = key
            matched = matches.get(r.key, 0)
            decision = Decision(r, ROUTE_PREFIX if matched else ROUTE_LEAST_LOAD, matched, scores=scores)
    return decision
