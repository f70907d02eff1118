"""OpenTelemetry traces of each request, exported over OTLP/HTTP; off unless an endpoint is configured.

On with ``--otlp-endpoint URL`` or the standard ``OTEL_EXPORTER_OTLP_ENDPOINT``
(or ``..._TRACES_ENDPOINT``). Off, nothing is added to the request path: no
middleware, no span objects (``GenerationRun`` finds no trace on the scope).

One trace per HTTP request, continuing the caller's trace when the request
carries a W3C ``traceparent`` header (the router forwards it unchanged)::

    POST /v1/chat/completions        (SERVER; http status, request id)
      generate                       (one per choice; model, tokens, sampling, finish reason)
        queue                        arrival -> scheduled
        prefill                      scheduled -> first token
        decode                       first token -> last token
      response                       last token -> last byte sent

The engine measures its phases in its own loop; the child spans are written
after the fact from those timings (arrival + queue_time, + time_to_first_token,
+ e2e_latency), so tracing adds nothing to the engine's step.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from starlette.types import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger("fleetserve.tracing")

TRACE_SCOPE_KEY = "fleetserve.trace"
_PROPAGATOR = TraceContextTextMapPropagator()
_HTTP_TRACED_PREFIX = "/v1/"  # the API; probes and scrapes would only add noise
ENDPOINT_ENVS = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")
PROTOCOL_ENVS = ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL")


class TracingConfigError(ValueError):
    """The tracing settings cannot work; the message names the flag or variable and the fix."""


@dataclass
class Tracing:
    """The tracer the server writes spans with, and the provider that exports (and flushes) them."""

    tracer: trace.Tracer
    provider: Any
    endpoint: str

    def shutdown(self) -> None:
        """Export what is still buffered (at most a few seconds), then stop."""
        try:
            self.provider.shutdown()
        except Exception:  # noqa: BLE001 - an unreachable collector must not fail the shutdown
            log.exception("flushing traces to %s failed", self.endpoint)


@dataclass
class RequestTrace:
    """What one HTTP request's spans hang on: its SERVER span, and when its last token came."""

    tracer: trace.Tracer
    span: trace.Span
    context: Context
    generation_end_ns: int | None = None


def traces_endpoint(flag: str | None, environ: Mapping[str, str]) -> str | None:
    """The OTLP/HTTP traces URL, or None when tracing is off. A base URL gets ``/v1/traces``
    appended (the OTLP convention for OTEL_EXPORTER_OTLP_ENDPOINT and for the flag)."""
    for name in PROTOCOL_ENVS:
        protocol = environ.get(name, "").strip()
        if protocol and protocol != "http/protobuf":
            raise TracingConfigError(f"${name}={protocol}: fleetserve exports OTLP over HTTP/protobuf only "
                                     "(the collector's port 4318); set it to http/protobuf or unset it")
    source, url = "--otlp-endpoint", flag
    if not url:
        for name in ENDPOINT_ENVS:
            if environ.get(name, "").strip():
                source, url = f"${name}", environ[name].strip()
                break
    if not url:
        return None
    if not url.startswith(("http://", "https://")):
        raise TracingConfigError(f"{source} {url}: expected an http:// or https:// URL of an OTLP/HTTP "
                                 "receiver, e.g. http://otel-collector:4318")
    if source == "$OTEL_EXPORTER_OTLP_TRACES_ENDPOINT" or url.rstrip("/").endswith("/v1/traces"):
        return url
    return url.rstrip("/") + "/v1/traces"


def setup_tracing(flag: str | None, environ: Mapping[str, str], *, model: str) -> Tracing | None:
    """A tracer exporting in batches to the configured endpoint, or None (tracing off)."""
    endpoint = traces_endpoint(flag, environ)
    if endpoint is None:
        return None
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    attributes: dict[str, Any] = {"fleetserve.model": model}
    if not environ.get("OTEL_SERVICE_NAME"):
        attributes["service.name"] = "fleetserve-server"
    # The sampler follows OTEL_TRACES_SAMPLER (default: parent-based, always on).
    provider = TracerProvider(resource=Resource.create(attributes))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint)))
    log.info("exporting traces over OTLP/HTTP to %s", endpoint)
    return Tracing(tracer=provider.get_tracer("fleetserve.server"), provider=provider, endpoint=endpoint)


