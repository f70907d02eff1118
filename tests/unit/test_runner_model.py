"""The paged forward and the sampler against Hugging Face, without the engine.

A minimal driver below plays the scheduler's part (sequential block tables,
prefill then batched decode, optional chunking) so that the runner is tested
on its own; the engine-level identity tests live in tests/integration.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from fleetserve_server.engine.interfaces import ScheduledBatch, ScheduledSequence  # noqa: E402
from fleetserve_server.engine.sampling_params import SamplingParams  # noqa: E402
from fleetserve_server.runner.loader import load_model  # noqa: E402
from fleetserve_server.runner.model_runner import TorchModelRunner  # noqa: E402
from fleetserve_server.testing import make_tiny_llama  # noqa: E402

torch.set_num_threads(2)
GREEDY = SamplingParams(max_tokens=8, temperature=0.0)


def _prompts(n: int, vocab: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(1)
    lengths = [1, 3, 5, 9, 16, 17, 31, 40, 2, 23][:n]
    return [torch.randint(3, vocab, (length,), generator=gen).tolist() for length in lengths]


def _drive(runner: TorchModelRunner, prompts: list[list[int]], params: list[SamplingParams], steps: int,
           chunk: int | None = None, first_id: int = 0) -> list[list[int]]:
    """Prefill every prompt (in chunks of ``chunk`` tokens), then decode all together."""
    bs = runner.block_size
    per_seq = (max(len(p) for p in prompts) + steps) // bs + 1
    tables = [list(range(first_id * 0 + i * per_seq, (i + 1) * per_seq)) for i in range(len(prompts))]
    outs: list[list[int]] = [[] for _ in prompts]
    done = [0] * len(prompts)
    # prefill, possibly chunked, all sequences in each step
    while any(done[i] < len(p) for i, p in enumerate(prompts)):
        seqs = []
        for i, p in enumerate(prompts):
            if done[i] >= len(p):
                continue
            n = len(p) - done[i] if chunk is None else min(chunk, len(p) - done[i])
            last = done[i] + n == len(p)
            seqs.append(ScheduledSequence(first_id + i, p[done[i] : done[i] + n], done[i], tables[i], last, params[i]))
            done[i] += n
        result = runner.execute(ScheduledBatch(seqs))
        for i in range(len(prompts)):
            if first_id + i in result:
                outs[i].append(result[first_id + i])
    for _ in range(steps - 1):
        seqs = [
            ScheduledSequence(first_id + i, [outs[i][-1]], len(p) + len(outs[i]) - 1, tables[i], True, params[i])
            for i, p in enumerate(prompts)
        ]
        result = runner.execute(ScheduledBatch(seqs))
        for i in range(len(prompts)):
            outs[i].append(result[first_id + i])
    return outs


def _runner(path, **kw) -> TorchModelRunner:  # type: ignore[no-untyped-def]
    loaded = load_model(path, dtype="float32", device=torch.device("cpu"), quantization="none", max_positions=256)
    return TorchModelRunner(loaded.model, num_blocks=kw.get("num_blocks", 256), block_size=kw.get("block_size", 4),
                            eos_token_ids=frozenset())


def _hf_greedy(path, prompts: list[list[int]], steps: int) -> list[list[int]]:  # type: ignore[no-untyped-def]
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    outs = []
    for p in prompts:
        ids = torch.tensor([p])
        full = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=steps,
                           min_new_tokens=steps, pad_token_id=0)
        outs.append(full[0, len(p):].tolist())
    return outs


@pytest.mark.parametrize(
    "arch,kwargs",
    [
        ("llama", {}),
        ("llama", {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                    "high_freq_factor": 4.0, "original_max_position_embeddings": 64}}),
        ("llama", {"tie_word_embeddings": False, "num_kv_heads": 4}),
        ("mistral", {}),
        ("qwen2", {}),
        ("qwen3", {}),
    ],
)
def test_paged_forward_matches_hf_greedy(tmp_path, arch, kwargs) -> None:
    path = make_tiny_llama(tmp_path / arch, architecture=arch, **kwargs)
    prompts = _prompts(8, 259)
    expected = _hf_greedy(path, prompts, steps=10)
    got = _drive(_runner(path), prompts, [GREEDY] * len(prompts), steps=10)
    assert got == expected


def test_chunked_prefill_matches_whole_prefill(tmp_path) -> None:
    path = make_tiny_llama(tmp_path / "m")
    prompts = _prompts(8, 259)
    expected = _hf_greedy(path, prompts, steps=6)
    assert _drive(_runner(path, block_size=8), prompts, [GREEDY] * 8, steps=6, chunk=5) == expected


def test_seeded_sampling_is_reproducible_and_batch_independent(tmp_path) -> None:
    path = make_tiny_llama(tmp_path / "m")
    prompts = _prompts(8, 259)
    seeded = SamplingParams(max_tokens=12, temperature=1.0, top_p=0.95, top_k=50, seed=1234)
    runner = _runner(path)
    alone = _drive(runner, prompts[4:5], [seeded], steps=12, first_id=100)[0]
    runner.release(100)
    again = _drive(runner, prompts[4:5], [seeded], steps=12, first_id=100)[0]
    others = [SamplingParams(max_tokens=12, temperature=1.0) for _ in range(8)]
    others[4] = seeded
    batched = _drive(_runner(path), prompts, others, steps=12, first_id=7)[4]
    assert alone == again == batched
    other_seed = SamplingParams(max_tokens=12, temperature=1.0, top_p=0.95, top_k=50, seed=99)
    assert _drive(_runner(path), prompts[4:5], [other_seed], steps=12)[0] != alone


def test_top_k_one_and_tiny_top_p_are_greedy(tmp_path) -> None:
    path = make_tiny_llama(tmp_path / "m")
    prompts = _prompts(4, 259)
    greedy = _drive(_runner(path), prompts, [GREEDY] * 4, steps=6)
    top1 = SamplingParams(max_tokens=6, temperature=1.5, top_k=1, seed=3)
    tiny_p = SamplingParams(max_tokens=6, temperature=1.5, top_p=1e-6, seed=3)
    assert _drive(_runner(path), prompts, [top1] * 4, steps=6) == greedy
    assert _drive(_runner(path), prompts, [tiny_p] * 4, steps=6) == greedy


def test_bad_scheduled_input_raises_value_error(tmp_path) -> None:
    runner = _runner(make_tiny_llama(tmp_path / "m"))
    with pytest.raises(ValueError, match="vocabulary"):
        runner.execute(ScheduledBatch([ScheduledSequence(0, [10_000], 0, [0], True, GREEDY)]))
    with pytest.raises(ValueError, match="block_table"):
        runner.execute(ScheduledBatch([ScheduledSequence(0, [5] * 9, 0, [0, 1], True, GREEDY)]))


def test_cpu_fp32_linears_are_packed_and_match_f_linear(tmp_path) -> None:
    from fleetserve_server.runner.loader import model_bytes
    from fleetserve_server.runner.model import PackedLinear, cpu_packing_supported

    assert cpu_packing_supported(torch.device("cpu"), torch.float32)
    assert not cpu_packing_supported(torch.device("cpu"), torch.bfloat16)
    path = make_tiny_llama(tmp_path / "tied", architecture="qwen2")  # q/k/v biases, tied lm_head
    loaded = load_model(path, dtype="float32", device=torch.device("cpu"), quantization="none", max_positions=64)
    model = loaded.model
    plain = {name: (m.weight.detach().clone(), None if m.bias is None else m.bias.detach().clone())
             for name, m in model.named_modules() if type(m) is torch.nn.Linear}
    before = model_bytes(model)
    import gc
    import weakref

    originals = [weakref.ref(model.layers[0].o_proj), weakref.ref(model.layers[0].down)]
    runner = TorchModelRunner(model, num_blocks=8, block_size=4, eos_token_ids=frozenset())
    gc.collect()
    assert all(ref() is None for ref in originals), "a plain weight outlived its packed copy"
    packed = {name: m for name, m in model.named_modules() if isinstance(m, PackedLinear)}
    assert set(packed) == set(plain) and len(packed) == 4 * model.num_layers + 1
    assert model.pack_cpu_linears() == 0  # idempotent
    # the tied lm_head's packed copy is the only growth; everything else swapped plain for packed
    assert model_bytes(model) - before == model.vocab_size * model.embed.weight.shape[1] * 4
    gen = torch.Generator().manual_seed(0)
    for name, module in packed.items():
        weight, bias = plain[name]
        for rows in (1, 7, 32, 33):
            x = torch.randn(rows, weight.shape[1], generator=gen)
            ref = torch.nn.functional.linear(x, weight, bias)
            torch.testing.assert_close(module(x), ref, rtol=1e-5, atol=1e-5)
            residual = torch.randn(rows, weight.shape[0], generator=gen)
            assert torch.equal(module.forward_add(x, residual), residual + module(x))
    assert runner.execute(ScheduledBatch([ScheduledSequence(0, [5, 6, 7], 0, [0], True, GREEDY)]))


def test_quantized_model_keeps_its_tied_lm_head_plain(tmp_path) -> None:
    pytest.importorskip("bitsandbytes")
    from fleetserve_server.runner.loader import model_bytes
    from fleetserve_server.runner.model import PackedLinear

    path = make_tiny_llama(tmp_path / "q", architecture="llama")
    loaded = load_model(path, dtype="float32", device=torch.device("cpu"), quantization="int8", max_positions=64)
    before = model_bytes(loaded.model)
    TorchModelRunner(loaded.model, num_blocks=8, block_size=4, eos_token_ids=frozenset())
    assert type(loaded.model.lm_head) is torch.nn.Linear  # tied: packing it would add memory
    assert not any(isinstance(m, PackedLinear) for m in loaded.model.modules())
    assert model_bytes(loaded.model) == before


def test_output_statistics_are_the_sampled_tokens_logprob_and_the_distributions_entropy(tmp_path) -> None:
    """``last_token_stats`` per sampled row: the logprob the runner returns for ``logprobs`` requests
    and the entropy of the full raw distribution — for greedy and sampled rows in one batch, and for a
    row whose grammar-free logits were processed (penalties) before sampling."""
    runner = _runner(make_tiny_llama(tmp_path / "m"))
    prompts = _prompts(3, 100)
    params = [SamplingParams(max_tokens=4, temperature=0.0, logprobs=0),
              SamplingParams(max_tokens=4, temperature=0.9, seed=1, logprobs=0),
              SamplingParams(max_tokens=4, temperature=0.7, seed=2, logprobs=0, repetition_penalty=1.3)]
    seqs = [ScheduledSequence(i, p, 0, list(range(i * 16, (i + 1) * 16)), True, params[i])
            for i, p in enumerate(prompts)]
    result = runner.execute(ScheduledBatch(seqs))
    assert set(runner.last_token_stats) == {0, 1, 2}
    # the reference: the same step's raw logits, from a second runner over the same weights
    ref = _runner(make_tiny_llama(tmp_path / "m"))
    for i, seq in enumerate(seqs):
        logits = ref.model(*ref._tensors(ref._prepare(ScheduledBatch([seq]))[0]), ref.kv_cache)[-1].double()
        logp = torch.log_softmax(logits, dim=-1)
        logprob, entropy = runner.last_token_stats[i]
        assert logprob == pytest.approx(runner.last_logprobs[i].sampled.logprob, abs=1e-5)
        assert logprob == pytest.approx(logp[result[i]].item(), abs=1e-4)
        assert entropy == pytest.approx(-(logp.exp() * logp).sum().item(), abs=1e-4)
    runner.execute(ScheduledBatch([ScheduledSequence(0, prompts[0], 0, list(range(16)), False, params[0])]))
    assert runner.last_token_stats == {}  # a chunk that samples nothing leaves nothing behind
