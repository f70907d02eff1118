"""What chat and text completions share: parameter checks, the engine call, cancellation, accounting.

One request's path: ``build_sampling_params`` (400s before the engine sees
anything) -> ``GenerationRun.start`` (admission: 429 / 503 / 400 from the
engine surface here, before any response header is sent) -> iterate deltas ->
on the last one, observe metrics and write the request log line.

A disconnecting client is noticed by a task that waits on the ASGI
``http.disconnect`` message and aborts the request in the engine at once, so
its KV blocks are freed within one engine step, whether or not it streamed.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from starlette.requests import Request

from fleetserve_server.api.context import APIContext, request_id_of
from fleetserve_server.api.errors import APIError, from_engine_error, invalid
from fleetserve_server.api.logs import RequestLogger
from fleetserve_server.api.protocol import UsageInfo, _SamplingFields
from fleetserve_server.api.state import Phase, ServerState, Serving
from fleetserve_server.engine.errors import RequestFailedError
from fleetserve_server.engine.interfaces import RequestOutputDelta
from fleetserve_server.engine.sampling_params import SamplingParams
from fleetserve_server.metrics import ServerMetrics
from fleetserve_server.tracing import TRACE_SCOPE_KEY, record_generation

log = logging.getLogger("fleetserve.server")

# Strong references to fire-and-forget abort tasks (the loop keeps only weak ones).
_BACKGROUND: set[asyncio.Task[None]] = set()

# Tokenizing and chat-templating cost time in proportion to the prompt (about a second for 1 MB):
# they run here, off the event loop, so other requests' streams keep flowing meanwhile. One thread,
# because a Hugging Face fast tokenizer may raise "Already borrowed" when two threads encode at once.
_TOKENIZER_POOL = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fleetserve-tokenize")


async def off_loop(fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)`` on the tokenizer thread; its exceptions (APIError 400s) propagate as they are."""
    return await asyncio.get_running_loop().run_in_executor(_TOKENIZER_POOL, functools.partial(fn, *args))

# Where a run leaves its prompt's cached-token count for the response headers (see app.py).
CACHED_TOKENS_SCOPE_KEY = "fleetserve.cached_tokens"

_PARAM_NAMES = ("max_tokens", "temperature", "top_p", "top_k", "min_p", "seed", "stop_token_ids", "stop",
                "min_tokens", "presence_penalty", "frequency_penalty", "repetition_penalty", "logit_bias",
                "logprobs", "prompt_logprobs")


def require_serving(state: ServerState, model_name: str | None = None) -> Serving:
    """The loaded model, or a 503 (loading / draining) or 400 (wrong model name)."""
    if state.phase is Phase.DRAINING or state.phase is Phase.STOPPED:
        raise APIError(503, "the server is draining and admits no new requests; retry on another replica",
                       code="draining", headers={"Retry-After": "1"}, reject_reason="draining")
    if state.phase is Phase.LOADING or state.serving is None:
        raise APIError(503, "the model is still loading; retry when GET /ready returns 200",
                       code="loading", headers={"Retry-After": "5"})
    serving = state.serving
    if model_name is not None and model_name != serving.model.served_name:
        raise invalid(f"model '{model_name}' is not served here; this server serves "
                      f"'{serving.model.served_name}' (see GET /v1/models)", param="model",
                      code="model_not_found")
    return serving


def vocab_size(serving: Serving) -> int | None:
    """How many token ids the tokenizer knows (ids at or above it are a 400)."""
    tokenizer = serving.tokenizer
    if hasattr(tokenizer, "__len__"):
        return len(tokenizer)
    return getattr(tokenizer, "vocab_size", None)


def check_unsupported(req: _SamplingFields, offending: list[str]) -> None:
    """Reject parameters fleetserve would otherwise silently ignore.

    ``offending`` names endpoint-specific fields the caller found set to a
    value other than "off" (e.g. ``tools``, ``suffix``).
    """
    if offending:
        raise invalid(f"{offending[0]} is not supported by fleetserve; omit it", param=offending[0])


