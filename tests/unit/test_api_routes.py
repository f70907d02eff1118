"""HTTP routes against a fake engine: shapes, streaming, errors, auth, request ids, lifecycle."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import pytest
from api_fakes import GREEDY_TEXT, MODEL, FakeEngine, FakeTokenizer
from fleetserve_server.api.app import create_app
from fleetserve_server.api.state import Phase

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def make_app(engine: FakeEngine | None = None, **kwargs: Any):  # type: ignore[no-untyped-def]
    return create_app(engine or FakeEngine(), served_name=MODEL.served_name, tokenizer=FakeTokenizer(),
                      model=MODEL, **kwargs)


def client(app) -> httpx.AsyncClient:  # type: ignore[no-untyped-def]
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")


def chat_body(**extra: Any) -> dict[str, Any]:
    return {"model": "fake-model", "messages": [{"role": "user", "content": "hi"}], "temperature": 0,
            "max_tokens": 10, **extra}


def sse_payloads(text: str) -> list[Any]:
    events = [line[len("data: "):] for line in text.split("\n") if line.startswith("data: ")]
    assert events[-1] == "[DONE]", events[-3:]
    return [json.loads(e) for e in events[:-1]]


async def test_chat_completion_shape_usage_and_fingerprint() -> None:
    async with client(make_app()) as c:
        r = await c.post("/v1/chat/completions", json=chat_body())
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"] == {"role": "assistant", "content": GREEDY_TEXT[:10]}
    assert body["choices"][0]["finish_reason"] == "length"
    prompt_len = len("<user>hi\n<assistant>")
    assert body["usage"]["prompt_tokens"] == prompt_len
    assert body["usage"]["completion_tokens"] == 10
    assert body["usage"]["total_tokens"] == prompt_len + 10
    assert body["system_fingerprint"] == MODEL.fingerprint
    assert "fake-model" in body["system_fingerprint"] and "/none/" in body["system_fingerprint"]


async def test_streamed_chunks_concatenate_to_the_non_streamed_text() -> None:
    async with client(make_app()) as c:
        plain = (await c.post("/v1/completions", json={"model": "fake-model", "prompt": "abc",
                                                        "max_tokens": 20, "temperature": 0})).json()
        r = await c.post("/v1/completions", json={"model": "fake-model", "prompt": "abc", "max_tokens": 20,
                                                   "temperature": 0, "stream": True,
                                                   "stream_options": {"include_usage": True}})
        chat = await c.post("/v1/chat/completions", json=chat_body(stream=True))
    assert r.headers["content-type"].startswith("text/event-stream")
    chunks = sse_payloads(r.text)
    text = "".join(ch["text"] for chunk in chunks for ch in chunk["choices"])
    assert text == plain["choices"][0]["text"] == GREEDY_TEXT[:20]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 20
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    chat_chunks = sse_payloads(chat.text)
    assert chat_chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chat_chunks) == GREEDY_TEXT[:10]
    assert all(c["usage"] is None for c in chat_chunks)  # no include_usage: no usage chunk


async def test_stop_strings_and_seed_reproducibility() -> None:
    async with client(make_app()) as c:
        stopped = (await c.post("/v1/completions", json={"model": "fake-model", "prompt": "x", "max_tokens": 30,
                                                          "temperature": 0, "stop": ["brown"]})).json()
        seeded = [(await c.post("/v1/completions", json={"model": "fake-model", "prompt": "x", "max_tokens": 12,
                                                          "temperature": 1.0, "seed": s})).json()
                  for s in (7, 7, 8)]
    assert stopped["choices"][0]["text"] == "the quick "
    assert stopped["choices"][0]["finish_reason"] == "stop"
    texts = [s["choices"][0]["text"] for s in seeded]
    assert texts[0] == texts[1] != texts[2]


@pytest.mark.parametrize("body, param, status", [
    (chat_body(n=17), "n", 400),
    (chat_body(model="other"), "model", 400),
    (chat_body(temperature=-1), "temperature", 400),
    (chat_body(top_p=0), "top_p", 400),
    (chat_body(max_tokens=0), "max_tokens", 400),
    (chat_body(max_tokens=10_000), "max_tokens", 400),
    (chat_body(logprobs=True, top_logprobs=21), "top_logprobs", 400),
    (chat_body(presence_penalty=2.5), "presence_penalty", 400),
    (chat_body(messages=[]), "messages", 400),
    (chat_body(messages=[{"role": "wizard", "content": "x"}]), "messages.0.role", 400),
    (chat_body(stop=[""]), "stop", 400),
])
async def test_invalid_input_is_a_400_in_openai_shape(body: dict[str, Any], param: str, status: int) -> None:
    async with client(make_app()) as c:
        r = await c.post("/v1/chat/completions", json=body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param, error


async def test_over_long_prompt_names_both_numbers() -> None:
    async with client(make_app()) as c:
        r = await c.post("/v1/completions", json={"model": "fake-model", "prompt": "y" * 200, "max_tokens": 100})
        too_long = await c.post("/v1/completions", json={"model": "fake-model", "prompt": "y" * 300})
        bad_json = await c.post("/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
    error = r.json()["error"]
    assert r.status_code == 400 and error["param"] == "max_tokens" and error["code"] == "context_length_exceeded"
    assert "256" in error["message"] and "300" in error["message"] and "200 in the prompt" in error["message"]
    assert too_long.status_code == 400 and too_long.json()["error"]["param"] == "prompt"
    assert bad_json.status_code == 400 and "error" in bad_json.json()


async def test_engine_validation_error_maps_to_400_with_its_param() -> None:
    async with client(make_app()) as c:
        r = await c.post("/v1/completions", json={"model": "fake-model", "prompt": [5, 0, 6], "max_tokens": 2})
        vocab = await c.post("/v1/completions", json={"model": "fake-model", "prompt": [5, 999], "max_tokens": 2})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
    assert vocab.status_code == 400 and "999" in vocab.json()["error"]["message"]


async def test_api_key_guards_v1_but_not_probes() -> None:
    app = make_app(api_key="s3cret")
    async with client(app) as c:
        missing = await c.get("/v1/models")
        wrong = await c.get("/v1/models", headers={"Authorization": "Bearer nope"})
        ok = await c.get("/v1/models", headers={"Authorization": "Bearer s3cret"})
        probes = [await c.get(p) for p in ("/health", "/ready", "/metrics")]
    assert missing.status_code == wrong.status_code == 401
    assert missing.json()["error"]["type"] == "authentication_error"
    assert missing.headers["x-request-id"]
    assert ok.status_code == 200 and ok.json()["data"][0]["id"] == "fake-model"
    assert [p.status_code for p in probes] == [200, 200, 200]


async def test_request_id_is_echoed_or_minted() -> None:
    async with client(make_app()) as c:
        echoed = await c.get("/v1/models", headers={"X-Request-Id": "trace-123"})
        minted = await c.post("/v1/chat/completions", json=chat_body(n=3))
    assert echoed.headers["x-request-id"] == "trace-123"
    assert len(minted.headers["x-request-id"]) >= 16


async def test_queue_full_is_429_with_retry_after() -> None:
    engine = FakeEngine(step_s=0.02, max_num_seqs=1, max_queue_length=1)
    app = make_app(engine)
    async with client(app) as c:
        body = {"model": "fake-model", "prompt": "q", "max_tokens": 20, "temperature": 0}
        first = asyncio.create_task(c.post("/v1/completions", json=body))   # runs
        await asyncio.sleep(0.05)
        second = asyncio.create_task(c.post("/v1/completions", json=body))  # waits
        await asyncio.sleep(0.05)
        third = await c.post("/v1/completions", json=body)                   # refused
        results = [await first, await second]
    assert third.status_code == 429, third.text
    assert third.headers["retry-after"] == "3"
    assert third.json()["error"]["type"] == "rate_limit_error"
    assert [r.status_code for r in results] == [200, 200]


async def test_loading_then_ready_then_draining() -> None:
    app = create_app(None, served_name="fake-model")
    state = app.state.fleetserve.state
    engine = FakeEngine(step_s=0.01)
    async with client(app) as c:
        assert (await c.get("/ready")).status_code == 503
        assert (await c.get("/health")).status_code == 200
        loading = await c.post("/v1/chat/completions", json=chat_body())
        assert loading.status_code == 503 and loading.json()["error"]["code"] == "loading"
        state.attach(engine, FakeTokenizer(), MODEL)
        state.mark_ready()
        assert (await c.get("/ready")).status_code == 200
        inflight = asyncio.create_task(c.post("/v1/chat/completions", json=chat_body(max_tokens=30)))
        await asyncio.sleep(0.05)
        drain = asyncio.create_task(state.drain(timeout=10))
        await asyncio.sleep(0.01)
        assert state.phase is Phase.DRAINING
        assert (await c.get("/ready")).status_code == 503
        refused = await c.post("/v1/chat/completions", json=chat_body())
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "draining"
        done = await inflight
        assert await drain == []
    assert done.status_code == 200 and done.json()["choices"][0]["finish_reason"] == "length"


async def test_drain_timeout_aborts_in_flight_requests() -> None:
    app = make_app(FakeEngine(step_s=0.05))
    state = app.state.fleetserve.state
    async with client(app) as c:
        inflight = asyncio.create_task(c.post("/v1/completions", json={"model": "fake-model", "prompt": "z",
                                                                        "max_tokens": 200}))
        await asyncio.sleep(0.1)
        aborted = await state.drain(timeout=0.2)
        r = await inflight
    assert len(aborted) == 1
    # "abort" is not an OpenAI finish reason: the client is told the server stopped its request
    assert r.status_code == 503 and r.json()["error"]["code"] == "aborted"


async def test_dead_engine_fails_health() -> None:
    engine = FakeEngine()
    async with client(make_app(engine)) as c:
        engine.dead = True
        assert (await c.get("/health")).status_code == 503
        assert (await c.get("/ready")).status_code == 503


async def test_model_sampling_defaults_apply_when_the_request_omits_them() -> None:
    import dataclasses

    greedy_model = dataclasses.replace(MODEL, default_sampling={"temperature": 0.0})
    app = create_app(FakeEngine(), served_name="fake-model", tokenizer=FakeTokenizer(), model=greedy_model)
    async with client(app) as c:
        omitted = (await c.post("/v1/completions", json={"model": "fake-model", "prompt": "x",
                                                          "max_tokens": 9})).json()
        explicit = (await c.post("/v1/completions", json={"model": "fake-model", "prompt": "x", "max_tokens": 9,
                                                           "temperature": 1.0, "seed": 3})).json()
    assert omitted["choices"][0]["text"] == GREEDY_TEXT[:9]
    assert explicit["choices"][0]["text"] != GREEDY_TEXT[:9]
    assert omitted["system_fingerprint"] != MODEL.fingerprint  # defaults are part of the configuration


def test_sampling_defaults_from_generation_config(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from fleetserve_server.api.server import sampling_defaults
    from fleetserve_server.runner.builtin import BUILTIN_MODELS, write_sampling_defaults

    (tmp_path / "generation_config.json").write_text(json.dumps({"temperature": 0.6, "top_p": 0.95,
                                                                 "top_k": 20, "eos_token_id": 2}))
    assert sampling_defaults(str(tmp_path)) == {"temperature": 0.6, "top_p": 0.95, "top_k": 20}
    assert sampling_defaults(None) == {}
    (tmp_path / "generation_config.json").write_text(json.dumps({"do_sample": False, "temperature": 0.6}))
    assert sampling_defaults(str(tmp_path)) == {}
    # what the builtin conversion writes is what the server reads back (SmolLM2's card: 0.2 / 0.9)
    write_sampling_defaults(tmp_path, BUILTIN_MODELS["smollm2-135m-instruct"].sampling)
    assert json.loads((tmp_path / "generation_config.json").read_text())["do_sample"] is True
    assert sampling_defaults(str(tmp_path)) == {"temperature": 0.2, "top_p": 0.9}
