"""Pending prefill on plain data: a request's uncached chunks count on its replica until its first
output or its end, exactly once (never negative, back to 0 when nothing is open), and the first
output of an event stream is found wherever the bytes are cut."""

from __future__ import annotations

import asyncio

import pytest
from fake_clock import Clock
from fleetserve_router.fleet import Fleet
from fleetserve_router.hold import HoldQueue
from fleetserve_router.metrics import RouterMetrics
from fleetserve_router.prefill import (
    MIN_SAMPLE_CHUNKS,
    RATE_SMOOTHING,
    FirstEvent,
    PendingPrefill,
    PrefillQueue,
)
from fleetserve_router.prefix_index import PrefixIndex
from fleetserve_router.scoring import Replica
from hypothesis import given
from hypothesis import strategies as st


def test_done_takes_the_chunks_off_once() -> None:
    seen: list[int] = []
    r = Replica("a")
    p = PendingPrefill(r, 56, lambda rep: seen.append(rep.pending_prefill))
    q = PendingPrefill(r, 3, lambda rep: seen.append(rep.pending_prefill))
    assert r.pending_prefill == 59
    p.done()
    p.done()  # the first output, then the dispatch's end: taken off once
    assert r.pending_prefill == 3
    q.done()
    assert r.pending_prefill == 0 and seen == [56, 59, 3, 0]


def test_a_fully_cached_prompt_adds_nothing() -> None:
    r = Replica("a")
    p = PendingPrefill(r, 0, lambda rep: None)
    p.done()
    assert r.pending_prefill == 0


@given(st.lists(st.tuples(st.integers(0, 2), st.integers(0, 200), st.integers(1, 3)), max_size=40), st.data())
def test_pending_never_goes_negative_and_returns_to_zero(requests: list[tuple[int, int, int]],
                                                         data: st.DataObject) -> None:
    """Requests dispatched to 3 replicas end in any order, each ``done()`` 1-3 times (first output,
    then the end of the dispatch; or only the end: refused, failed, aborted)."""
    replicas = [Replica(str(i)) for i in range(3)]
    open_: list[tuple[PendingPrefill, int]] = [
        (PendingPrefill(replicas[i], chunks, lambda r: None), times) for i, chunks, times in requests]
    for i in range(3):
        assert replicas[i].pending_prefill == sum(c for j, c, _ in requests if j == i)
    order = data.draw(st.permutations(range(len(open_))))
    for n in order:
        pending, times = open_[n]
        for _ in range(times):
            pending.done()
        assert all(r.pending_prefill >= 0 for r in replicas)
    assert [r.pending_prefill for r in replicas] == [0, 0, 0]


QUEUED = b": queued\n\n: keep-alive\n\n: keep-alive\r\n\r\n"
FIRST = b'data: {"choices":[{"delta":{"role":"assistant","content":""}}]}\n\n'


