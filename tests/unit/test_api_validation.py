"""Every sampling field is bounded at the protocol (a 400 naming the field) and again in SamplingParams.

Requests go through the real FastAPI app (against the fake engine: a 400 means
the engine never saw the request); SamplingParams is checked on its own too,
since the offline API and the engine build it without the HTTP layer.
"""

from __future__ import annotations

import json
import math
from typing import Any

import httpx
import pytest
from api_fakes import MODEL, FakeEngine, FakeTokenizer
from fleetserve_server.api.app import create_app
from fleetserve_server.api.protocol import HARMLESS_FIELDS
from fleetserve_server.engine.sampling_params import SamplingParams

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class RecordingEngine(FakeEngine):
    """The fake engine, remembering the SamplingParams each request reached it with."""

    def __init__(self) -> None:
        super().__init__()
        self.params: list[SamplingParams] = []

    def generate(self, request_id, prompt, params):  # type: ignore[no-untyped-def]
        self.params.append(params)
        return super().generate(request_id, prompt, params)


def app_with(engine: FakeEngine | None = None):  # type: ignore[no-untyped-def]
    return create_app(engine or FakeEngine(), served_name=MODEL.served_name, tokenizer=FakeTokenizer(), model=MODEL)


def client(app) -> httpx.AsyncClient:  # type: ignore[no-untyped-def]
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")


def chat(**extra: Any) -> dict[str, Any]:
    return {"model": "fake-model", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, **extra}


def completion(**extra: Any) -> dict[str, Any]:
    return {"model": "fake-model", "prompt": "hi", "max_tokens": 4, **extra}


OUT_OF_RANGE: list[tuple[str, Any]] = [
    ("seed", 2**64),  # torch.Generator.manual_seed raised inside the engine thread on this one
    ("seed", 2**63),
    ("seed", -1),
    ("top_k", -2),
    ("top_k", 2**40),
    ("top_p", 0),
    ("top_p", 1.5),
    ("top_p", -0.1),
    ("temperature", -0.5),
    ("temperature", 1e300 * 10),  # inf after JSON parsing
    ("max_tokens", 0),
    ("max_tokens", -3),
    ("min_p", 1.5),
    ("min_p", -0.1),
    ("presence_penalty", 2.5),
    ("frequency_penalty", -2.5),
    ("repetition_penalty", 0),
    ("repetition_penalty", -1),
    ("min_tokens", -1),
    ("n", 0),
    ("n", 10_000),
    ("stop", ["x"] * 10_000),
    ("stop", [""]),
    ("stop", "y" * 100_000),
    ("stop_token_ids", [-1]),
    ("stop_token_ids", list(range(10_000))),
    ("logit_bias", {"5": 101}),
    ("logit_bias", {"five": 1}),
    ("logit_bias", {"-5": 1}),
    ("logit_bias", {"5": math.nan}),
]


