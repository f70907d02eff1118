"""Fault isolation: an error that belongs to one request fails that request alone.

The runner here is the real toy runner (its output depends on the paged KV it
stored) with one change: rows whose seed is ``POISON`` make it raise
``SequenceError`` *after* the forward wrote the whole batch's KV, as the torch
runner's sampler does. The other requests must still produce exactly the
reference output, the engine must keep running, and every block must come back.
"""

from __future__ import annotations

import asyncio
import dataclasses

import pytest
from fleetserve_server.engine.async_engine import AsyncEngine
from fleetserve_server.engine.config import EngineConfig
from fleetserve_server.engine.errors import EngineDeadError, RequestFailedError, SequenceError
from fleetserve_server.engine.interfaces import ScheduledBatch
from fleetserve_server.engine.llm_engine import LLMEngine
from fleetserve_server.engine.sampling_params import SamplingParams
from fleetserve_server.engine.toy import ByteTokenizer, ToyModelRunner, toy_generate

TOK = ByteTokenizer()
POISON = 666


class PoisonRunner(ToyModelRunner):
    """Fails the rows seeded ``POISON`` once they reach ``fail_at`` generated tokens."""

    def __init__(self, *args, fail_at: int = 0, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(*args, **kwargs)
        self.fail_at = fail_at
        self.raised = 0

    def execute(self, batch: ScheduledBatch) -> dict[int, int]:
        bad = [s.seq_id for s in batch.sequences
               if s.sample and s.params.seed == POISON and s.num_generated >= self.fail_at]
        if bad:
            # The forward runs first (KV written for every row), then sampling fails before
            # drawing anything (the SequenceError contract).
            super().execute(ScheduledBatch([dataclasses.replace(s, sample=False) for s in batch.sequences]))
            self.raised += 1
            raise SequenceError(bad, "seed 666 is cursed", param="seed")
        return super().execute(batch)


def make_engine(fail_at: int = 0, **kw) -> tuple[LLMEngine, PoisonRunner]:  # type: ignore[no-untyped-def]
    defaults = dict(max_model_len=128, num_blocks=64, block_size=4, max_batch_tokens=64, max_num_seqs=8)
    defaults.update(kw)
    config = EngineConfig(**defaults)
    runner = PoisonRunner(config.num_blocks, config.block_size, fail_at=fail_at)
    return LLMEngine(config, runner, TOK), runner


def run_to_end(engine: LLMEngine) -> dict[str, tuple[list[int], str | None, str | None, str | None]]:
    out: dict[str, tuple[list[int], str | None, str | None, str | None]] = {}
    tokens: dict[str, list[int]] = {}
    for _ in range(1000):
        if not engine.has_unfinished():
            break
        for d in engine.step():
            tokens.setdefault(d.request_id, []).extend(d.token_ids)
            if d.finish_reason is not None:
                out[d.request_id] = (tokens[d.request_id], d.finish_reason, d.error, d.error_param)
    return out


GOOD = {
    "greedy": ("the quick brown fox", SamplingParams(max_tokens=10, temperature=0.0)),
    "seeded": ("jumps over the lazy dog", SamplingParams(max_tokens=10, temperature=1.0, seed=7)),
    "long": ("a much longer prompt that needs several blocks " * 2, SamplingParams(max_tokens=6, temperature=0.0)),
}


@pytest.mark.parametrize("fail_at", [0, 3])
def test_one_failing_row_fails_its_request_alone(fail_at: int) -> None:
    engine, runner = make_engine(fail_at=fail_at)
    engine.add_request("bad", "poisoned prompt", SamplingParams(max_tokens=10, temperature=1.0, seed=POISON))
    for rid, (prompt, params) in GOOD.items():
        engine.add_request(rid, prompt, params)
    bad_seq_id = engine._requests["bad"].seq.seq_id
    results = run_to_end(engine)

    tokens, reason, error, param = results["bad"]
    assert reason == "error" and error == "seed 666 is cursed" and param == "seed"
    assert len(tokens) == fail_at  # what it produced before the failure was delivered
    assert runner.raised == 1 and bad_seq_id in runner.released
    for rid, (prompt, params) in GOOD.items():
        ids, reason, error, _ = results[rid]
        assert ids == toy_generate(TOK.encode(prompt), params), rid
        assert reason == "length" and error is None
    bm = engine.block_manager
    assert bm.num_used_blocks == 0 and bm.num_free_blocks == bm.num_blocks
    bm.check_invariants([])
    # the engine serves new requests as before
    engine.add_request("after", "the quick brown fox", GOOD["greedy"][1])
    assert run_to_end(engine)["after"][0] == toy_generate(TOK.encode("the quick brown fox"), GOOD["greedy"][1])


def test_every_row_failing_leaves_an_empty_step() -> None:
    engine, _ = make_engine()
    for i in range(3):
        engine.add_request(f"bad{i}", f"poison {i}", SamplingParams(max_tokens=4, temperature=1.0, seed=POISON))
    results = run_to_end(engine)
    assert {r[1] for r in results.values()} == {"error"}
    assert engine.block_manager.num_used_blocks == 0 and not engine.has_unfinished()


def test_a_sequence_error_naming_no_row_is_not_attributable() -> None:
    class Liar(ToyModelRunner):
        def execute(self, batch: ScheduledBatch) -> dict[int, int]:
            raise SequenceError([10_000], "a row that is not in the batch")

    config = EngineConfig(max_model_len=64, num_blocks=32, block_size=4)
    engine = LLMEngine(config, Liar(32, 4), TOK)
    engine.add_request("x", "hello", SamplingParams(max_tokens=2, temperature=0.0))
    with pytest.raises(SequenceError):
        engine.step()


def test_output_processing_error_fails_only_that_request() -> None:
    class Fragile(ByteTokenizer):
        def decode(self, token_ids: list[int], *, skip_special_tokens: bool = False) -> str:
            if 255 in token_ids:
                raise UnicodeError("this tokenizer cannot decode byte 255")
            return super().decode(token_ids, skip_special_tokens=skip_special_tokens)

    config = EngineConfig(max_model_len=64, num_blocks=32, block_size=4)
    engine = LLMEngine(config, ToyModelRunner(32, 4), Fragile())
    params = SamplingParams(max_tokens=5, temperature=0.0)
    engine.add_request("fragile", [104, 255, 105], params)
    engine.add_request("fine", "hello", params)
    results = run_to_end(engine)
    assert results["fragile"][1] == "error" and "UnicodeError" in str(results["fragile"][2])
    assert results["fragile"][3] is None  # not the client's input: a server-side fault (500)
    assert results["fine"][0] == toy_generate(TOK.encode("hello"), params) and results["fine"][1] == "length"
    assert engine.block_manager.num_used_blocks == 0


def test_async_engine_delivers_the_failure_to_its_request_only() -> None:
    async def main() -> None:
        config = EngineConfig(max_model_len=128, num_blocks=64, block_size=4, max_batch_tokens=64)
        runner = PoisonRunner(config.num_blocks, config.block_size, fail_at=2, delay_seconds=0.002)
        engine = AsyncEngine(LLMEngine(config, runner, TOK), idle_wake_seconds=0.05)
        engine.start()

        async def collect(rid: str, prompt: str, params: SamplingParams) -> list[int]:
            ids: list[int] = []
            async for d in engine.generate(rid, prompt, params):
                ids += d.token_ids
            return ids

        async def bad() -> tuple[list[int], BaseException | None]:
            got: list[int] = []
            try:
                async for d in engine.generate("bad", "poisoned", SamplingParams(max_tokens=9, seed=POISON)):
                    got += d.token_ids
            except RequestFailedError as exc:
                return got, exc
            return got, None

        outcome, *good = await asyncio.gather(bad(), *(collect(r, p, s) for r, (p, s) in GOOD.items()))
        got, exc = outcome
        assert isinstance(exc, RequestFailedError) and exc.param == "seed" and "cursed" in str(exc)
        assert len(got) == 2  # the tokens it streamed before failing
        for ids, (prompt, params) in zip(good, GOOD.values(), strict=True):
            assert ids == toy_generate(TOK.encode(prompt), params)
        await engine.check_health()
        assert engine.is_alive and engine.num_unfinished == 0
        assert engine.stats().kv_blocks_free == engine.stats().kv_blocks_total
        engine.shutdown()

    asyncio.run(main())


def test_unattributable_step_error_kills_the_engine_and_health_says_so() -> None:
    async def main() -> None:
        class Broken(ToyModelRunner):
            def execute(self, batch: ScheduledBatch) -> dict[int, int]:
                raise RuntimeError("CUDA error: an illegal memory access was encountered")

        config = EngineConfig(max_model_len=64, num_blocks=32, block_size=4)
        engine = AsyncEngine(LLMEngine(config, Broken(32, 4), TOK), idle_wake_seconds=0.05)
        engine.start()
        with pytest.raises(EngineDeadError, match="illegal memory access"):
            async for _ in engine.generate("x", "hello", SamplingParams(max_tokens=2, temperature=0.0)):
                pass
        with pytest.raises(EngineDeadError, match="illegal memory access"):
            await engine.check_health()
        engine.shutdown()

    asyncio.run(main())

