"""Tensor parallelism: greedy outputs with N ranks are those of one process, on CPU (gloo) here
and on CUDA (NCCL) with two GPUs (``benchmarks/gpu_check.sh``).

* a tiny random Llama, 10 prompts, TP=2 against TP=1 (itself identical to Hugging Face,
  test_llm_identity.py): with a roomy cache run twice (the second from the prefix cache), and
  with a KV cache so small that the scheduler preempts, plus chunked prefill;
* a Qwen2 variant with q/k/v biases, an untied LM head, one KV head (replicated on both ranks)
  and an intermediate width and vocabulary that do not split evenly;
* every rank's allocation against the planner's per-rank prediction made before loading
  (none, int8, nf4: each rank quantizes its own shard);
* the builtin SmolLM2 (9 heads, 3 KV heads: TP=3, the smallest size > 1 that splits it).

One torch thread per rank: this machine has two cores.
"""

from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")

from fleetserve_server import LLM, SamplingParams  # noqa: E402
from fleetserve_server.memory import MiB, architecture_from_config, plan_memory  # noqa: E402
from fleetserve_server.runner.builtin import resolve_model  # noqa: E402
from fleetserve_server.testing import make_tiny_llama  # noqa: E402

LENGTHS = [1, 4, 7, 12, 16, 17, 25, 33, 48, 61]
GREEDY = SamplingParams(max_tokens=24, temperature=0.0)
DEVICES = [
    pytest.param("cpu", id="cpu"),
    pytest.param("cuda", id="cuda", marks=pytest.mark.skipif(
        not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs two CUDA devices")),
]


def _prompts(seed: int = 7) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 259, (n,), generator=gen).tolist() for n in LENGTHS]


def _tokens(llm: LLM, prompts: list[list[int]], params: SamplingParams = GREEDY) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]


def _llm(path, device: str, tp: int, **kwargs) -> LLM:  # type: ignore[no-untyped-def]
    return LLM(str(path), max_model_len=128, dtype="float32", device=device, threads=1,
               tensor_parallel_size=tp, **kwargs)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):  # type: ignore[no-untyped-def]
    # intermediate 130 = 65 + 65, 4 heads / 2 KV heads: 2 q heads and 1 KV head per rank
    return make_tiny_llama(tmp_path_factory.mktemp("tp") / "llama", num_layers=3, intermediate_size=130)


