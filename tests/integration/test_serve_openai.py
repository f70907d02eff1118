"""The official openai SDK (sync and async) against a real `fleetserve serve` on a tiny model."""

from __future__ import annotations

import asyncio
from pathlib import Path

import openai
import pytest
from fleetserve_server.bench.launch import ServerProcess
from serve_util import MODEL, server, tiny_model  # noqa: F401 - fixtures

MESSAGES = [{"role": "system", "content": "You are terse."},
            {"role": "user", "content": "What is the capital of France?"}]


def sync_client(proc: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=proc.base_url + "/v1", api_key="unused", max_retries=0, timeout=120)


def async_client(proc: ServerProcess) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=proc.base_url + "/v1", api_key="unused", max_retries=0, timeout=300)


def expected_prompt_tokens(model_dir: Path, messages: list[dict[str, str]]) -> int:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return len(tok.encode(text, add_special_tokens=False))


def test_models_lists_the_served_model(server: ServerProcess) -> None:  # noqa: F811
    models = sync_client(server).models.list()
    assert [m.id for m in models.data] == [MODEL]


def test_chat_completion_usage_and_fingerprint(server: ServerProcess, tiny_model: Path) -> None:  # noqa: F811
    client = sync_client(server)
    r = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=12, temperature=0)
    choice = r.choices[0]
    assert isinstance(choice.message.content, str) and choice.message.role == "assistant"
    assert r.usage is not None
    assert r.usage.prompt_tokens == expected_prompt_tokens(tiny_model, MESSAGES)
    if choice.finish_reason == "length":
        assert r.usage.completion_tokens == 12
    else:
        assert choice.finish_reason == "stop" and r.usage.completion_tokens < 12
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert r.system_fingerprint and MODEL in r.system_fingerprint and "/none/" in r.system_fingerprint
    # max_completion_tokens (newer SDKs) means the same as max_tokens
    r2 = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_completion_tokens=12, temperature=0)
    assert r2.choices[0].message.content == choice.message.content


def test_streaming_concatenates_to_the_greedy_text(server: ServerProcess) -> None:  # noqa: F811
    client = sync_client(server)
    plain = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=24, temperature=0,
                                      extra_body={"ignore_eos": True})
    stream = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=24, temperature=0,
                                       stream=True, stream_options={"include_usage": True},
                                       extra_body={"ignore_eos": True})
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == plain.choices[0].text
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 24
    assert chunks[-1].usage.prompt_tokens == plain.usage.prompt_tokens  # type: ignore[union-attr]

    chat_plain = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=16, temperature=0)
    chat_chunks = list(client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=16,
                                                      temperature=0, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chat_chunks if c.choices) == \
        chat_plain.choices[0].message.content
    assert chat_chunks[-1].choices[0].finish_reason == chat_plain.choices[0].finish_reason
    assert all(c.usage is None for c in chat_chunks)


def test_stop_string_cuts_the_output(server: ServerProcess) -> None:  # noqa: F811
    client = sync_client(server)
    full = client.completions.create(model=MODEL, prompt="abc", max_tokens=30, temperature=0,
                                     extra_body={"ignore_eos": True}).choices[0].text
    printable = [i for i in range(4, len(full) - 2) if full[i:i + 2].isprintable() and full[i:i + 2].strip()]
    assert printable, f"no usable stop string in {full!r}"
    stop = full[printable[0]:printable[0] + 2]
    r = client.completions.create(model=MODEL, prompt="abc", max_tokens=30, temperature=0, stop=[stop],
                                  extra_body={"ignore_eos": True})
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].text == full[:full.index(stop)]


def test_seed_makes_sampling_reproducible(server: ServerProcess) -> None:  # noqa: F811
    async def sample(seed: int) -> str:
        async with async_client(server) as client:
            r = await client.completions.create(model=MODEL, prompt="seed test", max_tokens=16, temperature=1.0,
                                                seed=seed, extra_body={"ignore_eos": True})
            return r.choices[0].text

    async def main() -> list[str]:
        return list(await asyncio.gather(sample(1234), sample(1234), sample(4321)))

    a, b, c = asyncio.run(main())
    assert a == b
    assert a != c


def test_32_concurrent_streaming_clients_all_complete(server: ServerProcess) -> None:  # noqa: F811
    async def one(client: openai.AsyncOpenAI, i: int) -> tuple[str, str | None, int]:
        stream = await client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": f"client {i}: tell me a story"}], max_tokens=20,
            temperature=0, stream=True, stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
        text, finish, tokens = [], None, 0
        async for chunk in stream:
            if chunk.choices:
                text.append(chunk.choices[0].delta.content or "")
                finish = chunk.choices[0].finish_reason or finish
            if chunk.usage:
                tokens = chunk.usage.completion_tokens
        return "".join(text), finish, tokens

    async def main() -> list[tuple[str, str | None, int]]:
        async with async_client(server) as client:
            return list(await asyncio.gather(*(one(client, i) for i in range(32))))

    results = asyncio.run(main())
    assert len(results) == 32
    assert all(finish == "length" and tokens == 20 for _, finish, tokens in results), results


def test_over_long_prompt_is_a_bad_request_in_openai_shape(server: ServerProcess) -> None:  # noqa: F811
    client = sync_client(server)
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=MODEL, prompt="x" * 1500, max_tokens=1000)
    err = info.value
    assert err.status_code == 400
    assert err.code == "context_length_exceeded" and err.param == "max_tokens"
    assert "2048" in err.message and "2500" in err.message
    with pytest.raises(openai.BadRequestError) as info2:
        client.chat.completions.create(model=MODEL, messages=MESSAGES, n=17)  # 1..16 are served
    assert info2.value.param == "n"
    with pytest.raises(openai.BadRequestError) as info3:
        client.chat.completions.create(model="gpt-4", messages=MESSAGES)
    assert info3.value.param == "model" and MODEL in info3.value.message


def test_request_id_is_echoed(server: ServerProcess) -> None:  # noqa: F811
    raw = sync_client(server).chat.completions.with_raw_response.create(
        model=MODEL, messages=MESSAGES, max_tokens=2, extra_headers={"X-Request-Id": "trace-abc-1"})
    assert raw.headers["x-request-id"] == "trace-abc-1"
    assert raw.parse().choices[0].message is not None