@given(st.sets(st.integers(1, len(QUEUED) + len(FIRST) - 1), max_size=12))
def test_the_first_event_is_found_in_the_chunk_where_it_starts(cuts: set[int]) -> None:
    stream = QUEUED + FIRST + b"data: [DONE]\n\n"
    bounds = [0, *sorted(cuts), len(stream)]
    chunks = [stream[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]
    first = FirstEvent()
    found = next(i for i, chunk in enumerate(chunks) if first.feed(chunk))
    starts = len(QUEUED)  # the "d" of the first data line
    assert bounds[found] <= starts < bounds[found + 1]


def test_comments_alone_are_no_output() -> None:
    first = FirstEvent()
    assert not any(first.feed(c) for c in (b": queued\n", b"\n", b"", b": keep-", b"alive\n\n"))
    assert first.feed(b"da")


def test_the_gauge_per_replica_and_its_removal() -> None:
    metrics = RouterMetrics()
    metrics.set_pending_prefill("10.0.0.1:8000", 896.0)
    assert b'fleetserve_router_pending_prefill_tokens{replica="10.0.0.1:8000"} 896.0' in metrics.render()
    metrics.forget_replica("10.0.0.1:8000")
    metrics.forget_replica("10.0.0.9:8000")  # never seen: nothing to drop
    assert b'replica="10.0.0.1:8000"' not in metrics.render()


# ---- the pending prefill a replica has computed by now (PrefillQueue) ----------------------------

def test_no_drain_before_a_rate_is_measured() -> None:
    clock, q, r = Clock(), PrefillQueue(), Replica("a")
    PendingPrefill(r, 40, lambda rep: None, q, clock)
    clock.now = 30.0
    assert q.ahead(clock.now) == 40.0 and q.rate is None


def test_a_request_alone_measures_the_rate_and_later_ones_drain_oldest_first() -> None:
    clock, q, r = Clock(), PrefillQueue(), Replica("a")
    first = PendingPrefill(r, 64, lambda rep: None, q, clock)
    clock.now = 2.0
    first.done(first_output=True)  # 64 chunks in 2 s with nothing ahead: 32 chunks/s
    first.done()  # then the end of its dispatch: no second sample
    assert q.rate == 32.0 and len(q) == 0
    clock.now = 10.0
    b = PendingPrefill(r, 64, lambda rep: None, q, clock)
    c = PendingPrefill(r, 64, lambda rep: None, q, clock)
    assert not c.alone and r.pending_prefill == 128  # the exact count is unchanged (the gauge shows it)
    clock.now = 11.0
    assert q.ahead(clock.now) == 96.0 and b.remaining == 32.0 and c.remaining == 64.0
    clock.now = 13.5
    assert q.ahead(clock.now) == 16.0 and b.remaining == 0.0
    assert b.alone  # nothing was ahead of b when it was dispatched: its time to first output is a sample
    b.done(first_output=True)
    measured = 32.0 + RATE_SMOOTHING * (64 / 3.5 - 32.0)
    assert q.rate == pytest.approx(measured)
    clock.now = 20.0
    assert q.ahead(clock.now) == 0.0
    c.done(first_output=True)  # c waited behind b: its time is not its own prefill's
    assert q.rate == pytest.approx(measured) and r.pending_prefill == 0


def test_only_first_outputs_of_long_prompts_are_samples() -> None:
    clock, q, r = Clock(), PrefillQueue(), Replica("a")
    short = PendingPrefill(r, MIN_SAMPLE_CHUNKS - 1, lambda rep: None, q, clock)
    clock.now = 0.05
    short.done(first_output=True)  # one engine step, not a prefill rate
    failed = PendingPrefill(r, 64, lambda rep: None, q, clock)
    clock.now = 0.1
    failed.done()  # refused or aborted: no output, no sample
    assert q.rate is None
    slow = PendingPrefill(r, 64, lambda rep: None, q, clock)
    clock.now = 4.1
    slow.done(first_output=True)
    assert q.rate == pytest.approx(16.0)
    fast = PendingPrefill(r, 64, lambda rep: None, q, clock)
    clock.now = 5.1
    fast.done(first_output=True)  # 64/s: the average moves 30 % of the way
    assert q.rate == pytest.approx(16.0 + RATE_SMOOTHING * 48.0)


@given(st.lists(st.tuples(st.integers(0, 100), st.floats(0.0, 3.0), st.booleans()), max_size=30))
def test_the_estimate_stays_between_zero_and_the_pending_count(steps: list[tuple[int, float, bool]]) -> None:
    clock, q, r = Clock(), PrefillQueue(), Replica("a")
    q.rate = 20.0
    open_: list[PendingPrefill] = []
    for chunks, dt, finish in steps:
        clock.now += dt
        if finish and open_:
            open_.pop(0).done(first_output=True)
        else:
            open_.append(PendingPrefill(r, chunks, lambda rep: None, q, clock))
        ahead = q.ahead(clock.now)
        assert 0.0 <= ahead <= r.pending_prefill + 1e-9
    for p in open_:
        p.done()
    assert r.pending_prefill == 0 and q.ahead(clock.now) == 0.0 and len(q) == 0


def test_the_fleet_keeps_a_later_turn_with_its_history_once_the_document_ahead_is_mostly_computed() -> None:
    """Through Fleet.choose: a conversation's history (60 chunks) is on replica X, which measured its
    rate (30 chunks/s) on it; an 80-chunk document is then dispatched to X. Its whole count (83 with the
    turn's own 3) would send the turn to Y to recompute 63 chunks; 2 s later X has ~20 chunks left."""
    async def main() -> None:
        clock, metrics = Clock(), RouterMetrics()
        # a poll interval this long keeps the (never scraped) replicas "fresh" for the whole test
        fleet = Fleet(PrefixIndex(600, clock=clock), HoldQueue(10), metrics, poll_interval=1e9, clock=clock)
        x, y = "127.0.0.1:1", "127.0.0.1:2"
        fleet.set_endpoints({x, y})
        try:
            history = [b"h%d" % i for i in range(60)]
            d = fleet.choose(history, exclude={y})
            assert d is not None and d.replica.key == x
            p = fleet.start_prefill(d)
            clock.now = 2.0
            p.done(first_output=True)  # 60 chunks alone in 2 s
            clock.now = 10.0
            doc = fleet.choose([b"d%d" % i for i in range(80)], exclude={y})
            assert doc is not None and doc.replica.key == x
            pd = fleet.start_prefill(doc)
            clock.now = 12.0
            turn = fleet.choose([*history, b"q1", b"q2", b"q3"], exclude=set())
            assert turn is not None and turn.replica.key == x and turn.moved is None
            assert turn.expected_wait == pytest.approx(80 - 2 * 30 + 3)
            # with two fresh documents ahead of it, the turn goes to Y: counted, with why
            pd2 = fleet.start_prefill(fleet.choose([b"e%d" % i for i in range(80)], exclude={y}))
            moved = fleet.choose([*history, b"q1", b"q2", b"q3", b"r1"], exclude=set())
            assert moved is not None and moved.replica.key == y and moved.moved == "prefill_ahead"
            assert b'fleetserve_router_prefix_moves_total{reason="prefill_ahead"} 1.0' in metrics.render()
            pd.done()
            pd2.done()
        finally:
            await fleet.close()

    asyncio.run(main())
