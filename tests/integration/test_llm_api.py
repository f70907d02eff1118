"""The offline API end to end on real models: sampling, chat, bad input,
quantization (bitsandbytes on CPU) and planner/allocation agreement."""

from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")

from fleetserve_server import LLM, SamplingParams, memory  # noqa: E402
from fleetserve_server.runner.loader import model_bytes  # noqa: E402
from fleetserve_server.testing import make_tiny_llama  # noqa: E402

torch.set_num_threads(2)


@pytest.fixture(scope="module")
def tiny_llm(tmp_path_factory):  # type: ignore[no-untyped-def]
    path = make_tiny_llama(tmp_path_factory.mktemp("tiny") / "llama")
    return LLM(str(path), max_model_len=128, max_num_seqs=8, device="cpu")


def test_seeded_sampling_reproducible_and_independent_of_batch(tiny_llm: LLM) -> None:
    seeded = SamplingParams(max_tokens=16, temperature=0.9, top_p=0.9, top_k=40, seed=42)
    alone = tiny_llm.generate(["hello there"], seeded, use_tqdm=False)[0].outputs[0].token_ids
    again = tiny_llm.generate(["hello there"], seeded, use_tqdm=False)[0].outputs[0].token_ids
    crowd = ["a", "a longer prompt about nothing", "hello there", "xyz" * 9]
    params = [SamplingParams(max_tokens=16, temperature=1.0)] * 4
    params[2] = seeded
    batched = tiny_llm.generate(crowd, params, use_tqdm=False)[2].outputs[0].token_ids
    assert alone == again == batched
    other = tiny_llm.generate(["hello there"], SamplingParams(max_tokens=16, temperature=0.9, seed=43),
                              use_tqdm=False)[0].outputs[0].token_ids
    assert other != alone


def test_chat_applies_the_template(tiny_llm: LLM) -> None:
    out = tiny_llm.chat([{"role": "user", "content": "Hi"}], SamplingParams(max_tokens=3), use_tqdm=False)[0]
    tok = tiny_llm.get_tokenizer()
    assert tok.decode(out.prompt_token_ids) == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert len(out.outputs[0].token_ids) >= 1 and out.finished


@pytest.mark.parametrize(
    "prompt,params,field",
    [
        ("", SamplingParams(max_tokens=4), "prompt"),
        ([], SamplingParams(max_tokens=4), "prompt"),
        ("x" * 120, SamplingParams(max_tokens=20), "max_tokens"),
        ([1, 2, 100_000], SamplingParams(max_tokens=4), "prompt"),
    ],
)
def test_bad_request_raises_value_error_naming_field_and_engine_survives(tiny_llm: LLM, prompt, params, field) -> None:
    with pytest.raises(ValueError, match=field):
        tiny_llm.generate(["fine", prompt], params, use_tqdm=False)
    # nothing of the rejected batch was queued; the engine keeps serving
    assert not tiny_llm.engine.has_unfinished()
    assert tiny_llm.generate(["fine"], SamplingParams(max_tokens=2), use_tqdm=False)[0].finished


@pytest.mark.parametrize(
    "kwargs,field",
    [
        (dict(max_tokens=0), "max_tokens"),
        (dict(temperature=-0.1), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
    ],
)
def test_bad_sampling_params_name_the_field(kwargs, field) -> None:
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


def test_bad_engine_arguments_name_the_field(tmp_path) -> None:
    path = make_tiny_llama(tmp_path / "m")
    with pytest.raises(ValueError, match="quantization"):
        LLM(str(path), quantization="int3")
    with pytest.raises(ValueError, match="dtype"):
        LLM(str(path), dtype="float8")
    with pytest.raises(ValueError, match="max_model_len"):
        LLM(str(path), max_model_len=4096)  # above max_position_embeddings=2048
    with pytest.raises(ValueError, match="kv_cache_tokens"):
        LLM(str(path), max_model_len=128, kv_cache_tokens=64)
    with pytest.raises(FileNotFoundError, match="model"):
        LLM(str(tmp_path / "missing.gguf"))
    config = json.loads((path / "config.json").read_text())
    config["architectures"], config["model_type"] = ["GPT2LMHeadModel"], "gpt2"
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="not supported"):
        LLM(str(path))


@pytest.mark.slow
@pytest.mark.parametrize("quantization", ["none", "int8", "nf4"])
def test_builtin_quantized_answers_and_planner_matches_allocation(quantization: str) -> None:
    llm = LLM(quantization=quantization, max_model_len=256, max_num_seqs=4, device="cpu")
    loaded = llm.loaded
    text = llm.generate(["The capital of France is"], SamplingParams(max_tokens=8, temperature=0),
                        use_tqdm=False)[0].outputs[0].text
    assert "Paris" in text
    plan = loaded.memory_plan
    actual = model_bytes(loaded.runner.model)
    assert actual == loaded.weights_bytes
    assert abs(plan.weights_bytes - actual) <= 0.05 * actual, (plan.weights_bytes, actual)
    unquantized = memory.weight_bytes(memory.known_architecture("builtin:smollm2-135m-instruct"), "none",
                                      "float32", "cpu")
    if quantization != "none":
        assert actual < 0.5 * unquantized
    # KV: what the plan says is exactly what the runner allocated and the engine manages
    assert loaded.kv_cache_bytes == plan.kv_capacity_tokens * plan.kv_bytes_per_token
    assert llm.engine.stats().kv_capacity_tokens == plan.kv_capacity_tokens
