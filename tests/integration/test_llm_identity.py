"""``LLM.generate`` batched == Hugging Face ``generate(do_sample=False)`` one prompt at a time.

Float32, ≥ 8 prompts of different lengths in one batch, on a tiny random Llama
built here and on the builtin SmolLM2 — also with a KV cache so small that
the scheduler must preempt, with prefix caching serving a second identical
run, and with chunked prefill forced by a small ``max_batch_tokens``.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from fleetserve_server import LLM, SamplingParams  # noqa: E402
from fleetserve_server.runner.builtin import resolve_model  # noqa: E402
from fleetserve_server.testing import make_tiny_llama  # noqa: E402

torch.set_num_threads(2)

TINY_LENGTHS = [1, 4, 7, 12, 16, 17, 25, 33, 48, 61]
BUILTIN_PROMPTS = [
    "The capital of France is",
    "Hi",
    "Water boils at a temperature of",
    "Once upon a time, in a small village by the sea, there lived an old fisherman who",
    "def fibonacci(n):",
    "The three primary colors are",
    "Translate to French: I like apples.",
    "List three animals that live in the ocean: 1.",
]


def _hf_reference(path, prompts: list[list[int]], max_new: int) -> list[list[int]]:  # type: ignore[no-untyped-def]
    """Greedy continuations one prompt at a time; stops at EOS like the engine."""
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    outs = []
    with torch.inference_mode():
        for p in prompts:
            ids = torch.tensor([p])
            full = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=max_new)
            outs.append(full[0, len(p):].tolist())
    return outs


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):  # type: ignore[no-untyped-def]
    path = make_tiny_llama(tmp_path_factory.mktemp("tiny") / "llama", num_layers=3)
    gen = torch.Generator().manual_seed(7)
    prompts = [torch.randint(3, 259, (n,), generator=gen).tolist() for n in TINY_LENGTHS]
    return path, prompts, _hf_reference(path, prompts, 24)


SCENARIOS = {
    # name: (LLM kwargs, what must have happened)
    "roomy": (dict(max_num_seqs=16), None),
    "preemption": (dict(max_num_seqs=16, kv_cache_tokens=128, block_size=8), "preemptions"),
    "chunked_prefill": (dict(max_num_seqs=16, max_batch_tokens=24, block_size=8), "chunked"),
}


def _count_partial_prefills(llm: LLM) -> list[int]:
    """Wrap the runner to count scheduled prefill chunks that end before the prompt does."""
    runner, counter = llm.loaded.runner, [0]
    execute = runner.execute

    def counting(batch):  # type: ignore[no-untyped-def]
        counter[0] += sum(1 for s in batch.sequences if not s.sample)
        return execute(batch)

    runner.execute = counting  # type: ignore[method-assign]
    return counter


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_tiny_batched_greedy_equals_hf_one_at_a_time(tiny, scenario: str) -> None:
    path, prompts, expected = tiny
    kwargs, must = SCENARIOS[scenario]
    llm = LLM(str(path), max_model_len=128, dtype="float32", device="cpu", **kwargs)
    partial = _count_partial_prefills(llm)
    outs = llm.generate(prompts, SamplingParams(max_tokens=24, temperature=0.0), use_tqdm=False)
    assert [o.prompt_token_ids for o in outs] == prompts
    assert [o.outputs[0].token_ids for o in outs] == expected
    stats = llm.engine.stats()
    if must == "preemptions":
        assert stats.preemptions > 0, "the KV cache was meant to be too small to hold every sequence"
    if must == "chunked":
        assert partial[0] > 0, "max_batch_tokens below the longest prompt must split its prefill"


def test_tiny_prefix_cache_second_run_is_served_from_cache_and_identical(tiny) -> None:
    path, prompts, expected = tiny
    llm = LLM(str(path), max_model_len=128, dtype="float32", device="cpu", block_size=4)
    first = llm.generate(prompts, SamplingParams(max_tokens=24, temperature=0.0), use_tqdm=False)
    hits_before = llm.engine.stats().prefix_cache_hits_tokens
    second = llm.generate(prompts, SamplingParams(max_tokens=24, temperature=0.0), use_tqdm=False)
    assert [o.outputs[0].token_ids for o in first] == expected
    assert [o.outputs[0].token_ids for o in second] == expected
    cached = sum(o.num_cached_tokens for o in second)
    assert llm.engine.stats().prefix_cache_hits_tokens > hits_before
    # every full block of every prompt (the last token is always recomputed)
    assert cached >= sum((len(p) - 1) // 4 * 4 for p in prompts)


@pytest.fixture(scope="module")
def builtin():  # type: ignore[no-untyped-def]
    path = resolve_model("builtin:smollm2-135m-instruct", progress=False).path
    tok = transformers.AutoTokenizer.from_pretrained(path)
    prompts = [tok.encode(p) for p in BUILTIN_PROMPTS]
    return path, prompts, _hf_reference(path, prompts, 6)


@pytest.mark.slow
def test_builtin_batched_greedy_equals_hf_including_preemption_prefix_cache_and_chunking(builtin) -> None:
    path, prompts, expected = builtin
    params = SamplingParams(max_tokens=6, temperature=0.0)
    roomy = LLM(max_model_len=64, max_num_seqs=16, dtype="float32", device="cpu", block_size=4)
    assert [o.outputs[0].token_ids for o in roomy.generate(prompts, params, use_tqdm=False)] == expected
    again = roomy.generate(prompts, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in again] == expected
    assert sum(o.num_cached_tokens for o in again) > 0
    tight = LLM(max_model_len=64, max_num_seqs=16, dtype="float32", device="cpu", block_size=4,
                kv_cache_tokens=64, max_batch_tokens=12)
    partial = _count_partial_prefills(tight)
    assert [o.outputs[0].token_ids for o in tight.generate(prompts, params, use_tqdm=False)] == expected
    assert tight.engine.stats().preemptions > 0
    assert partial[0] > 0
