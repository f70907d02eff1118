"""The per-LLMDeployment lock and event coalescing."""

from __future__ import annotations

import threading

from fleetserve_operator.reconcile import locks
from fleetserve_operator.reconcile.locks import coalescing_lock, cr_lock


def test_a_second_waiter_is_coalesced_and_the_first_runs_after_the_holder() -> None:
    ran: list[str] = []
    holder = cr_lock("ns", "coalesce")
    holder.acquire()
    first_waiting = threading.Event()

    def first() -> None:
        first_waiting.set()
        with coalescing_lock("ns", "coalesce") as held:
            ran.append(f"first:{held}")

    t = threading.Thread(target=first)
    t.start()
    first_waiting.wait(5)
    # wait until the first one is registered as waiting (it blocks on the held lock)
    for _ in range(500):
        if locks._waiting.get(("ns", "coalesce")):
            break
        threading.Event().wait(0.01)
    with coalescing_lock("ns", "coalesce") as held:
        ran.append(f"second:{held}")
    assert ran == ["second:False"]  # skipped at once: the first waiter will see newer state
    holder.release()
    t.join(5)
    assert ran == ["second:False", "first:True"]
    with coalescing_lock("ns", "coalesce") as held:  # nobody waiting, nobody holding: runs
        assert held


def test_locks_are_per_object() -> None:
    assert cr_lock("ns", "a") is cr_lock("ns", "a")
    assert cr_lock("ns", "a") is not cr_lock("ns", "b")
