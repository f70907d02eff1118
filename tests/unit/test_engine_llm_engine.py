"""LLMEngine end to end on the toy runner, whose output depends on the KV it
stored where the engine's block tables said: batched outputs must equal the
cache-free reference, whatever the batching, chunking, preemption or caching."""

from __future__ import annotations

import pytest
from fake_clock import Clock
from fleetserve_server.engine.config import EngineConfig
from fleetserve_server.engine.errors import QueueFullError, RequestValidationError
from fleetserve_server.engine.interfaces import RequestOutputDelta, ScheduledBatch
from fleetserve_server.engine.llm_engine import LLMEngine
from fleetserve_server.engine.sampling_params import SamplingParams
from fleetserve_server.engine.toy import EOS_TOKEN_ID, ByteTokenizer, ToyModelRunner, toy_generate
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

TOK = ByteTokenizer()
GREEDY = SamplingParams(max_tokens=24, temperature=0.0)


def make(eos_period: int = 0, clock=None, **kw) -> tuple[LLMEngine, ToyModelRunner]:
    defaults = dict(max_model_len=128, num_blocks=64, block_size=4, max_batch_tokens=64, max_num_seqs=8)
    defaults.update(kw)
    config = EngineConfig(**defaults)
    runner = ToyModelRunner(config.num_blocks, config.block_size, eos_period=eos_period)
    engine = LLMEngine(config, runner, TOK, clock=clock) if clock else LLMEngine(config, runner, TOK)
    return engine, runner


def run_all(engine: LLMEngine) -> dict[str, dict]:
    """Step until done; collect each request's tokens, text, finish reason and deltas."""
    results: dict[str, dict] = {}
    for _ in range(10_000):
        if not engine.has_unfinished():
            break
        for d in engine.step():
            r = results.setdefault(d.request_id, {"ids": [], "text": "", "reason": None, "deltas": []})
            assert r["reason"] is None, "a delta after the final one"
            r["ids"] += d.token_ids
            r["text"] += d.text
            r["reason"] = d.finish_reason
            r["deltas"].append(d)
        engine.block_manager.check_invariants(engine.scheduler.running)
    else:
        raise AssertionError("engine did not finish")
    return results


def expected_text(ids: list[int]) -> str:
    return TOK.decode([t for t in ids if t != EOS_TOKEN_ID], skip_special_tokens=True)


PROMPTS = [(f"p{i}", "the quick brown fox " * (i % 5) + f"jumps {i} times" + "." * i) for i in range(10)]


def check_against_reference(results, prompts, params=GREEDY, eos_period=0):
    for rid, prompt in prompts:
        ref = toy_generate(TOK.encode(prompt), params, eos_period=eos_period)
        assert results[rid]["ids"] == ref, rid
        assert results[rid]["text"] == expected_text(ref)
        assert results[rid]["reason"] == ("stop" if ref[-1] == EOS_TOKEN_ID else "length")


def test_batched_greedy_equals_reference_one_at_a_time():
    engine, _ = make(eos_period=20)
    for rid, prompt in PROMPTS:
        engine.add_request(rid, prompt, GREEDY)
    results = run_all(engine)
    check_against_reference(results, PROMPTS, eos_period=20)
    assert {r["reason"] for r in results.values()} == {"stop", "length"}  # both endings exercised
    stats = engine.stats()
    assert stats.requests_running == stats.requests_waiting == 0
    assert max(stats.recent_batch_sizes) > 1  # really batched
    assert engine.block_manager.num_used_blocks == 0


def test_tiny_kv_cache_preempts_and_still_matches():
    engine, _ = make(num_blocks=32, max_model_len=128, max_num_seqs=8)
    for rid, prompt in PROMPTS:
        engine.add_request(rid, prompt, GREEDY)
    results = run_all(engine)
    check_against_reference(results, PROMPTS)
    assert engine.stats().preemptions > 0


def test_forced_chunked_prefill_matches():
    engine, runner = make(max_batch_tokens=8)
    for rid, prompt in PROMPTS:
        engine.add_request(rid, prompt, GREEDY)
    results = run_all(engine)
    check_against_reference(results, PROMPTS)
    assert all(sum(n for _, _, n, _ in batch) <= 8 for batch in runner.batches)
    assert any(not sample for batch in runner.batches for *_, sample in batch)  # some chunk did not sample