@pytest.mark.parametrize("route, body", [("/v1/chat/completions", chat), ("/v1/completions", completion)])
@pytest.mark.parametrize("field, value", OUT_OF_RANGE)
async def test_out_of_range_sampling_field_is_a_400_naming_it(route: str, body: Any, field: str, value: Any) -> None:
    engine = RecordingEngine()
    async with client(app_with(engine)) as c:
        # json.dumps writes NaN / Infinity literals, as some clients do (httpx's encoder refuses them)
        r = await c.post(route, content=json.dumps(body(**{field: value})),
                         headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == field, error
    assert field in error["message"]
    assert engine.params == []  # refused before the engine


@pytest.mark.parametrize("raw", [b'"temperature": NaN', b'"top_p": Infinity', b'"temperature": -Infinity'])
async def test_non_finite_numbers_are_a_400(raw: bytes) -> None:
    body = b'{"model": "fake-model", "prompt": "hi", "max_tokens": 2, ' + raw + b"}"
    async with client(app_with()) as c:
        r = await c.post("/v1/completions", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == raw.split(b'"')[1].decode()


@pytest.mark.parametrize("route, body, field", [
    ("/v1/chat/completions", chat, "logprobs_mode"),
    ("/v1/completions", completion, "best_of_n"),
    ("/v1/completions", completion, "guided_json"),
    ("/v1/chat/completions", chat, "functions"),
])
async def test_unknown_field_is_a_400_naming_it(route: str, body: Any, field: str) -> None:
    async with client(app_with()) as c:
        r = await c.post(route, json=body(**{field: 1}))
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == field and "not a parameter fleetserve supports" in error["message"]


@pytest.mark.parametrize("field", sorted(HARMLESS_FIELDS))
async def test_harmless_bookkeeping_fields_are_accepted(field: str) -> None:
    value: Any = {"user": "u1", "metadata": {"k": "v"}, "store": False, "service_tier": "auto",
                  "prompt_cache_key": "k", "safety_identifier": "s", "parallel_tool_calls": False}[field]
    async with client(app_with()) as c:
        r = await c.post("/v1/chat/completions", json=chat(**{field: value, "temperature": 0}))
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("route, body, field, value", [
    ("/v1/chat/completions", chat, "tools", [{"type": "function", "function": {"name": "f"}}]),
    ("/v1/chat/completions", chat, "tool_choice", "auto"),
    ("/v1/completions", completion, "suffix", "end"),
])
async def test_known_but_unsupported_field_is_a_400_naming_it(route: str, body: Any, field: str, value: Any) -> None:
    async with client(app_with()) as c:
        r = await c.post(route, json=body(**{field: value}))
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == field


async def test_in_range_fields_reach_the_engine_as_sampling_params() -> None:
    engine = RecordingEngine()
    async with client(app_with(engine)) as c:
        r = await c.post("/v1/completions", json=completion(
            seed=2**63 - 1, top_k=-1, top_p=1, temperature=0.7, min_p=0.05, presence_penalty=0.5,
            frequency_penalty=-0.5, repetition_penalty=1.3, logit_bias={"65": -100, "66": 5.5},
            stop_token_ids=[10, 11], min_tokens=2, stop=["zz"]))
    assert r.status_code == 200, r.text
    (p,) = engine.params
    assert p.seed == 2**63 - 1 and p.top_k == 0 and p.top_p == 1.0 and p.temperature == 0.7
    assert p.min_p == 0.05 and p.presence_penalty == 0.5 and p.frequency_penalty == -0.5
    assert p.repetition_penalty == 1.3 and dict(p.logit_bias) == {65: -100.0, 66: 5.5}
    assert p.stop_token_ids == (10, 11) and p.min_tokens == 2 and p.stop == ("zz",)


async def test_token_ids_outside_the_vocabulary_are_a_400() -> None:
    async with client(app_with()) as c:
        bias = await c.post("/v1/completions", json=completion(logit_bias={"256": 1}))
        stop = await c.post("/v1/completions", json=completion(stop_token_ids=[999]))
    assert bias.status_code == 400 and bias.json()["error"]["param"] == "logit_bias"
    assert stop.status_code == 400 and stop.json()["error"]["param"] == "stop_token_ids"


async def test_finish_reason_is_only_ever_an_openai_value() -> None:
    """An aborted request (a drain that ran out of time) is an error, never finish_reason "abort"."""
    import asyncio

    app = app_with(FakeEngine(step_s=0.05))
    state = app.state.fleetserve.state
    async with client(app) as c:
        plain = asyncio.create_task(c.post("/v1/completions", json=completion(max_tokens=200)))
        streamed = asyncio.create_task(c.post("/v1/completions", json=completion(max_tokens=200, stream=True)))
        deadline = asyncio.get_running_loop().time() + 30
        while len(state.inflight) < 2:  # both admitted (a fixed sleep raced the handlers on a busy machine)
            assert asyncio.get_running_loop().time() < deadline, "the two requests were never in flight"
            await asyncio.sleep(0.01)
        await state.drain(timeout=0.1)
        r, s = await plain, await streamed
    assert r.status_code == 503 and r.json()["error"]["code"] == "aborted", r.text
    assert '"finish_reason":"abort"' not in s.text and '"code":"aborted"' in s.text, s.text


@pytest.mark.parametrize("kwargs, field", [
    ({"seed": 2**64}, "seed"), ({"seed": -1}, "seed"), ({"top_k": -2}, "top_k"),
    ({"temperature": math.inf}, "temperature"), ({"temperature": math.nan}, "temperature"),
    ({"top_p": math.nan}, "top_p"), ({"min_p": 2.0}, "min_p"), ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": 2.5}, "max_tokens"), ({"presence_penalty": 3.0}, "presence_penalty"),
    ({"repetition_penalty": 0.0}, "repetition_penalty"), ({"logprobs": 21}, "logprobs"),
    ({"prompt_logprobs": -1}, "prompt_logprobs"), ({"stop": ("x",) * 17}, "stop"),
    ({"stop_token_ids": (-1,)}, "stop_token_ids"), ({"logit_bias": {1: 1000.0}}, "logit_bias"),
    ({"min_tokens": 5, "max_tokens": 4}, "min_tokens"), ({"seed": True}, "seed"),
])
def test_sampling_params_rejects_out_of_range_values(kwargs: dict[str, Any], field: str) -> None:
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


def test_sampling_params_normalizes_spellings() -> None:
    p = SamplingParams(top_k=-1, logit_bias={3: 1.5}, stop="x", stop_token_ids=[4], temperature=1e-9)
    assert p.top_k == 0 and p.logit_bias == ((3, 1.5),) and p.stop == ("x",) and p.stop_token_ids == (4,)
    assert p.greedy  # a temperature that would overflow logits / T is greedy
