"""Filters, scorers and the picker on plain data: prefix wins, load bounds it, stale metrics fail open."""

from __future__ import annotations

from fleetserve_router.scoring import (
    MOVE_BOUNDED_LOAD,
    MOVE_PREFILL,
    MOVE_SATURATED,
    ROUTE_FAIL_OPEN,
    ROUTE_LEAST_LOAD,
    ROUTE_PREFIX,
    Replica,
    bounded_load_capacity,
    filter_bounded_load,
    filter_saturated,
    pick,
)
from hypothesis import given
from hypothesis import strategies as st


def rep(key: str, load: int = 0, kv: float = 0.0, fresh: bool = True, ready: bool = True) -> Replica:
    # ``load`` requests, all this router's, all counted by the last scrape
    return Replica(key, ready=ready, inflight=load, running=load, inflight_at_scrape=load, kv_usage=kv,
                   metrics_fresh=fresh)


def test_no_ready_replica_means_hold() -> None:
    assert pick([rep("a", ready=False)], {}, 4) is None
    assert pick([], {}, 4) is None


def test_prefix_holder_wins_over_an_idle_replica() -> None:
    d = pick([rep("a", load=1), rep("b", load=0), rep("c", load=0)], {"a": 8}, 10)
    assert d is not None and d.replica.key == "a" and d.route == ROUTE_PREFIX and d.matched_chunks == 8


def test_longer_match_wins() -> None:
    d = pick([rep("a"), rep("b")], {"a": 2, "b": 9}, 10)
    assert d is not None and d.replica.key == "b"


def test_without_credit_it_is_least_load() -> None:
    d = pick([rep("a", load=3), rep("b", load=1), rep("c", load=2)], {}, 10)
    assert d is not None and d.replica.key == "b" and d.route == ROUTE_LEAST_LOAD


def test_stale_metrics_fail_open_to_the_routers_own_counts() -> None:
    replicas = [Replica("a", inflight=4, running=0), Replica("b", inflight=1, running=50)]
    d = pick(replicas, {"a": 9}, 10)
    assert d is not None and d.replica.key == "b" and d.route == ROUTE_FAIL_OPEN


def test_hot_prefix_spills_when_its_holder_is_over_the_bound() -> None:
    # mean load with one more request = (6+0+0+1)/3 = 2.33, bound ceil(1.25*2.33)=3: a (6) is out
    d = pick([rep("a", load=6), rep("b"), rep("c")], {"a": 10}, 10)
    assert d is not None and d.replica.key in ("b", "c")


def test_saturated_replicas_are_skipped_unless_all_are() -> None:
    full = Replica("a", kv_usage=0.99, waiting=2, metrics_fresh=True)
    assert filter_saturated([full, rep("b")]) == [rep("b")]
    assert filter_saturated([full]) == [full]


@given(st.lists(st.integers(min_value=0, max_value=50), min_size=1, max_size=8))
def test_bounded_load_never_empty_and_never_over_the_bound_while_others_have_room(loads: list[int]) -> None:
    replicas = [rep(str(i), load=x) for i, x in enumerate(loads)]
    kept = filter_bounded_load(replicas)
    assert kept
    capacity = bounded_load_capacity(replicas)
    if any(r.load + 1 <= capacity for r in replicas):
        assert all(r.load + 1 <= capacity for r in kept)


