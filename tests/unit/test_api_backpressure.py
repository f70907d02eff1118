"""Back-pressure at the HTTP layer against a fake engine: the body limit (413), SSE comments for
queued streams, engine failures of one request, and the default waiting-queue bound."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from api_fakes import MODEL, FakeEngine, FakeTokenizer
from fleetserve_server.api.app import create_app, default_max_request_bytes
from fleetserve_server.engine.config import EngineConfig, default_max_queue_length
from fleetserve_server.engine.errors import RequestFailedError
from fleetserve_server.engine.interfaces import RequestOutputDelta
from fleetserve_server.engine.sampling_params import SamplingParams

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def make_app(engine: Any = None, **kwargs: Any):  # type: ignore[no-untyped-def]
    return create_app(engine or FakeEngine(), served_name=MODEL.served_name, tokenizer=FakeTokenizer(),
                      model=MODEL, **kwargs)


def client(app) -> httpx.AsyncClient:  # type: ignore[no-untyped-def]
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")


def completion(prompt: str = "hi", **extra: Any) -> dict[str, Any]:
    return {"model": "fake-model", "prompt": prompt, "max_tokens": 5, "temperature": 0, **extra}


def rejected_invalid(app) -> float:  # type: ignore[no-untyped-def]
    text = app.state.fleetserve.metrics.render().decode()
    line = next(x for x in text.splitlines()
                if x.startswith("fleetserve_requests_rejected_total{") and 'reason="invalid"' in x)
    return float(line.rsplit(" ", 1)[1])


async def test_body_over_the_limit_is_413_from_content_length() -> None:
    app = make_app(max_request_bytes=1000)
    async with client(app) as c:
        ok = await c.post("/v1/completions", json=completion("x" * 200))
        big = await c.post("/v1/completions", json=completion("x" * 2000))
    assert ok.status_code == 200, ok.text
    assert big.status_code == 413
    error = big.json()["error"]
    assert error["type"] == "invalid_request_error" and error["code"] == "request_too_large"
    assert "1000 bytes" in error["message"] and "--max-request-bytes" in error["message"]
    assert "x-request-id" in big.headers
    assert rejected_invalid(app) == 1


async def test_chunked_body_over_the_limit_is_413_while_reading() -> None:
    app = make_app(max_request_bytes=1000)
    payload = json.dumps(completion("x" * 5000)).encode()
    read = 0

    async def chunks() -> AsyncIterator[bytes]:  # no Content-Length
        nonlocal read
        for i in range(0, len(payload), 100):
            read += 100
            yield payload[i : i + 100]

    async with client(app) as c:
        r = await c.post("/v1/completions", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413, r.text
    assert r.json()["error"]["code"] == "request_too_large"


async def test_no_limit_when_none_is_configured() -> None:
    async with client(make_app()) as c:
        r = await c.post("/v1/completions", json=completion("x" * 200_000))
    assert r.status_code != 413


def test_default_body_limit_follows_max_model_len() -> None:
    assert default_max_request_bytes(2048) == (1 << 20) + 32 * 2048
    # a max_model_len prompt of token ids ("12345, " each) fits, whatever the context length
    for n in (512, 2048, 131_072):
        assert len(json.dumps({"prompt": [49_151] * n})) < default_max_request_bytes(n)


def test_default_queue_bound_follows_the_kv_capacity() -> None:
    small = EngineConfig(max_model_len=2048, num_blocks=2048, block_size=16, max_num_seqs=32)
    assert default_max_queue_length(small) == 64  # 4 x 32768 / 2048
    tiny_cache = EngineConfig(max_model_len=512, num_blocks=32, block_size=16, max_num_seqs=4)
    assert default_max_queue_length(tiny_cache) == 4  # never below max_num_seqs


async def test_queued_stream_gets_a_comment_at_once_then_keep_alives() -> None:
    engine = FakeEngine(step_s=0.01, max_num_seqs=1)
    app = make_app(engine, first_output_grace=0.02, sse_keepalive_seconds=0.05)
    async with client(app) as c:
        busy = asyncio.create_task(c.post("/v1/completions", json=completion(max_tokens=40)))
        while not engine.blocks_used:
            await asyncio.sleep(0.005)
        lines: list[str] = []
        async with c.stream("POST", "/v1/completions", json=completion(stream=True)) as r:
            assert r.status_code == 200
            async for line in r.aiter_lines():
                lines.append(line)
        assert (await busy).status_code == 200
    assert lines[0] == ": queued"
    keep_alives = [x for x in lines if x == ": keep-alive"]
    assert len(keep_alives) >= 2, lines[:10]  # ~0.4 s queued, one comment every 0.05 s
    data = [x for x in lines if x.startswith("data: ")]
    assert data[-1] == "data: [DONE]"
    first_data = lines.index(data[0])
    assert all(x.startswith(":") or not x for x in lines[:first_data])  # comments only before the tokens
    assert "".join(json.loads(x[6:])["choices"][0]["text"] for x in data[:-1]) != ""


async def test_stream_answered_at_once_sends_no_comment() -> None:
    async with client(make_app(first_output_grace=1.0)) as c:
        r = await c.post("/v1/completions", json=completion(stream=True))
    assert not r.text.startswith(":"), r.text[:50]


class FailingEngine(FakeEngine):
    """Fails requests whose seed is 666 the way AsyncEngine does: RequestFailedError, after ``after``
    tokens, with ``param`` when the request's own input caused it."""

    def __init__(self, *, after: int, param: str | None, **kw: Any) -> None:
        super().__init__(**kw)
        self.after = after
        self.param = param

    async def generate(self, request_id: str, prompt: str | list[int],
                       params: SamplingParams) -> AsyncIterator[RequestOutputDelta]:
        n = 0
        async for delta in super().generate(request_id, prompt, params):
            if params.seed == 666 and n == self.after:
                raise RequestFailedError("seed 666 is cursed", param=self.param)
            n += 1
            yield delta


@pytest.mark.parametrize("param, status", [("seed", 400), (None, 500)])
async def test_request_failed_in_the_engine_before_any_output(param: str | None, status: int) -> None:
    app = make_app(FailingEngine(after=0, param=param))
    async with client(app) as c:
        bad = await c.post("/v1/completions", json=completion(seed=666, temperature=1))
        good = await c.post("/v1/completions", json=completion())
        bad_stream = await c.post("/v1/completions", json=completion(seed=666, temperature=1, stream=True))
    assert bad.status_code == status and bad.json()["error"]["param"] == param
    assert "cursed" in bad.json()["error"]["message"]
    assert good.status_code == 200
    assert bad_stream.status_code == status  # found before the stream started: a plain error response
    assert app.state.fleetserve.state.inflight == set()


async def test_request_failed_mid_stream_ends_with_an_error_event() -> None:
    app = make_app(FailingEngine(after=2, param=None))
    async with client(app) as c:
        r = await c.post("/v1/completions", json=completion(seed=666, temperature=1, stream=True))
    assert r.status_code == 200
    events = [x[6:] for x in r.text.split("\n") if x.startswith("data: ")]
    assert events[-1] == "[DONE]"
    assert json.loads(events[-2])["error"]["code"] == "internal_error"
    assert sum(1 for e in events[:-2] if json.loads(e).get("choices")) == 2
    metrics = app.state.fleetserve.metrics.render().decode()
    assert 'fleetserve_requests_total{finish_reason="error",model="fake-model"} 1.0' in metrics