@pytest.mark.parametrize("device", DEVICES)
def test_tiny_tp2_greedy_equals_one_process_with_prefix_cache_preemption_and_chunking(tiny, device: str) -> None:
    prompts = _prompts()
    single = _llm(tiny, device, 1, block_size=4)
    expected = _tokens(single, prompts)
    single.loaded.close()

    roomy = _llm(tiny, device, 2, block_size=4)
    try:
        assert roomy.loaded.tensor_parallel_size == 2
        assert _tokens(roomy, prompts) == expected
        hits = roomy.engine.stats().prefix_cache_hits_tokens
        again = roomy.generate(prompts, GREEDY, use_tqdm=False)
        assert [o.outputs[0].token_ids for o in again] == expected
        assert roomy.engine.stats().prefix_cache_hits_tokens > hits
        assert sum(o.num_cached_tokens for o in again) >= sum((len(p) - 1) // 4 * 4 for p in prompts)
    finally:
        roomy.loaded.close()

    tight = _llm(tiny, device, 2, max_num_seqs=16, kv_cache_tokens=128, block_size=8, max_batch_tokens=24)
    try:
        partial = [0]
        execute = tight.loaded.runner.execute

        def counting(batch):  # type: ignore[no-untyped-def]
            partial[0] += sum(1 for s in batch.sequences if not s.sample)
            return execute(batch)

        tight.loaded.runner.execute = counting  # type: ignore[method-assign]
        assert _tokens(tight, prompts) == expected
        assert tight.engine.stats().preemptions > 0, "the KV cache was meant to be too small for every sequence"
        assert partial[0] > 0, "max_batch_tokens below the longest prompt must split its prefill"
    finally:
        tight.loaded.close()


def test_qwen2_biases_untied_head_replicated_kv_head_and_uneven_splits(tmp_path) -> None:  # type: ignore[no-untyped-def]
    path = make_tiny_llama(tmp_path / "qwen2", architecture="qwen2", num_layers=2, num_heads=4, num_kv_heads=1,
                           intermediate_size=131, tie_word_embeddings=False)
    vocab = json.loads((path / "config.json").read_text())["vocab_size"]
    prompts = _prompts(seed=3)
    single = _llm(path, "cpu", 1)
    expected = _tokens(single, prompts)
    split = _llm(path, "cpu", 2)
    try:
        assert _tokens(split, prompts) == expected
        layout = [(split.loaded.runner.model.num_heads, split.loaded.runner.model.num_kv_heads)]
        assert layout == [(2, 1)]  # rank 0: half the q heads, the one KV head
        if vocab % 2:  # rank 0 holds the extra row; the gathered logits still cover the whole vocabulary
            assert split.loaded.runner.model.embed.weight.shape[0] == vocab // 2 + 1
    finally:
        split.loaded.close()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("quantization", ["none", "int8", "nf4"])
def test_every_rank_allocates_what_the_plan_predicted(tmp_path, quantization: str, device: str) -> None:  # type: ignore[no-untyped-def]
    if quantization != "none":
        pytest.importorskip("bitsandbytes")
    # wide enough that the Linear layers dominate, as in real models (as test_memory_allocation.py)
    path = make_tiny_llama(tmp_path / "alloc", num_layers=4, hidden_size=256, num_heads=8, num_kv_heads=2,
                           intermediate_size=688)
    arch = architecture_from_config(json.loads((path / "config.json").read_text()), name="alloc")
    predicted = plan_memory(arch, quantization=quantization, dtype="float32", device=device,
                            device_memory_bytes=(64 if device == "cpu" else 1024) * MiB, max_model_len=256,
                            max_num_seqs=4, max_batch_tokens=256, tensor_parallel_size=2)
    assert predicted.fits and len(predicted.ranks) == 2
    llm = LLM(str(path), quantization=quantization, device=device, dtype="float32", max_model_len=256, max_num_seqs=4,
              max_batch_tokens=256, kv_cache_tokens=predicted.kv_capacity_tokens, threads=1,
              tensor_parallel_size=2, progress=False)
    try:
        measured = llm.loaded.rank_memory()
    finally:
        llm.loaded.close()
    assert [m["rank"] for m in measured] == [0, 1]
    for rank, m in zip(predicted.ranks, measured, strict=True):
        assert abs(rank.weights_bytes - m["weights_bytes"]) <= 0.05 * m["weights_bytes"], (rank, m)
        kv_predicted = predicted.kv_capacity_tokens * rank.kv_bytes_per_token
        assert abs(kv_predicted - m["kv_cache_bytes"]) <= 0.05 * m["kv_cache_bytes"], (rank, m)
    # each rank holds about half the Linear weights: far less than one process with the whole model
    whole = plan_memory(arch, quantization=quantization, dtype="float32", device=device,
                        device_memory_bytes=(64 if device == "cpu" else 1024) * MiB, max_model_len=256, max_num_seqs=4,
                        max_batch_tokens=256)
    assert measured[0]["weights_bytes"] < 0.6 * whole.weights_bytes


BUILTIN_PROMPTS = [
    "The capital of France is", "Hi", "Water boils at a temperature of",
    "Once upon a time, in a small village by the sea, there lived an old fisherman who",
    "def fibonacci(n):", "The three primary colors are", "Translate to French: I like apples.",
    "List three animals that live in the ocean: 1.",
]


@pytest.mark.slow
def test_builtin_tp3_greedy_equals_one_process_with_preemption_chunking_and_prefix_cache() -> None:
    import transformers

    path = resolve_model("builtin:smollm2-135m-instruct", progress=False).path
    tok = transformers.AutoTokenizer.from_pretrained(path)
    prompts = [tok.encode(p) for p in BUILTIN_PROMPTS]
    params = SamplingParams(max_tokens=8, temperature=0.0)
    single = LLM(max_model_len=64, max_num_seqs=16, dtype="float32", device="cpu", block_size=4, threads=1)
    expected = _tokens(single, prompts, params)
    single.loaded.close()
    tight = LLM(max_model_len=64, max_num_seqs=16, dtype="float32", device="cpu", block_size=4, threads=1,
                kv_cache_tokens=96, max_batch_tokens=12, tensor_parallel_size=3)
    try:
        assert _tokens(tight, prompts, params) == expected
        assert tight.engine.stats().preemptions > 0
        hits = tight.engine.stats().prefix_cache_hits_tokens
        assert _tokens(tight, prompts, params) == expected  # partly from what the cache still holds
        assert tight.engine.stats().prefix_cache_hits_tokens > hits
    finally:
        tight.loaded.close()
