"""Endpoint picking, llm-d style: filters -> a cost -> picker. Pure functions on plain data.

A request's candidates are the ready replicas; filters drop the saturated ones and, for bounded
load, those already over 1.25x the mean load in requests (consistent hashing with bounded loads: a
hot prefix spills to the next best replica instead of piling up). Among the rest the picker takes the
replica where the request's first token should come soonest, counted in prompt chunks (~16 tokens):

    expected wait = the replica's pending prefill
                    + the request's own uncached chunks there (its chunks - the prefix the index credits)

A replica's *pending prefill* is the uncached prompt chunks this router sent it that have produced no
output yet (proxy.py adds a request's uncached chunks when it dispatches it and takes them off at its
first output event, or when it ends in any other way). An engine computes the prompts queued ahead
before a new prompt's first token (next to a prefill's hundreds of tokens a running request adds one
token a step), so that is most of the wait. A request count is blind to it: a replica prefilling a
900-token document counts 1, as much as one finishing a 12-word question, and a second document sent
there waits behind the first. So a new document goes to the replica with the least prefill ahead; a
conversation's later turn (its history cached where its previous turn went) stays there unless that
replica has more prefill queued than the history is long. Equal waits go to the longer prefix match
(less work for the fleet), then to fewer requests, the emptier KV cache, and then at random. Only this
router's requests are counted as pending: another router's are in the replica's requests only.

Pending prefill counts a request whole until its first output, but the replica is computing it all
along: a document dispatched 2 s ago may be mostly done. So the cost takes each replica's *prefill
ahead* where there is an estimate (``prefill.PrefillQueue``: the pending requests drained oldest first
at the replica's measured prefill rate), never more than the pending count; a later turn then leaves
its history only for prefill that is really still ahead of it.

A request's *load* in the bound is this router's own requests on the replica (exact) plus the others'
that the last scrape counted: a scrape lags, and the requests of this router that ended since it must
not hold a conversation's next turn off its replica.

When a request does not go to the ready replica with its longest prefix match, ``Decision.moved`` says
why (saturated, bounded_load, prefill_ahead): the router counts it (``fleetserve_router_prefix_moves``).

With stale load figures the choice fails open to the router's own in-flight counts (then its pending
prefill).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

ROUTE_PREFIX = "prefix"
ROUTE_LEAST_LOAD = "least_load"
ROUTE_FAIL_OPEN = "fail_open"

# why a request did not go to the ready replica with its longest prefix match
MOVE_SATURATED = "saturated"  # that replica's KV cache is full with requests waiting
MOVE_BOUNDED_LOAD = "bounded_load"  # it is at the load bound (1.25x the mean) while others have room
MOVE_PREFILL = "prefill_ahead"  # it has more prefill queued than recomputing the prefix elsewhere costs
MOVES = (MOVE_SATURATED, MOVE_BOUNDED_LOAD, MOVE_PREFILL)


@dataclass
class Replica:
    """What the router knows about one server replica (``key`` is ``host:port``).

    ``inflight`` is exact (the router's own open requests); ``pending_prefill`` is exact too: the
    uncached prompt chunks of those requests that have no output yet (>= 0, 0 when none is open);
    ``running``/``waiting``/``kv_usage`` come from the replica's /metrics and are trusted only while
    ``metrics_fresh``.
    """

    key: str
    ready: bool = True
    inflight: int = 0
    pending_prefill: int = 0
    running: float = 0.0
    waiting: float = 0.0
    kv_usage: float = 0.0
    metrics_fresh: bool = False
    cache_epoch: str | None = None
    # this router's ``inflight`` when ``running``/``waiting`` were scraped
    inflight_at_scrape: int = 0
    # ``pending_prefill`` less what the replica has computed since (``prefill.PrefillQueue``), set
    # before each pick; None: no estimate (the whole pending prefill counts)
    prefill_ahead: float | None = None

    @property
    def load(self) -> float:
        """Requests on the replica: this router's own, exact, plus the others' (other routers',
        direct clients') as the last fresh scrape counted them. Not ``running + waiting`` alone: that
        lags a scrape behind, so requests that ended since still counted and a conversation's next
        turn was pushed off its replica by the load bound for a load that was gone."""
        if self.metrics_fresh:
            return float(self.inflight) + max(0.0, self.running + self.waiting - self.inflight_at_scrape)
        return float(self.inflight)


@dataclass
class Decision:
    replica: Replica
    route: str
    matched_chunks: int = 0
    # the request's prompt chunks the chosen replica is not credited with: its own prefill there
    uncached_chunks: int = 0
    # when the index last credited the chosen replica with the matched prefix (before this request)
    credit_time: float | None = None
    # pending prefill + uncached chunks on the chosen replica (0 when failing open)
    expected_wait: float = 0.0
    # why a ready replica with a longer prefix match than the chosen one was passed over (MOVE_*), or None
    moved: str | None = None


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


# ---- cost and picker -------------------------------------------------------------------------

def uncached_chunks(matched_chunks: int, total_chunks: int) -> int:
    return max(total_chunks - matched_chunks, 0)


def prefill_ahead(replica: Replica) -> float:
    """Prompt chunks queued ahead on the replica: what this router sent it that it has not computed yet
    by the estimate when there is one, else all of it that has produced no output."""
    if replica.prefill_ahead is not None:
        return min(float(replica.pending_prefill), max(0.0, replica.prefill_ahead))
    return float(replica.pending_prefill)


def expected_wait(replica: Replica, matched_chunks: int, total_chunks: int) -> float:
    """Prompt chunks a replica computes before this request's first token: those queued ahead of it
    by this router, then its own uncached ones."""
    return prefill_ahead(replica) + uncached_chunks(matched_chunks, total_chunks)


def pick(replicas: Sequence[Replica], matches: dict[str, int], total_chunks: int, *,
         load_factor: float = 1.25, tiebreak: Callable[[Replica], float] = lambda r: 0.0) -> Decision | None:
    """The replica for one request, or None when no replica is ready (the caller holds it).

    ``matches``: leading prompt chunks each replica is credited with (the prefix index);
    ``total_chunks``: the prompt's chunks; ``tiebreak``: a small per-replica value that orders exact
    ties (random in production, so equal replicas share unshared traffic).
    """
    candidates = filter_ready(replicas)
    if not candidates:
        return None
    if not any(r.metrics_fresh for r in candidates):
        # Load figures are stale: fall back to what the router knows for sure.
        chosen = min(candidates, key=lambda r: (r.inflight, r.pending_prefill, tiebreak(r)))
        matched = matches.get(chosen.key, 0)
        return Decision(chosen, ROUTE_FAIL_OPEN, matched, uncached_chunks(matched, total_chunks))
    ready = candidates
    unsaturated = filter_saturated(ready)
    candidates = filter_bounded_load(unsaturated, load_factor)

    def cost(r: Replica) -> tuple[float, int, float, float, float]:
        matched = matches.get(r.key, 0)
        return (expected_wait(r, matched, total_chunks), -matched, r.load, r.kv_usage, tiebreak(r))

    chosen = min(candidates, key=cost)
    matched = matches.get(chosen.key, 0)
    best = max(ready, key=lambda r: matches.get(r.key, 0))
    moved = None
    if matches.get(best.key, 0) > matched:
        moved = (MOVE_SATURATED if all(r is not best for r in unsaturated) else
                 MOVE_BOUNDED_LOAD if all(r is not best for r in candidates) else MOVE_PREFILL)
    return Decision(chosen, ROUTE_PREFIX if matched else ROUTE_LEAST_LOAD, matched,
                    uncached_chunks(matched, total_chunks),
                    expected_wait=expected_wait(chosen, matched, total_chunks), moved=moved)