def build_sampling_params(req: _SamplingFields, *, max_tokens: int | None, prompt_len: int,
                          max_model_len: int, prompt_param: str,
                          defaults: dict[str, Any] | None = None, vocab_size: int | None = None,
                          logprobs: int | None = None, prompt_logprobs: int | None = None,
                          grammar: Any = None) -> SamplingParams:
    """Validate sampling fields against the model's context limit; 400s name the field.

    Fields the request leaves out take the model's ``defaults`` (its
    generation_config), then OpenAI's (temperature 1, top_p 1, no top_k).
    """
    defaults = defaults or {}
    if prompt_len >= max_model_len:
        raise invalid(f"This model's maximum context length is {max_model_len} tokens, but the prompt "
                      f"has {prompt_len} tokens, leaving no room for a completion; shorten the prompt",
                      param=prompt_param, code="context_length_exceeded")
    if max_tokens is None:
        max_tokens = max_model_len - prompt_len
    elif isinstance(max_tokens, int) and max_tokens >= 1 and prompt_len + max_tokens > max_model_len:
        raise invalid(f"This model's maximum context length is {max_model_len} tokens. However, you requested "
                      f"{prompt_len + max_tokens} tokens ({prompt_len} in the prompt, {max_tokens} for the "
                      f"completion); reduce the prompt or max_tokens to at most {max_model_len - prompt_len}",
                      param="max_tokens", code="context_length_exceeded")
    stop: tuple[str, ...] = ()
    if req.stop is not None:
        stop = (req.stop,) if isinstance(req.stop, str) else tuple(req.stop)
    top_k = req.top_k if req.top_k is not None else int(defaults.get("top_k", 0))
    if top_k == -1:  # vLLM's spelling of "disabled"
        top_k = 0
    logit_bias = tuple((int(k), v) for k, v in (req.logit_bias or {}).items())
    stop_token_ids = tuple(req.stop_token_ids or ())
    if vocab_size is not None:
        for name, ids in (("logit_bias", [t for t, _ in logit_bias]), ("stop_token_ids", stop_token_ids)):
            bad = [t for t in ids if t >= vocab_size]
            if bad:
                raise invalid(f"{name}: token id {bad[0]} is outside the vocabulary [0, {vocab_size})", param=name)
    try:
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=float(defaults.get("temperature", 1.0)) if req.temperature is None else req.temperature,
            top_p=float(defaults.get("top_p", 1.0)) if req.top_p is None else req.top_p,
            top_k=top_k,
            min_p=float(defaults.get("min_p", 0.0)) if req.min_p is None else req.min_p,
            seed=req.seed,
            stop=stop,
            stop_token_ids=stop_token_ids,
            ignore_eos=bool(req.ignore_eos),
            min_tokens=req.min_tokens or 0,
            presence_penalty=req.presence_penalty or 0.0,
            frequency_penalty=req.frequency_penalty or 0.0,
            repetition_penalty=(float(defaults.get("repetition_penalty", 1.0)) if req.repetition_penalty is None
                                else req.repetition_penalty),
            logit_bias=logit_bias,
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
            grammar=grammar,
        )
    except ValueError as exc:
        message = str(exc)
        param = next((p for p in _PARAM_NAMES if message.startswith(p)), None)
        if param is None and "stop" in message:
            param = "stop"
        raise invalid(message, param=param) from None