def test_second_identical_run_is_served_from_prefix_cache():
    engine, runner = make(num_blocks=512)
    for rid, prompt in PROMPTS:
        engine.add_request(rid, prompt, GREEDY)
    first = run_all(engine)
    computed_first = runner.tokens_computed
    hits_first = engine.stats().prefix_cache_hits_tokens  # > 0: the prompts share "the quick brown fox"
    for rid, prompt in PROMPTS:
        engine.add_request(rid + "-again", prompt, GREEDY)
    second = run_all(engine)
    for rid, prompt in PROMPTS:
        assert second[rid + "-again"]["ids"] == first[rid]["ids"]
        # every full block before the last prompt token came from the cache
        n = len(TOK.encode(prompt))
        assert second[rid + "-again"]["deltas"][-1].cached_prompt_tokens == (n - 1) // 4 * 4
    stats = engine.stats()
    assert stats.prefix_cache_hits_tokens - hits_first == sum((len(TOK.encode(p)) - 1) // 4 * 4 for _, p in PROMPTS)
    # the second run computed only the uncached prompt tails and the decodes
    expected = sum(len(TOK.encode(p)) - (len(TOK.encode(p)) - 1) // 4 * 4 + len(first[rid]["ids"]) - 1
                   for rid, p in PROMPTS)
    assert runner.tokens_computed - computed_first == expected


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    prompts=st.lists(st.lists(st.integers(97, 100), min_size=1, max_size=30), min_size=1, max_size=8),
    max_tokens=st.integers(1, 12),
    block_size=st.sampled_from([1, 2, 4, 8]),
    num_blocks_extra=st.integers(0, 30),
    max_batch_tokens=st.integers(1, 48),
    max_num_seqs=st.integers(1, 5),
    chunked=st.booleans(),
    prefix=st.booleans(),
    aborts=st.dictionaries(st.integers(0, 7), st.integers(0, 20), max_size=3),
)
def test_random_workloads_match_reference(prompts, max_tokens, block_size, num_blocks_extra, max_batch_tokens,
                                          max_num_seqs, chunked, prefix, aborts):
    """Any config, any prompts (sharing prefixes), aborts at random steps: every request that is
    not aborted gets exactly the reference output, and the block bookkeeping stays consistent."""
    max_model_len = 44
    if not chunked:
        max_batch_tokens = max(max_batch_tokens, max_model_len)
    engine, runner = make(
        max_model_len=max_model_len, block_size=block_size,
        num_blocks=-(-max_model_len // block_size) + num_blocks_extra,
        max_batch_tokens=max_batch_tokens, max_num_seqs=max_num_seqs,
        enable_chunked_prefill=chunked, enable_prefix_caching=prefix, eos_period=9,
    )
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    for i, p in enumerate(prompts):
        engine.add_request(str(i), p, params)
    outputs: dict[str, list[int]] = {str(i): [] for i in range(len(prompts))}
    reasons: dict[str, str] = {}
    step = 0
    while engine.has_unfinished():
        for i, at in aborts.items():
            if at == step:
                engine.abort_request(str(i))  # unknown or finished ids are ignored
        for d in engine.step():
            outputs[d.request_id] += d.token_ids
            if d.finish_reason:
                reasons[d.request_id] = d.finish_reason
        engine.block_manager.check_invariants(engine.scheduler.running)
        step += 1
        assert step < 5000
    for i, p in enumerate(prompts):
        ref = toy_generate(p, params, eos_period=9)
        if reasons[str(i)] == "abort":
            assert ref[: len(outputs[str(i)])] == outputs[str(i)]
        else:
            assert outputs[str(i)] == ref
    assert engine.block_manager.num_used_blocks == 0
    assert len(runner.released) == len(prompts)
    assert not runner.rngs  # every sequence released its per-request state


def test_seeded_sampling_is_reproducible_and_batch_independent():
    params = SamplingParams(max_tokens=16, temperature=0.8, seed=1234)
    engine, _ = make()
    engine.add_request("alone", "hello", params)
    alone = run_all(engine)["alone"]["ids"]
    engine, _ = make(max_batch_tokens=6)
    for rid, prompt in PROMPTS[:5]:
        engine.add_request(rid, prompt, SamplingParams(max_tokens=10, temperature=1.0))
    engine.add_request("crowded", "hello", params)
    crowded = run_all(engine)["crowded"]["ids"]
    assert alone == crowded == toy_generate(TOK.encode("hello"), params)
    assert alone != toy_generate(TOK.encode("hello"), SamplingParams(max_tokens=16, temperature=0.8, seed=99))


def _reference_text(prompt: str, n: int = 40) -> str:
    return expected_text(toy_generate(TOK.encode(prompt), SamplingParams(max_tokens=n, temperature=0.0)))


def test_stop_string_cuts_text_and_is_never_streamed():
    prompt = "stop strings here"
    full = _reference_text(prompt)
    stop = full[10:13]
    cut = full[: full.index(stop)]
    engine, _ = make()
    engine.add_request("s", prompt, SamplingParams(max_tokens=40, temperature=0.0, stop=(stop, "not-there")))
    r = run_all(engine)["s"]
    assert r["reason"] == "stop"
    assert r["text"] == cut
    streamed = ""
    for d in r["deltas"]:
        streamed += d.text
        assert stop not in streamed
        assert full.startswith(streamed)  # never text beyond what the model produced
    # the tokens that formed the stop string were generated: token_ids run up to its end
    assert expected_text(r["ids"]).startswith(cut + stop)


def test_text_that_may_start_a_stop_string_is_held_back():
    prompt = "hold back"
    full = _reference_text(prompt)
    stop = full[5:7] + "\x00"  # starts like the output at 5 but never completes
    engine, _ = make()
    engine.add_request("h", prompt, SamplingParams(max_tokens=40, temperature=0.0, stop=stop))
    r = run_all(engine)["h"]
    assert r["reason"] == "length" and r["text"] == full
    emitted = [d.text for d in r["deltas"]]
    # when the text ended with full[5:7], those chars were withheld until the next char ruled the stop out
    # one token = one character here: after token i the text is full[: i + 1]
    streamed_len = [len("".join(emitted[: i + 1])) for i in range(len(emitted))]
    assert streamed_len[5] <= 5 and streamed_len[6] <= 5  # full[:6], full[:7] end like the stop string
    assert streamed_len[-1] == len(full)


def test_stop_token_ids_and_eos():
    prompt = "token stops"
    ref = toy_generate(TOK.encode(prompt), SamplingParams(max_tokens=30, temperature=0.0))
    stop_token = ref[5]
    engine, _ = make()
    engine.add_request("t", prompt, SamplingParams(max_tokens=30, temperature=0.0, stop_token_ids=(stop_token,)))
    r = run_all(engine)["t"]
    k = ref.index(stop_token)
    assert r["ids"] == ref[: k + 1] and r["reason"] == "stop"
    assert r["text"] == expected_text(ref[:k])  # the stop token's text is not in the output


def test_ignore_eos_runs_to_max_tokens():
    engine, _ = make(eos_period=3)
    prompt = "eos soon"
    params = SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True)
    engine.add_request("e", prompt, params)
    r = run_all(engine)["e"]
    assert r["reason"] == "length" and len(r["ids"]) == 30
    assert EOS_TOKEN_ID in r["ids"]  # an EOS was generated and ignored
    assert r["ids"] == toy_generate(TOK.encode(prompt), params, eos_period=3)


