"""Pending prefill on plain data: a request's uncached chunks count on its replica until its first
output or its end, exactly once (never negative, back to 0 when nothing is open), and the first
output of an event stream is found wherever the bytes are cut."""

from __future__ import annotations

from fleetserve_router.metrics import RouterMetrics
from fleetserve_router.prefill import FirstEvent, PendingPrefill
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
