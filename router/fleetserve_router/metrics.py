"""The router's Prometheus metrics (names fixed in ARCHITECTURE.md). Only this module imports
prometheus_client."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from fleetserve_router.scoring import MOVES

# Holds last from milliseconds (a replica just turned ready) to a GPU node's provisioning (minutes).
HOLD_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 900, 1800)


class RouterMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.held = Gauge("fleetserve_router_requests_held",
                          "Requests waiting for a ready replica (the autoscaler scales from zero on it)",
                          registry=r)
        self.hold_seconds = Histogram("fleetserve_router_hold_seconds",
                                      "Time requests spent held before dispatch or giving up",
                                      buckets=HOLD_BUCKETS, registry=r)
        self.requests = Counter("fleetserve_router_requests", "Requests routed to a replica, by why it was chosen",
                                ["route"], registry=r)
        self.rejected = Counter("fleetserve_router_requests_rejected",
                                "Requests the router answered itself with an error",
                                ["reason"], registry=r)
        self.prefix_predicted = Counter("fleetserve_router_prefix_predicted_hits",
                                        "Requests sent to a replica the prefix index credited with their prefix",
                                        registry=r)
        self.prefix_confirmed = Counter("fleetserve_router_prefix_confirmed_hits",
                                        "Of the predicted hits, those the replica confirmed (cached tokens > 0)",
                                        registry=r)
        self.prefix_false = Counter("fleetserve_router_prefix_false_credit",
                                    "Predicted hits the replica denied (no cached tokens): index corrected",
                                    registry=r)
        self.cached_tokens = Counter("fleetserve_router_cached_tokens",
                                     "Prompt tokens the replicas reported found in their prefix cache",
                                     registry=r)
        self.epoch_resets = Counter("fleetserve_router_cache_epoch_changes",
                                    "Times a replica's cache epoch changed (its prefix credit was dropped)",
                                    registry=r)
        self.upstream_errors = Counter("fleetserve_router_upstream_errors",
                                       "Dispatch attempts that failed before a response (retried elsewhere)",
                                       ["reason"], registry=r)
        self.ready_replicas = Gauge("fleetserve_router_ready_replicas", "Replicas the router may send to",
                                    registry=r)
        self.index_entries = Gauge("fleetserve_router_prefix_index_entries", "Chunk hashes in the prefix index",
                                   registry=r)
        self.pending_prefill = Gauge("fleetserve_router_pending_prefill_tokens",
                                     "Uncached prompt tokens (estimated: characters / 4) this router sent each "
                                     "replica that have produced no output yet", ["replica"], registry=r)
        self.moves = Counter("fleetserve_router_prefix_moves",
                             "Requests not sent to the ready replica with their longest prefix match, by why "
                             "(saturated, bounded_load, prefill_ahead)", ["reason"], registry=r)
        # the labelled children, looked up once (labels() takes a lock and builds a key per call)
        self.routed = {route: self.requests.labels(route=route) for route in ("prefix", "least_load", "fail_open")}
        for reason in ("hold_full", "hold_timeout", "draining", "invalid"):
            self.rejected.labels(reason=reason)
        self.moved = {reason: self.moves.labels(reason=reason) for reason in MOVES}

    def set_pending_prefill(self, replica: str, tokens: float) -> None:
        self.pending_prefill.labels(replica=replica).set(tokens)

    def forget_replica(self, replica: str) -> None:
        """A replica left the fleet: drop its labelled series."""
        try:
            self.pending_prefill.remove(replica)
        except KeyError:
            pass

    def render(self) -> bytes:
        return generate_latest(self.registry)