def test_validation_errors_name_field_and_limit():
    engine, _ = make(max_model_len=32)
    with pytest.raises(RequestValidationError, match="prompt is empty") as e:
        engine.add_request("a", "", GREEDY)
    assert e.value.param == "prompt"
    with pytest.raises(RequestValidationError, match="prompt is empty"):
        engine.add_request("a", [], GREEDY)
    with pytest.raises(RequestValidationError, match=r"prompt \(20 tokens\) \+ max_tokens \(24\) = 44 exceeds "
                                                    r"max_model_len 32; set max_tokens to at most 12") as e:
        engine.add_request("a", "x" * 20, GREEDY)
    assert e.value.param == "max_tokens"
    with pytest.raises(RequestValidationError, match="the prompt has 40 tokens but max_model_len is 32") as e:
        engine.add_request("a", "x" * 40, GREEDY)
    assert e.value.param == "prompt"
    with pytest.raises(RequestValidationError, match="below the vocabulary size 257"):
        engine.add_request("a", [1, 2, 999], GREEDY)
    with pytest.raises(RequestValidationError, match="integers >= 0"):
        engine.add_request("a", [1, -2], GREEDY)
    with pytest.raises(ValueError, match="max_tokens must be an integer >= 1"):
        SamplingParams(max_tokens=0)
    with pytest.raises(ValueError, match="temperature must be >= 0"):
        SamplingParams(temperature=-1)
    with pytest.raises(ValueError, match=r"top_p must be in \(0, 1\]"):
        SamplingParams(top_p=0)
    assert not engine.has_unfinished()


