"""The hold queue: a cap, arrival order, deadlines, keep-alive ticks."""

from __future__ import annotations

import asyncio

import pytest
from fleetserve_router.hold import HoldFull, HoldQueue


def test_cap_refuses_new_requests_but_not_a_returning_one() -> None:
    async def main() -> None:
        q = HoldQueue(2)
        a = q.enter()
        q.enter()
        with pytest.raises(HoldFull, match="cap is 2"):
            q.enter()
        q.release()
        assert len(q) == 0
        q.enter()
        q.enter()
        q.enter(a)  # woken, found nothing, back in at its place: never refused
        assert len(q) == 3

    asyncio.run(main())


def test_released_in_arrival_order_even_when_one_re_enters() -> None:
    async def main() -> list[int]:
        q = HoldQueue(10)
        order: list[int] = []
        waiters = [q.enter() for _ in range(5)]

        async def held(i: int) -> None:
            assert await q.wait(waiters[i], asyncio.get_running_loop().time() + 5) is True
            order.append(i)

        # A clock matching the loop's, so the deadline is meaningful.
        q.clock = asyncio.get_running_loop().time
        tasks = [asyncio.create_task(held(i)) for i in (3, 1, 4, 0, 2)]
        await asyncio.sleep(0.01)
        q.leave(waiters[2])
        q.enter(waiters[2])  # re-entered: keeps its place between 1 and 3
        assert q.release() == 5
        await asyncio.gather(*tasks)
        return order

    assert asyncio.run(main()) == [0, 1, 2, 3, 4]


def test_deadline_gives_up_and_leaves_the_queue_with_ticks_meanwhile() -> None:
    async def main() -> tuple[bool, int, int]:
        q = HoldQueue(10, clock=asyncio.get_running_loop().time)
        w = q.enter()
        ticks = 0

        async def tick() -> None:
            nonlocal ticks
            ticks += 1

        ok = await q.wait(w, q.clock() + 0.35, tick=0.1, on_tick=tick)
        return ok, ticks, len(q)

    ok, ticks, left = asyncio.run(main())
    assert ok is False and left == 0 and ticks >= 2


def test_negative_cap_is_refused() -> None:
    with pytest.raises(ValueError, match="max_held"):
        HoldQueue(-1)