@given(st.lists(st.integers(min_value=0, max_value=20), min_size=2, max_size=6), st.data())
def test_many_requests_with_one_prefix_stay_within_125_percent_of_the_mean(start: list[int],
                                                                           data: st.DataObject) -> None:
    """Every request shares one hot prefix held by replica 0: after each assignment, the chosen replica
    is never above 1.25x the mean load (with the request counted) unless it is the least loaded."""
    replicas = [rep(str(i), load=x) for i, x in enumerate(start)]
    for _ in range(data.draw(st.integers(min_value=1, max_value=40))):
        d = pick(replicas, {"0": 5}, 5)
        assert d is not None
        mean = (sum(r.load for r in replicas) + 1) / len(replicas)
        bound = max(2, -(-1.25 * mean // 1))
        assert d.replica.load + 1 <= bound or d.replica.load == min(r.load for r in replicas)
        d.replica.inflight += 1  # dispatched; the next scrape has not seen it yet


# ---- pending prefill: the work ahead of a request's first token --------------------------------

DOC_CHUNKS = 56  # a ~900-token document: 64-character chunks of ~16 tokens


def busy(key: str, requests: int, pending: int) -> Replica:
    r = rep(key, load=requests)
    r.pending_prefill = pending
    return r


def test_a_new_document_goes_to_the_replica_with_less_prefill_ahead_not_fewer_requests() -> None:
    # a: one document of 900 uncached tokens still prefilling; b: two short questions in flight
    a, b = busy("a", requests=1, pending=DOC_CHUNKS), busy("b", requests=2, pending=1)
    d = pick([a, b], {}, DOC_CHUNKS)
    assert d is not None and d.replica.key == "b" and d.route == ROUTE_LEAST_LOAD


def test_a_later_turn_stays_with_its_history_next_to_a_document_prefill() -> None:
    # the owner holds 60 of the turn's 63 chunks and has one document prefilling
    owner, idle = busy("owner", requests=1, pending=DOC_CHUNKS), busy("idle", requests=0, pending=0)
    d = pick([owner, idle], {"owner": 60}, 63)
    assert d is not None and d.replica.key == "owner" and d.route == ROUTE_PREFIX and d.matched_chunks == 60


def test_a_later_turn_leaves_an_owner_with_a_bigger_prefill_backlog_than_its_history() -> None:
    # two documents queued ahead on the owner (112 chunks) take longer than recomputing 63 chunks on b
    owner, idle = busy("owner", requests=2, pending=2 * DOC_CHUNKS), busy("idle", requests=1, pending=0)
    d = pick([owner, idle], {"owner": 60}, 63)
    assert d is not None and d.replica.key == "idle" and d.route == ROUTE_LEAST_LOAD


def test_equal_prefill_ahead_goes_to_fewer_requests() -> None:
    d = pick([busy("a", requests=3, pending=0), busy("b", requests=1, pending=0)], {}, DOC_CHUNKS)
    assert d is not None and d.replica.key == "b"


def test_bounded_load_still_caps_a_replica_with_no_prefill_ahead() -> None:
    # a has no prefill queued but 6 requests: over ceil(1.25 * 7/3) = 3, so it is not a candidate
    d = pick([busy("a", requests=6, pending=0), busy("c", requests=0, pending=50), busy("b", requests=0, pending=40)],
             {}, DOC_CHUNKS)
    assert d is not None and d.replica.key == "b"


def test_stale_metrics_fail_open_to_in_flight_counts_then_prefill() -> None:
    a, b = Replica("a", inflight=1), Replica("b", inflight=1)
    a.pending_prefill, b.pending_prefill = DOC_CHUNKS, 2
    d = pick([a, b], {}, DOC_CHUNKS)
    assert d is not None and d.replica.key == "b" and d.route == ROUTE_FAIL_OPEN


# ---- what a replica has already computed, and a load that is gone ------------------------------

def test_a_later_turn_stays_when_its_replica_has_computed_most_of_the_document_ahead() -> None:
    # the owner's document (DOC_CHUNKS + 8 uncached chunks, no output yet) was dispatched a while ago:
    # by the replica's rate it has ~20 chunks left; recomputing the 63-chunk history elsewhere is longer
    owner, idle = busy("owner", requests=1, pending=DOC_CHUNKS + 8), busy("idle", requests=0, pending=0)
    owner.prefill_ahead = 20.0
    d = pick([owner, idle], {"owner": 60}, 63)
    assert d is not None and d.replica.key == "owner" and d.moved is None
    assert d.expected_wait == 23.0


def test_the_estimate_never_exceeds_the_pending_count() -> None:
    a = busy("a", requests=1, pending=10)
    a.prefill_ahead = 50.0  # a late drain update cannot add work the router did not send
    d = pick([a], {}, 4)
    assert d is not None and d.expected_wait == 14.0


def test_requests_that_ended_since_the_scrape_do_not_count_toward_the_bound() -> None:
    # the owner had 3 of this router's requests running at the last scrape; 2 have ended since.
    # Scraped load alone (3) would put it at the bound (ceil(1.25 x 4/3) = 2 -> floor 2); its load is 1
    owner = Replica("owner", inflight=1, running=3, inflight_at_scrape=3, metrics_fresh=True)
    a, b = rep("a"), rep("b")
    assert owner.load == 1.0
    d = pick([owner, a, b], {"owner": 60}, 63)
    assert d is not None and d.replica.key == "owner" and d.moved is None


def test_other_clients_requests_still_count_toward_the_load() -> None:
    # 4 requests on the replica at the scrape, 1 of them this router's: 3 are someone else's
    r = Replica("r", inflight=2, running=3, waiting=1, inflight_at_scrape=1, metrics_fresh=True)
    assert r.load == 5.0
    assert Replica("s", inflight=2, running=3, inflight_at_scrape=1).load == 2.0  # stale: own count only


def test_why_a_request_left_its_longest_match_is_reported() -> None:
    owner, idle = busy("owner", requests=2, pending=2 * DOC_CHUNKS), busy("idle", requests=1, pending=0)
    d = pick([owner, idle], {"owner": 60, "idle": 2}, 63)
    assert d is not None and d.replica.key == "idle" and d.moved == MOVE_PREFILL
    hot, b, c = rep("hot", load=6), rep("b", load=1), rep("c", load=1)
    d = pick([hot, b, c], {"hot": 60}, 63)
    assert d is not None and d.replica.key != "hot" and d.moved == MOVE_BOUNDED_LOAD
    full, e = rep("full", load=2, kv=0.99), rep("e", load=2)
    full.waiting = 1
    d = pick([full, e], {"full": 60}, 63)
    assert d is not None and d.replica.key == "e" and d.moved == MOVE_SATURATED
    # a new prompt: every replica matches the same shared system prompt, nothing was left
    d = pick([rep("x"), rep("y")], {"x": 2, "y": 2}, 63)
    assert d is not None and d.moved is None