def test_bad_request_never_affects_others():
    engine, _ = make(max_model_len=40)
    engine.add_request("good", "hello", SamplingParams(max_tokens=8, temperature=0.0))
    run_one = engine.step()
    with pytest.raises(RequestValidationError):
        engine.add_request("bad", "y" * 39, SamplingParams(max_tokens=8))
    with pytest.raises(RequestValidationError, match="already in flight"):
        engine.add_request("good", "hello", SamplingParams(max_tokens=8))
    rest = run_all(engine)
    ids = run_one[0].token_ids + rest["good"]["ids"]
    assert ids == toy_generate(TOK.encode("hello"), SamplingParams(max_tokens=8, temperature=0.0))


def test_queue_full_with_retry_after_from_recent_latency():
    clock = Clock()
    config = EngineConfig(max_model_len=64, num_blocks=32, block_size=4, max_num_seqs=1, max_queue_length=2)
    engine = LLMEngine(config, ClockedRunner(clock, 32, 4), TOK, clock=clock)
    four = SamplingParams(max_tokens=4, temperature=0.0)
    engine.add_request("a", "one", four)
    engine.add_request("b", "two", four)
    with pytest.raises(QueueFullError, match="queue is full") as e:
        engine.add_request("c", "three", four)
    assert e.value.retry_after == 1.0  # no latency measured yet
    engine.step()  # "a" is admitted: the queue has room again
    engine.add_request("c", "three", four)
    while engine.is_running("a"):
        engine.step()  # one clock second per step: "a" takes 4 s
    engine.step()  # "b" admitted
    engine.add_request("d", "four", four)
    with pytest.raises(QueueFullError) as e:
        engine.add_request("e", "five", four)
    # two waiting + the rejected one, one at a time, 4 s each
    assert e.value.retry_after == pytest.approx(12.0)


def test_abort_frees_blocks_at_once_and_reports():
    engine, runner = make()
    engine.add_request("x", "abort me please " * 3, SamplingParams(max_tokens=50, temperature=0.0))
    engine.add_request("y", "keep me", SamplingParams(max_tokens=5, temperature=0.0))
    engine.step()
    used_before = engine.block_manager.num_used_blocks
    engine.abort_request("x")
    assert engine.block_manager.num_used_blocks < used_before
    engine.abort_request("does-not-exist")  # ignored
    deltas = engine.step()
    final = [d for d in deltas if d.request_id == "x"]
    assert len(final) == 1 and final[0].finish_reason == "abort"
    results = run_all(engine)
    assert "x" not in results and results["y"]["reason"] == "length"
    assert len(runner.released) == 2


class ClockedRunner(ToyModelRunner):
    def __init__(self, clock: Clock, *a, **kw):
        super().__init__(*a, **kw)
        self.clock = clock

    def execute(self, batch: ScheduledBatch) -> dict[int, int]:
        self.clock.now += 1.0  # every step takes one "second"
        return super().execute(batch)


