"""A client that goes away mid-request has its request aborted in the engine (KV blocks freed)."""

from __future__ import annotations

import asyncio
import json

import pytest
from api_fakes import MODEL, FakeEngine, FakeTokenizer
from fleetserve_server.api.app import create_app

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def call_then_disconnect(app, body: dict, after_s: float) -> list[dict]:  # type: ignore[no-untyped-def]
    """Drive the ASGI app by hand: send the body, then report http.disconnect after ``after_s``."""
    sent: list[dict] = []
    body_sent = False

    async def receive() -> dict:
        nonlocal body_sent
        if not body_sent:
            body_sent = True
            return {"type": "http.request", "body": json.dumps(body).encode(), "more_body": False}
        await asyncio.sleep(after_s)
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.4"}, "http_version": "1.1",
             "method": "POST", "scheme": "http", "path": "/v1/completions", "raw_path": b"/v1/completions",
             "query_string": b"", "root_path": "", "headers": [(b"content-type", b"application/json")],
             "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80)}
    await asyncio.wait_for(app(scope, receive, send), timeout=10)
    return sent


@pytest.mark.parametrize("stream", [False, True])
async def test_disconnect_aborts_and_frees_blocks(stream: bool) -> None:
    engine = FakeEngine(step_s=0.01)
    app = create_app(engine, served_name="fake-model", tokenizer=FakeTokenizer(), model=MODEL)
    body = {"model": "fake-model", "prompt": "hello", "max_tokens": 200, "stream": stream}
    await call_then_disconnect(app, body, after_s=0.1)
    assert len(engine.abort_calls) >= 1
    assert engine.blocks_used == {}
    assert app.state.fleetserve.state.inflight == set()
    stats = engine.stats()
    assert stats.kv_blocks_free == stats.kv_blocks_total
    # It stopped early: far fewer than 200 tokens were generated.
    assert engine.generation_tokens < 100
    metrics = app.state.fleetserve.metrics.render().decode()
    assert 'fleetserve_requests_total{finish_reason="abort",model="fake-model"} 1.0' in metrics
