"""`fleetserve serve --otlp-endpoint` against a real OpenTelemetry Collector (hack/otelcol: the OTLP
receiver and the file exporter, built from the Go module proxy): each request's spans arrive — HTTP >
generate > queue/prefill/decode, and response — with the model, token counts, sampling parameters, finish
reason and request id, continuing the caller's ``traceparent`` through the router."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fleetserve_server.bench.launch import ServerProcess, free_port
from router_util import address, start_router
from serve_util import MODEL, server_factory, tiny_model  # noqa: F401 - fixtures

REPO = Path(__file__).resolve().parents[2]
BUILD = REPO / "hack" / "otelcol" / "build.sh"
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN = "00f067aa0ba902b7"


def collector_binary() -> Path:
    """Build (first time, a few minutes) or find the cached collector."""
    version = re.search(r'OTELCOL_VERSION:-(v[0-9.]+)', BUILD.read_text())
    assert version is not None
    cache = Path(os.environ.get("FLEETSERVE_CACHE_DIR") or Path(os.environ.get("XDG_CACHE_HOME")
                                                                 or Path.home() / ".cache") / "fleetserve")
    binary = cache / "otelcol" / version.group(1) / "bin" / "fleetserve-otelcol"
    if not binary.exists():
        subprocess.run(["bash", str(BUILD)], check=True, timeout=1800)
    return binary


class Collector:
    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.output = workdir / "traces.jsonl"
        config = workdir / "otelcol.yaml"
        config.write_text(json.dumps({  # JSON is YAML
            "receivers": {"otlp": {"protocols": {"http": {"endpoint": f"127.0.0.1:{self.port}"}}}},
            "exporters": {"file": {"path": str(self.output), "flush_interval": "100ms"}},
            "service": {"telemetry": {"metrics": {"level": "none"}},
                        "pipelines": {"traces": {"receivers": ["otlp"], "exporters": ["file"]}}},
        }))
        self.log = workdir / "otelcol.log"
        self.process = subprocess.Popen([str(collector_binary()), "--config", f"file:{config}"],
                                        stdout=self.log.open("wb"), stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert self.process.poll() is None, f"collector exited:\n{self.log.read_text()[-3000:]}"
            try:  # the OTLP/HTTP receiver answers 405 to GET once it listens
                httpx.get(f"{self.endpoint}/v1/traces", timeout=1)
                return
            except httpx.TransportError:
                time.sleep(0.1)
        raise AssertionError(f"collector did not listen:\n{self.log.read_text()[-3000:]}")

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def spans(self) -> list[dict[str, Any]]:
        out = []
        text = self.output.read_text() if self.output.exists() else ""
        for line in text.splitlines():
            for resource in json.loads(line).get("resourceSpans", []):
                attrs = _attributes(resource.get("resource", {}).get("attributes", []))
                for scope in resource.get("scopeSpans", []):
                    for span in scope.get("spans", []):
                        out.append({**span, "attrs": _attributes(span.get("attributes", [])), "resource": attrs})
        return out

    def wait_spans(self, condition: Callable[[list[dict[str, Any]]], bool], timeout: float = 60) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            spans = self.spans()
            if condition(spans):
                return spans
            time.sleep(0.2)
        raise AssertionError(f"spans never arrived; have {[s['name'] for s in self.spans()]}")

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=30)


def _value(v: dict[str, Any]) -> Any:
    if "arrayValue" in v:
        return [_value(x) for x in v["arrayValue"].get("values", [])]
    if "intValue" in v:
        return int(v["intValue"])
    for key in ("stringValue", "doubleValue", "boolValue"):
        if key in v:
            return v[key]
    return None


def _attributes(items: list[dict[str, Any]]) -> dict[str, Any]:
    return {a["key"]: _value(a.get("value", {})) for a in items}


@pytest.fixture
def collector(tmp_path: Path) -> Iterator[Collector]:
    c = Collector(tmp_path)
    try:
        yield c
    finally:
        c.stop()


def test_spans_reach_the_collector_and_continue_the_callers_trace_through_the_router(
        server_factory: Callable[..., ServerProcess], collector: Collector, tmp_path: Path) -> None:  # noqa: F811
    server = server_factory("--otlp-endpoint", collector.endpoint)
    router = start_router(tmp_path, "--endpoints", address(server))
    try:
        r = httpx.post(router.base_url + "/v1/chat/completions", timeout=120,
                       headers={"traceparent": f"00-{TRACE_ID}-{CALLER_SPAN}-01", "X-Request-Id": "traced-1"},
                       json={"model": MODEL, "messages": [{"role": "user", "content": "Hello there"}],
                             "max_tokens": 5, "temperature": 0.5, "top_p": 0.9, "seed": 3})
        assert r.status_code == 200, r.text
        usage = r.json()["usage"]
        streamed = httpx.post(server.base_url + "/v1/completions", timeout=120, headers={"X-Request-Id": "plain-1"},
                              json={"model": MODEL, "prompt": "One two", "max_tokens": 3, "stream": True})
        assert streamed.status_code == 200 and "[DONE]" in streamed.text
        assert httpx.get(server.base_url + "/metrics", timeout=10).status_code == 200  # not traced
    finally:
        router.stop()

    def complete(spans: list[dict[str, Any]]) -> bool:
        names = [s["name"] for s in spans]
        return names.count("generate") >= 2 and names.count("response") >= 2
    spans = collector.wait_spans(complete)

    traced = [s for s in spans if s["traceId"] == TRACE_ID]
    by_name = {s["name"]: s for s in traced}
    assert set(by_name) == {"POST /v1/chat/completions", "generate", "queue", "prefill", "decode", "response"}
    http = by_name["POST /v1/chat/completions"]
    assert http["parentSpanId"] == CALLER_SPAN  # the router forwarded traceparent untouched
    assert http["kind"] in (2, "SPAN_KIND_SERVER")
    assert http["attrs"]["fleetserve.request_id"] == "traced-1"
    assert http["attrs"]["http.response.status_code"] == 200
    generate = by_name["generate"]
    assert generate["parentSpanId"] == http["spanId"] and by_name["response"]["parentSpanId"] == http["spanId"]
    for phase in ("queue", "prefill", "decode"):
        assert by_name[phase]["parentSpanId"] == generate["spanId"]
    attrs = generate["attrs"]
    assert attrs["gen_ai.request.model"] == MODEL
    assert attrs["gen_ai.usage.input_tokens"] == usage["prompt_tokens"]
    assert attrs["gen_ai.usage.output_tokens"] == usage["completion_tokens"] == 5
    assert attrs["fleetserve.cached_tokens"] == usage["prompt_tokens_details"]["cached_tokens"]
    assert (attrs["gen_ai.request.temperature"], attrs["gen_ai.request.top_p"], attrs["gen_ai.request.seed"],
            attrs["gen_ai.request.max_tokens"]) == (0.5, 0.9, 3, 5)
    assert attrs["gen_ai.response.finish_reasons"] == ["length"]
    assert attrs["fleetserve.request_id"] == "traced-1"
    start = {n: int(s["startTimeUnixNano"]) for n, s in by_name.items()}
    end = {n: int(s["endTimeUnixNano"]) for n, s in by_name.items()}
    assert start["queue"] <= end["queue"] <= start["prefill"] + 1 and end["prefill"] <= start["decode"] + 1
    assert start["POST /v1/chat/completions"] <= start["generate"]
    assert end["decode"] <= end["generate"] <= start["response"] + 1 <= end["POST /v1/chat/completions"] + 1
    assert by_name["generate"]["resource"]["service.name"] == "fleetserve-server"

    # the request without traceparent got a trace of its own, streamed, with its own root
    plain = [s for s in spans if s["traceId"] != TRACE_ID]
    roots = [s for s in plain if not s.get("parentSpanId")]
    assert [s["name"] for s in roots] == ["POST /v1/completions"]
    assert roots[0]["attrs"]["fleetserve.request_id"] == "plain-1"
    assert {s["name"] for s in plain} == {"POST /v1/completions", "generate", "queue", "prefill", "decode", "response"}
    assert not any(s["name"].startswith("GET") for s in spans)


def test_the_standard_environment_variable_turns_it_on(server_factory: Callable[..., ServerProcess],  # noqa: F811
                                                       collector: Collector) -> None:
    server = server_factory(env={"OTEL_EXPORTER_OTLP_ENDPOINT": collector.endpoint, "OTEL_SERVICE_NAME": "llm-a"})
    r = httpx.post(server.base_url + "/v1/completions", timeout=120,
                   json={"model": MODEL, "prompt": "Hi", "max_tokens": 2})
    assert r.status_code == 200
    spans = collector.wait_spans(lambda s: any(x["name"] == "generate" for x in s))
    generate = next(s for s in spans if s["name"] == "generate")
    assert generate["resource"]["service.name"] == "llm-a" and generate["attrs"]["gen_ai.usage.output_tokens"] == 2


@pytest.mark.parametrize("flags,env,message", [
    (["--otlp-endpoint", "collector:4318"], {}, "--otlp-endpoint collector:4318: expected an http:// or https://"),
    ([], {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317", "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"},
     "$OTEL_EXPORTER_OTLP_PROTOCOL=grpc: fleetserve exports OTLP over HTTP/protobuf only"),
])
def test_bad_tracing_settings_stop_the_start(server_factory: Callable[..., ServerProcess],  # noqa: F811
                                             flags: list[str], env: dict[str, str], message: str) -> None:
    with pytest.raises(RuntimeError, match="exited with code 2") as failure:
        server_factory(*flags, env=env)
    assert message in str(failure.value)


if __name__ == "__main__":  # build the collector ahead of a test run
    print(collector_binary(), file=sys.stderr)
