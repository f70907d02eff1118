"""Tracing's settings and span shape on the HTTP layer with a fake engine (the export to a real collector
is tests/integration/test_serve_tracing.py): which endpoint the flag and the OTEL_* variables select,
nothing added when off, one generate span per choice under the request's span."""

from __future__ import annotations

import re
from typing import Any

import httpx
import pytest
from api_fakes import MODEL, FakeEngine, FakeTokenizer
from fleetserve_server.api.app import create_app
from fleetserve_server.tracing import Tracing, TracingConfigError, TracingMiddleware, traces_endpoint
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.mark.parametrize("flag,env,expected", [
    (None, {}, None),
    ("http://c:4318", {}, "http://c:4318/v1/traces"),
    ("http://c:4318/", {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://other:4318"}, "http://c:4318/v1/traces"),
    ("https://c/otlp/v1/traces", {}, "https://c/otlp/v1/traces"),
    (None, {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"}, "http://c:4318/v1/traces"),
    (None, {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://c:4318/custom"}, "http://c:4318/custom"),
    (None, {"OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf"}, None),
])
def test_the_endpoint_the_settings_select(flag: str | None, env: dict[str, str], expected: str | None) -> None:
    assert traces_endpoint(flag, env) == expected


@pytest.mark.parametrize("flag,env,message", [
    ("c:4318", {}, "--otlp-endpoint c:4318: expected an http:// or https:// URL"),
    (None, {"OTEL_EXPORTER_OTLP_ENDPOINT": "grpc://c:4317"}, "$OTEL_EXPORTER_OTLP_ENDPOINT grpc://c:4317"),
    ("http://c:4317", {"OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "grpc"}, "HTTP/protobuf only"),
])
def test_settings_that_cannot_work_are_named(flag: str | None, env: dict[str, str], message: str) -> None:
    with pytest.raises(TracingConfigError, match=re.escape(message)):
        traces_endpoint(flag, env)


def _middlewares(app: Any) -> list[type]:
    return [m.cls for m in app.user_middleware]


def test_off_adds_nothing_to_the_request_path() -> None:
    app = create_app(FakeEngine(), served_name=MODEL.served_name, tokenizer=FakeTokenizer(), model=MODEL)
    assert TracingMiddleware not in _middlewares(app)


async def test_one_generate_span_per_choice_under_the_request_span() -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing = Tracing(tracer=provider.get_tracer("t"), provider=provider, endpoint="memory")
    app = create_app(FakeEngine(), served_name=MODEL.served_name, tokenizer=FakeTokenizer(), model=MODEL,
                     tracing=tracing)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
        r = await client.post("/v1/chat/completions", headers={"X-Request-Id": "n2"}, json={
            "model": "fake-model", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "n": 2,
            "temperature": 0.8, "seed": 1})
        assert r.status_code == 200
        assert (await client.get("/health")).status_code == 200
    spans = exporter.get_finished_spans()
    [http] = [s for s in spans if s.name == "POST /v1/chat/completions"]
    generates = [s for s in spans if s.name == "generate"]
    assert len(generates) == 2 and all(g.parent is not None and g.parent.span_id == http.context.span_id
                                       for g in generates)
    assert sorted(g.attributes["gen_ai.request.seed"] for g in generates) == [1, 2]  # copy j: seed + j
    assert {g.attributes["fleetserve.request_id"] for g in generates} == {"n2"}
    assert [s.name for s in spans].count("response") == 1
    assert not any(s.name.startswith("GET") for s in spans)