@dataclass
class GenerationRun:
    """One request's trip through the engine, with its bookkeeping.

    Invariants: the request is in ``state.inflight`` from ``start()`` until
    its iteration ends (normally, by error or by cancellation); when it ends
    without a final delta it is aborted in the engine; metrics and the request
    log are written exactly once.
    """

    serving: Serving
    state: ServerState
    metrics: ServerMetrics
    request_log: RequestLogger
    http_request: Request
    client_request_id: str
    endpoint: str
    prompt_ids: list[int]
    params: SamplingParams
    log_prompt: Any = None
    engine_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    arrival: float = field(default_factory=time.monotonic)
    created: int = field(default_factory=lambda: int(time.time()))
    text: list[str] = field(default_factory=list)
    completion_tokens: int = 0
    token_logprobs: list[float] = field(default_factory=list)  # with params.logprobs: the sampled tokens'
    final: RequestOutputDelta | None = None
    finish_reason: str | None = None
    _iterator: AsyncIterator[RequestOutputDelta] | None = None
    _watcher: asyncio.Task[None] | None = None
    _first: RequestOutputDelta | None = None
    _first_task: asyncio.Future[RequestOutputDelta | None] | None = None
    _done: bool = False
    # how long start() waits for the first output; a streamed answer starts after it regardless
    first_output_grace: float = 0.25
    sse_keepalive_seconds: float = 5.0

    async def start(self) -> None:
        """Admit the request and wait for its first output, for at most ``first_output_grace``
        seconds (errors in that time raise APIError, nothing sent yet). Admission errors (queue
        full, invalid, draining) always come in that time: the engine raises them at once."""
        self.state.admit(self.engine_id)
        self._watcher = asyncio.create_task(self._watch_disconnect())
        try:
            result: Any = self.serving.engine.generate(self.engine_id, list(self.prompt_ids), self.params)
            if inspect.isawaitable(result):
                result = await result
            self._iterator = result
            self._first_task = asyncio.ensure_future(_first_item(result))
            await asyncio.wait({self._first_task}, timeout=max(self.first_output_grace, 0.001))
            if self._first_task.done():
                self._first, self._first_task = self._first_task.result(), None
                if self._first is not None:  # known before a streamed answer's headers go out
                    self._note_cached(self._first)
        except Exception as exc:
            error = from_engine_error(exc)
            if error.reject_reason is None and isinstance(exc, RequestFailedError):
                # Admitted, then failed alone in the engine (not the client's input): a finished request.
                self.finish_reason = "error"
                self._end(aborted=False)
            else:
                # Refused at admission (queue full, invalid, draining, dead): the error
                # handler counts the rejection; this is not a finished request.
                self._end(aborted=True, record=False)
            raise error from exc
        except BaseException:
            self._end(aborted=True)
            raise

    async def deltas(self) -> AsyncIterator[RequestOutputDelta]:
        """The request's deltas, starting with the one ``start()`` received.

        An engine error after the first token ends the run with ``finish_reason: error``
        and re-raises as APIError; cancellation (client gone) aborts the request.
        """
        ended = False
        try:
            if self._first_task is not None:  # still queued when start() returned
                self._first = await self._first_task
                self._first_task = None
            if self._first is not None:
                first, self._first = self._first, None
                self._accept(first)
                yield first
            if self._iterator is not None and self.finish_reason is None:
                # Run the engine's iterator to its end (not just to the final delta) so that
                # its own cleanup runs now rather than whenever it is garbage-collected.
                async for delta in self._iterator:
                    if self.finish_reason is not None:
                        continue
                    self._accept(delta)
                    yield delta
            if self.finish_reason is None:
                # The iterator ended without a final delta: the engine dropped it (an abort).
                self.finish_reason = "abort"
            ended = True
        except Exception as exc:
            self.finish_reason = "error"
            error = from_engine_error(exc)
            raise error from exc
        finally:
            self._end(aborted=not ended)

    @property
    def first_pending(self) -> bool:
        """The request has produced nothing yet (it is queued, or its prompt is being computed)."""
        return self._first_task is not None and not self._first_task.done()

    async def wait_first(self, timeout: float) -> bool:
        """Wait up to ``timeout`` s for the first output (or error); True once it is there."""
        task = self._first_task
        if task is None or task.done():
            return True
        await asyncio.wait({task}, timeout=timeout)
        return task.done()

    def _note_cached(self, delta: RequestOutputDelta) -> None:
        # Read by CacheHeadersMiddleware into x-fleetserve-cached-tokens (the router's ground truth).
        self.http_request.scope[CACHED_TOKENS_SCOPE_KEY] = delta.cached_prompt_tokens

    def _accept(self, delta: RequestOutputDelta) -> None:
        self._note_cached(delta)
        if delta.text:
            self.text.append(delta.text)
        self.completion_tokens += len(delta.token_ids)
        if delta.logprobs:
            self.token_logprobs.extend(entry.logprob for entry in delta.logprobs)
        if delta.finish_reason is not None:
            self.final = delta
            self.finish_reason = delta.finish_reason

    @property
    def usage(self) -> UsageInfo:
        prompt = self.final.prompt_tokens if self.final and self.final.prompt_tokens else len(self.prompt_ids)
        completion = self.final.completion_tokens if self.final and self.final.completion_tokens \
            else self.completion_tokens
        cached = self.final.cached_prompt_tokens if self.final else 0
        return UsageInfo(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion,
                         prompt_tokens_details={"cached_tokens": cached})

    async def _abort_in_engine(self) -> None:
        try:
            await self.serving.engine.abort(self.engine_id)
            if self._first_task is not None:  # cancelled by _end: let it unwind before closing the iterator
                await asyncio.wait({self._first_task}, timeout=5)
            if self._iterator is not None and hasattr(self._iterator, "aclose"):
                await self._iterator.aclose()
        except Exception:
            log.exception("aborting request %s failed", self.engine_id)

    async def _watch_disconnect(self) -> None:
        while True:
            message = await self.http_request.receive()
            if message["type"] == "http.disconnect":
                if not self._done:
                    log.info("client disconnected; aborting request %s", self.engine_id)
                    await self.serving.engine.abort(self.engine_id)
                return

    def _end(self, *, aborted: bool, record: bool = True) -> None:
        """Release the request and record it; synchronous on purpose.

        It runs in ``finally`` blocks of code that may be being cancelled (a
        client disconnect cancels the response task); an ``await`` there could
        be cancelled again before the request is released, so the engine abort
        runs as its own task instead.
        """
        if self._done:
            return
        self._done = True
        if self._watcher is not None and self._watcher is not asyncio.current_task():
            self._watcher.cancel()
        if self._first_task is not None and not self._first_task.done():
            self._first_task.cancel()
        if aborted or self.finish_reason is None:
            task = asyncio.get_running_loop().create_task(self._abort_in_engine())
            _BACKGROUND.add(task)
            task.add_done_callback(_BACKGROUND.discard)
        self.state.release(self.engine_id)
        if not record:
            return
        reason = self.finish_reason or "abort"
        final = self.final or RequestOutputDelta(request_id=self.engine_id, text="", token_ids=[],
                                                 finish_reason=reason,  # type: ignore[arg-type]
                                                 prompt_tokens=len(self.prompt_ids),
                                                 completion_tokens=self.completion_tokens)
        self.metrics.observe_finished(final, reason)
        usage = self.usage
        self.request_log.finished(
            request_id=self.client_request_id, engine_request_id=self.engine_id, endpoint=self.endpoint,
            params=self.params, final=self.final, finish_reason=reason,
            prompt_tokens=usage.prompt_tokens, completion_tokens=usage.completion_tokens,
            arrival=self.arrival, prompt=self.log_prompt, completion="".join(self.text),
            token_logprobs=self.token_logprobs if self.params.logprobs is not None else None,
        )
        request_trace = self.http_request.scope.get(TRACE_SCOPE_KEY)
        if request_trace is not None:  # --otlp-endpoint: this run's spans under the request's
            self._trace(request_trace, usage, reason)

    def _trace(self, request_trace: Any, usage: UsageInfo, reason: str) -> None:
        try:  # spans are diagnostics: a failure to write them must not fail the request
            record_generation(request_trace, arrival_monotonic=self.arrival, final=self.final, params=self.params,
                              model=self.request_log.model, request_id=self.client_request_id,
                              engine_request_id=self.engine_id, prompt_tokens=usage.prompt_tokens,
                              completion_tokens=usage.completion_tokens,
                              cached_tokens=int((usage.prompt_tokens_details or {}).get("cached_tokens", 0)),
                              finish_reason=reason)
        except Exception:
            log.exception("tracing request %s failed", self.engine_id)


