"""AsyncEngine: the engine thread, streaming, aborts, errors, draining, idle expiry."""

from __future__ import annotations

import asyncio
import time

import pytest
from fake_clock import Clock
from fleetserve_server.engine.async_engine import AsyncEngine
from fleetserve_server.engine.config import EngineConfig
from fleetserve_server.engine.errors import (
    EngineDeadError,
    EngineDrainingError,
    QueueFullError,
    RequestValidationError,
)
from fleetserve_server.engine.interfaces import EngineClient, ScheduledBatch
from fleetserve_server.engine.llm_engine import LLMEngine
from fleetserve_server.engine.sampling_params import SamplingParams
from fleetserve_server.engine.toy import ByteTokenizer, ToyModelRunner, toy_generate

TOK = ByteTokenizer()


def make(delay: float = 0.0, runner: ToyModelRunner | None = None, clock=None, idle_wake=0.05, **kw):
    defaults = dict(max_model_len=128, num_blocks=64, block_size=4, max_batch_tokens=64, max_num_seqs=8)
    defaults.update(kw)
    config = EngineConfig(**defaults)
    runner = runner or ToyModelRunner(config.num_blocks, config.block_size, delay_seconds=delay)
    llm = LLMEngine(config, runner, TOK, clock=clock) if clock else LLMEngine(config, runner, TOK)
    engine = AsyncEngine(llm, idle_wake_seconds=idle_wake)
    engine.start()
    return engine, runner


async def collect(engine: AsyncEngine, rid: str, prompt, params):
    ids, text, reason = [], "", None
    async for d in engine.generate(rid, prompt, params):
        ids += d.token_ids
        text += d.text
        reason = d.finish_reason
    return ids, text, reason


async def wait_for(predicate, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.005)


def test_concurrent_requests_stream_the_reference_output():
    async def main():
        engine, _ = make()
        client: EngineClient = engine  # satisfies the HTTP layer's protocol
        params = SamplingParams(max_tokens=12, temperature=0.0)
        prompts = {f"r{i}": f"prompt number {i} " * (1 + i % 3) for i in range(12)}
        results = await asyncio.gather(*(collect(engine, rid, p, params) for rid, p in prompts.items()))
        for p, (ids, text, reason) in zip(prompts.values(), results, strict=True):
            assert ids == toy_generate(TOK.encode(p), params)
            assert text == TOK.decode(ids) and reason == "length"
        assert engine.num_unfinished == 0
        stats = client.stats()
        assert stats.generation_tokens == 12 * 12 and max(stats.recent_batch_sizes) > 1
        await client.check_health()
        engine.shutdown()
    asyncio.run(main())


def test_invalid_request_raises_before_anything_is_yielded():
    async def main():
        engine, _ = make(max_model_len=16)
        gen = engine.generate("bad", "x" * 10, SamplingParams(max_tokens=10))
        with pytest.raises(RequestValidationError, match="max_model_len 16") as e:
            await anext(gen)
        assert e.value.param == "max_tokens"
        with pytest.raises(RequestValidationError, match="empty"):
            await anext(engine.generate("bad2", "", SamplingParams()))
        ids, _, _ = await collect(engine, "good", "ok", SamplingParams(max_tokens=3, temperature=0.0))
        assert len(ids) == 3
        engine.shutdown()
    asyncio.run(main())


def test_queue_full_is_raised_with_retry_after():
    async def main():
        engine, _ = make(delay=0.01, max_num_seqs=1, max_queue_length=1)
        params = SamplingParams(max_tokens=50, temperature=0.0)
        running = engine.generate("a", "first", params)
        await anext(running)  # "a" runs
        waiting = asyncio.create_task(collect(engine, "b", "second", params))
        await wait_for(lambda: engine.stats().requests_waiting == 1)
        with pytest.raises(QueueFullError) as e:
            await anext(engine.generate("c", "third", params))
        assert e.value.retry_after >= 1.0
        await running.aclose()  # client "a" goes away: its request is aborted, "b" gets its slot
        ids, _, reason = await waiting
        assert reason == "length" and len(ids) == 50
        engine.shutdown()
    asyncio.run(main())