def test_timings_from_injected_clock():
    clock = Clock()
    config = EngineConfig(max_model_len=64, num_blocks=32, block_size=4, max_num_seqs=1)
    engine = LLMEngine(config, ClockedRunner(clock, 32, 4), TOK, clock=clock)
    engine.add_request("a", "first", SamplingParams(max_tokens=3, temperature=0.0))
    engine.add_request("b", "second", SamplingParams(max_tokens=2, temperature=0.0))
    results = run_all(engine)
    a, b = results["a"]["deltas"][-1], results["b"]["deltas"][-1]
    assert (a.queue_time, a.time_to_first_token, a.e2e_latency) == (0.0, 1.0, 3.0)
    # "b" waited for "a" (max_num_seqs=1): admitted at t=3, first token at t=4, done at t=5
    assert (b.queue_time, b.time_to_first_token, b.e2e_latency) == (3.0, 4.0, 5.0)
    assert results["a"]["deltas"][0].time_to_first_token == 1.0
    assert a.prompt_tokens == 5 and a.completion_tokens == 3


def test_ttl_expiry_through_the_engine_when_idle():
    clock = Clock()
    engine, _ = make(clock=clock, cache_ttl_seconds=60)
    engine.add_request("a", "a prompt long enough for blocks", SamplingParams(max_tokens=4, temperature=0.0))
    run_all(engine)
    cached = engine.block_manager.num_cached_blocks
    assert cached > 0
    clock.now += 59
    assert engine.step() == [] and engine.block_manager.num_cached_blocks == cached
    clock.now += 1
    engine.step()  # an idle step still expires
    stats = engine.stats()
    assert stats.evictions["expired"] == cached and engine.block_manager.num_cached_blocks == 0
    assert stats.kv_blocks_free == stats.kv_blocks_total


def test_reset_prefix_cache_makes_the_next_run_cold():
    engine, runner = make()
    engine.add_request("a", "a shared history of some length", GREEDY)
    run_all(engine)
    assert engine.block_manager.num_cached_blocks > 0
    dropped = engine.reset_prefix_cache()
    assert dropped > 0 and engine.block_manager.num_cached_blocks == 0
    assert engine.stats().evictions == {"expired": 0, "pressure": 0}
    engine.add_request("b", "a shared history of some length", GREEDY)
    assert run_all(engine)["b"]["deltas"][-1].cached_prompt_tokens == 0


def test_stats_snapshot_and_batch_sizes_drained():
    engine, _ = make(max_batch_tokens=128)
    for rid, prompt in PROMPTS[:3]:
        engine.add_request(rid, prompt, SamplingParams(max_tokens=4, temperature=0.0))
    s0 = engine.stats()
    assert s0.requests_waiting == 3 and s0.kv_blocks_total == 64 and s0.kv_capacity_tokens == 256
    engine.step()
    s1 = engine.stats()
    assert s1.requests_running == 3 and s1.recent_batch_sizes == [3]
    assert s1.kv_blocks_free < 64 and 0 < s1.kv_cache_usage_ratio < 1
    assert s1.prompt_tokens == sum(len(TOK.encode(p)) for _, p in PROMPTS[:3])
    assert engine.stats().recent_batch_sizes == []
    run_all(engine)
    s2 = engine.stats()
    assert s2.generation_tokens == 12 and s2.steps == 4


def test_runner_and_config_must_agree():
    config = EngineConfig(max_model_len=16, num_blocks=8, block_size=4)
    with pytest.raises(ValueError, match="does not match the engine config"):
        LLMEngine(config, ToyModelRunner(9, 4), TOK)


def test_deltas_are_plain_dataclasses():
    engine, _ = make()
    engine.add_request("d", "x", SamplingParams(max_tokens=2, temperature=0.0))
    d = run_all(engine)["d"]["deltas"]
    assert all(isinstance(x, RequestOutputDelta) for x in d)
    assert d[-1].finish_reason == "length" and d[0].finish_reason is None


def test_batch_size_buffer_is_bounded_when_nobody_scrapes(monkeypatch):
    # stats() drains the per-step batch sizes; a server whose /metrics is never scraped must not
    # keep one entry per step for days.
    import fleetserve_server.engine.llm_engine as llm_engine_module

    monkeypatch.setattr(llm_engine_module, "MAX_RECENT_BATCH_SIZES", 5)
    engine, _ = make()
    engine.add_request("r", "hello there", SamplingParams(max_tokens=20, temperature=0, ignore_eos=True))
    run_all(engine)
    assert engine.num_steps > 5
    assert len(engine.stats().recent_batch_sizes) == 5
    assert engine.stats().recent_batch_sizes == []