class TracingMiddleware:
    """Opens the SERVER span of each ``/v1/`` request (continuing an incoming ``traceparent``), puts a
    ``RequestTrace`` on the scope for the generation code, and closes the span with the last byte."""

    def __init__(self, app: ASGIApp, tracing: Tracing) -> None:
        self.app = app
        self.tracer = tracing.tracer

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith(_HTTP_TRACED_PREFIX):
            await self.app(scope, receive, send)
            return
        carrier = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        parent = _PROPAGATOR.extract(carrier)
        method = scope.get("method", "GET")
        span = self.tracer.start_span(f"{method} {scope['path']}", context=parent, kind=SpanKind.SERVER,
                                      attributes={"http.request.method": method, "url.path": scope["path"],
                                                  "fleetserve.request_id": str(scope.get("fleetserve.request_id",
                                                                                         ""))})
        request_trace = RequestTrace(self.tracer, span, trace.set_span_in_context(span, parent))
        scope[TRACE_SCOPE_KEY] = request_trace
        ended = False

        def end() -> None:
            nonlocal ended
            if ended:
                return
            ended = True
            if request_trace.generation_end_ns is not None:
                self.tracer.start_span("response", context=request_trace.context,
                                       start_time=request_trace.generation_end_ns).end()
            span.end()

        async def traced_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                status = int(message["status"])
                span.set_attribute("http.response.status_code", status)
                if status >= 500:
                    span.set_status(Status(StatusCode.ERROR))
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                end()

        try:
            await self.app(scope, receive, traced_send)
        except BaseException as exc:
            span.record_exception(exc)
            span.set_status(Status(StatusCode.ERROR, type(exc).__name__))
            raise
        finally:
            end()


def record_generation(request_trace: RequestTrace, *, arrival_monotonic: float, final: Any, params: Any,
                      model: str, request_id: str, engine_request_id: str, prompt_tokens: int,
                      completion_tokens: int, cached_tokens: int, finish_reason: str) -> None:
    """Write one engine request's spans (generate > queue, prefill, decode) from its measured timings."""
    now_ns = time.time_ns()
    arrival_ns = now_ns - int((time.monotonic() - arrival_monotonic) * 1e9)

    def at(seconds: float | None) -> int | None:
        return None if seconds is None else min(now_ns, arrival_ns + int(seconds * 1e9))

    queued, first, last = (at(getattr(final, "queue_time", None)), at(getattr(final, "time_to_first_token", None)),
                           at(getattr(final, "e2e_latency", None)))
    end_ns = last or now_ns
    attributes: dict[str, Any] = {
        "gen_ai.request.model": model,
        "gen_ai.usage.input_tokens": prompt_tokens,
        "gen_ai.usage.output_tokens": completion_tokens,
        "fleetserve.cached_tokens": cached_tokens,
        "gen_ai.response.finish_reasons": (finish_reason,),
        "fleetserve.request_id": request_id,
        "fleetserve.engine_request_id": engine_request_id,
        "gen_ai.request.max_tokens": params.max_tokens,
        "gen_ai.request.temperature": params.temperature,
        "gen_ai.request.top_p": params.top_p,
        "gen_ai.request.top_k": params.top_k,
        "fleetserve.request.min_p": params.min_p,
        "gen_ai.request.presence_penalty": params.presence_penalty,
        "gen_ai.request.frequency_penalty": params.frequency_penalty,
        "fleetserve.request.repetition_penalty": params.repetition_penalty,
    }
    if params.seed is not None:
        attributes["gen_ai.request.seed"] = params.seed
    if params.stop:
        attributes["gen_ai.request.stop_sequences"] = tuple(params.stop)
    tracer = request_trace.tracer
    generate = tracer.start_span("generate", context=request_trace.context, start_time=arrival_ns,
                                 attributes=attributes)
    if finish_reason == "error":
        generate.set_status(Status(StatusCode.ERROR, getattr(final, "error", None) or "engine error"))
    inner = trace.set_span_in_context(generate, request_trace.context)
    phases = (("queue", arrival_ns, queued), ("prefill", queued, first), ("decode", first, last))
    for name, start, stop in phases:
        if start is not None and stop is not None:
            tracer.start_span(name, context=inner, start_time=start).end(end_time=max(start, stop))
    generate.end(end_time=end_ns)
    request_trace.generation_end_ns = max(end_ns, request_trace.generation_end_ns or 0)