def openai_finish_reason(reason: str | None) -> str | None:
    """The finish reason as OpenAI spells it; an aborted or failed request raises instead
    (``abort``: the server stopped it, e.g. a drain that ran out of time; the client is told so)."""
    if reason in ("abort", "error"):
        raise APIError(503, "the server stopped this request before it finished (it is draining or the "
                       "request failed); retry it", code="aborted", headers={"Retry-After": "1"})
    return reason


async def start_run(ctx: APIContext, http_request: Request, serving: Serving, *, endpoint: str,
                    prompt_ids: list[int], params: SamplingParams, log_prompt: Any) -> GenerationRun:
    """A ``GenerationRun`` for this request, admitted (``start``): errors raise before any response."""
    run = GenerationRun(
        serving=serving, state=ctx.state, metrics=ctx.metrics, request_log=ctx.request_log,
        http_request=http_request, client_request_id=request_id_of(http_request), endpoint=endpoint,
        prompt_ids=prompt_ids, params=params, log_prompt=log_prompt,
        first_output_grace=ctx.first_output_grace, sse_keepalive_seconds=ctx.sse_keepalive_seconds,
    )
    await run.start()
    return run



async def _first_item(iterator: AsyncIterator[RequestOutputDelta]) -> RequestOutputDelta | None:
    """The iterator's first delta, or None if it ends at once."""
    try:
        return await anext(iterator)
    except StopAsyncIteration:
        return None