def test_abort_ends_stream_and_frees_blocks():
    async def main():
        engine, runner = make(delay=0.005)
        params = SamplingParams(max_tokens=80, temperature=0.0)
        gen = engine.generate("x", "abort me " * 4, params)
        first = await anext(gen)
        assert first.finish_reason is None
        await engine.abort("x")
        rest = [d async for d in gen]
        assert rest[-1].finish_reason == "abort"
        assert len(rest) < 79
        await wait_for(lambda: engine.engine.block_manager.num_used_blocks == 0)
        assert engine.num_unfinished == 0
        engine.shutdown()
    asyncio.run(main())


def test_client_gone_aborts_request():
    async def main():
        engine, runner = make(delay=0.005)
        params = SamplingParams(max_tokens=80, temperature=0.0)
        async for _ in engine.generate("gone", "bye " * 8, params):
            break  # the client disconnects after the first token
        # async-for's break does not close the generator by itself; the HTTP layer's task is cancelled
        # or the generator is garbage-collected; closing explicitly is what both amount to
        gen = engine.generate("gone2", "bye " * 8, params)
        await anext(gen)
        await gen.aclose()
        task = asyncio.create_task(collect(engine, "cancelled", "bye " * 8, params))
        await wait_for(lambda: engine.engine.is_running("cancelled"))
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await wait_for(lambda: not engine.engine.is_running("gone2") and not engine.engine.is_running("cancelled"))
        stats = engine.stats()
        assert stats.requests_running <= 1  # at most "gone", whose generator was left open
        engine.shutdown()
    asyncio.run(main())


class ExplodingRunner(ToyModelRunner):
    def execute(self, batch: ScheduledBatch) -> dict[int, int]:
        raise RuntimeError("CUDA error: device lost")


def test_engine_death_is_reported():
    async def main():
        engine, _ = make(runner=ExplodingRunner(64, 4))
        with pytest.raises(EngineDeadError, match="device lost"):
            await collect(engine, "a", "boom", SamplingParams(max_tokens=4))
        await wait_for(lambda: not engine.is_alive)
        with pytest.raises(EngineDeadError, match="device lost"):
            await engine.check_health()
        with pytest.raises(EngineDeadError):
            await anext(engine.generate("b", "later", SamplingParams(max_tokens=4)))
    asyncio.run(main())


def test_draining_refuses_new_and_finishes_in_flight():
    async def main():
        engine, _ = make(delay=0.002)
        params = SamplingParams(max_tokens=20, temperature=0.0)
        task = asyncio.create_task(collect(engine, "inflight", "draining", params))
        await wait_for(lambda: engine.num_unfinished == 1)
        engine.start_draining()
        with pytest.raises(EngineDrainingError):
            await anext(engine.generate("new", "no", params))
        assert await engine.wait_until_idle(timeout=10)
        ids, _, reason = await task
        assert reason == "length" and ids == toy_generate(TOK.encode("draining"), params)
        engine.shutdown()
        with pytest.raises(EngineDeadError):
            await engine.check_health()
    asyncio.run(main())


def test_shutdown_fails_in_flight_requests():
    async def main():
        engine, _ = make(delay=0.01)
        gen = engine.generate("a", "long", SamplingParams(max_tokens=100, temperature=0.0))
        await anext(gen)
        engine.shutdown()
        with pytest.raises(EngineDeadError, match="shut down"):
            async for _ in gen:
                pass
    asyncio.run(main())


def test_idle_engine_still_expires_cache():
    async def main():
        clock = Clock()
        engine, _ = make(clock=clock, cache_ttl_seconds=30, idle_wake=0.01)
        await collect(engine, "a", "a prompt with several blocks", SamplingParams(max_tokens=2, temperature=0.0))
        cached = engine.engine.block_manager.num_cached_blocks
        assert cached > 0
        clock.now = 31.0  # no request arrives; the idle wake-up must expire the blocks
        await wait_for(lambda: engine.stats().evictions["expired"] == cached)
        engine.shutdown()
    asyncio.run(main())
