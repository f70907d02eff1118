"""The `fleetserve serve` process: bind, load, warm up, serve, drain on SIGTERM, exit 0.

Order matters for Kubernetes. The port is bound before the model loads, so
the liveness probe (/health) answers while loading and only readiness (/ready)
waits for the model. SIGTERM flips /ready to 503 at once, refuses new
requests with 503, lets in-flight ones finish for up to ``drain_timeout``
seconds, aborts what is left (those clients get ``finish_reason: abort``),
and exits 0 so the pod is not reported as failed.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import logging
import os
import signal
import sys
import threading
from collections.abc import Generator
from pathlib import Path
from typing import Any

import uvicorn

from fleetserve_server.api.app import APIContext, app_context, attach, create_app, default_max_request_bytes
from fleetserve_server.api.state import ModelInfo, Phase
from fleetserve_server.capture import CaptureConfigError, open_capture
from fleetserve_server.config import ConfigError, ServerConfig
from fleetserve_server.engine.sampling_params import SamplingParams
from fleetserve_server.tracing import TracingConfigError, setup_tracing

log = logging.getLogger("fleetserve.server")

# Keys of ServerConfig that change what the engine computes (they go into system_fingerprint).
_ENGINE_KEYS = ("model", "quantization", "dtype", "max_model_len", "max_num_seqs", "max_batch_tokens",
                "kv_cache_memory_fraction", "kv_cache_tokens", "block_size", "prefix_caching",
                "cache_ttl_seconds")


def sampling_defaults(model_path: str | None) -> dict[str, Any]:
    """temperature / top_p / top_k a request gets when it omits them: the model
    directory's generation_config.json (as in vLLM), unless it says ``do_sample:
    false``. Builtin models get their model card's values written there when
    they are converted."""
    if not model_path:
        return {}
    try:
        config = json.loads((Path(model_path) / "generation_config.json").read_text())
    except (OSError, ValueError):
        return {}
    if config.get("do_sample") is False:
        return {}
    return {k: config[k] for k in ("temperature", "top_p", "top_k")
            if isinstance(config.get(k), int | float) and not isinstance(config.get(k), bool)}


class _Server(uvicorn.Server):
    """uvicorn without its own signal handling: SIGTERM means drain first, which uvicorn cannot do."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


def load_engine(config: ServerConfig) -> Any:
    """Load the model and build the engine (blocking; run in a thread). Returns ``LoadedEngine``."""
    from fleetserve_server.llm import create_engine

    loaded = create_engine(
        config.model,
        quantization=config.quantization,
        dtype=config.dtype,
        device=config.device,
        tensor_parallel_size=config.tensor_parallel_size,
        max_model_len=config.max_model_len,
        max_num_seqs=config.max_num_seqs,
        max_batch_tokens=config.max_batch_tokens,
        threads=config.threads,
        kv_cache_tokens=config.kv_cache_tokens,
        kv_cache_memory_fraction=config.kv_cache_memory_fraction,
        block_size=config.block_size,
        enable_prefix_caching=config.prefix_caching,
        cache_ttl_seconds=config.cache_ttl_seconds,
        max_queue_length=config.max_queue_length,
        served_model_name=config.resolved_served_name(),
    )
    if hasattr(loaded, "warmup"):
        loaded.warmup()  # one forward on this thread: workspaces allocated, weight pages faulted in
    return loaded


def print_memory_plan(loaded: Any, config: ServerConfig) -> None:
    """Human-readable summary on stdout (what an operator reads in `kubectl logs`), JSON in the log."""
    plan = loaded.memory_plan.to_dict() if loaded.memory_plan is not None else {}
    gib = 1024 ** 3
    lines = [
        f"fleetserve: model {config.model} as '{config.resolved_served_name()}' on {loaded.device} "
        f"({_dtype_name(loaded.dtype)}, quantization {loaded.quantization})",
        f"  weights:          {loaded.weights_bytes / gib:.3f} GiB",
        f"  KV cache:         {loaded.kv_cache_bytes / gib:.3f} GiB = "
        f"{plan.get('kv_capacity_tokens', '?')} tokens",
        f"  max model len:    {loaded.max_model_len} tokens",
        f"  max concurrency:  {plan.get('max_concurrent_sequences', plan.get('max_concurrency', '?'))} "
        f"sequences of max_model_len (scheduler admits up to {config.max_num_seqs})",
    ]
    if getattr(loaded, "tensor_parallel_size", 1) > 1:
        lines.append(f"  tensor parallel:  {loaded.tensor_parallel_size} ranks, one process each; weights and KV "
                     "cache above are rank 0's (per device)")
    if plan.get("message"):
        lines.append(f"  {plan['message']}")
    print("\n".join(lines), flush=True)
    log.info("memory plan", extra={"fields": {"event": "memory_plan", "plan": plan}})


def _dtype_name(dtype: Any) -> str:
    return str(dtype).removeprefix("torch.")


async def _maybe_await(value: Any) -> Any:
    return await value if inspect.isawaitable(value) else value


async def warm_up(engine: Any, tokenizer: Any) -> None:
    """One short greedy request end to end, so the first client does not pay for lazy init."""
    prompt = list(tokenizer.encode("Hello", add_special_tokens=True)) or [0]
    params = SamplingParams(max_tokens=2, temperature=0.0)
    stream = await _maybe_await(engine.generate("warmup", prompt, params))
    async for _ in stream:
        pass


def _settle(future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if future.done():  # the waiter was cancelled (SIGTERM during loading)
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


async def _load_in_thread(config: ServerConfig) -> Any:
    # A daemon thread (not the default executor): a SIGTERM during loading must be able
    # to exit without waiting for a multi-gigabyte load to finish.
    loop = asyncio.get_running_loop()
    future: asyncio.Future[Any] = loop.create_future()

    def target() -> None:
        try:
            result = load_engine(config)
        except BaseException as exc:  # handed to the event loop as is
            loop.call_soon_threadsafe(_settle, future, None, exc)
        else:
            loop.call_soon_threadsafe(_settle, future, result, None)

    threading.Thread(target=target, name="fleetserve-load", daemon=True).start()
    return await future


def read_chat_template(path: str) -> str:
    try:
        return Path(path).read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"--chat-template {path}: cannot read it ({exc})") from None


def use_chat_template(tokenizer: Any, path: str, text: str) -> None:
    """Replace the tokenizer's chat template with ``text`` (read from ``path``), after rendering a
    sample conversation with it: a template that cannot render fails the start, naming the file."""
    sample = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"},
              {"role": "assistant", "content": "a"}, {"role": "user", "content": "u"}]
    try:
        tokenizer.apply_chat_template(sample, chat_template=text, tokenize=False, add_generation_prompt=True)
    except Exception as exc:  # noqa: BLE001 - jinja raises many types; the message is what matters
        raise ConfigError(f"--chat-template {path}: the template does not render a sample conversation: "
                          f"{type(exc).__name__}: {exc}") from None
    tokenizer.chat_template = text
    log.info("chat template from %s replaces the model's own", path)


async def _bring_up(ctx: APIContext, config: ServerConfig) -> Any:
    """Load, start the engine loop, warm up, attach, mark ready. Returns the async engine."""
    from fleetserve_server.engine.async_engine import AsyncEngine
    from fleetserve_server.engine.config import default_max_queue_length

    template = read_chat_template(config.chat_template) if config.chat_template else None  # before the long load
    loaded = await _load_in_thread(config)
    if template is not None:
        use_chat_template(loaded.tokenizer, config.chat_template, template)
    print_memory_plan(loaded, config)
    if config.max_queue_length is None and hasattr(loaded.engine, "set_max_queue_length"):
        # Bounded by default: past it clients get 429 + Retry-After instead of an ever-growing wait.
        loaded.engine.set_max_queue_length(default_max_queue_length(loaded.engine.config))
    log.info("waiting queue bound: %s requests", loaded.engine.config.max_queue_length)
    engine = AsyncEngine(loaded.engine, malloc_trim_seconds=config.malloc_trim_seconds)
    await _maybe_await(engine.start())
    await warm_up(engine, loaded.tokenizer)
    model = ModelInfo(
        served_name=config.resolved_served_name(), max_model_len=int(loaded.max_model_len),
        quantization=str(loaded.quantization), dtype=_dtype_name(loaded.dtype), source=config.model,
        engine_config={**{k: getattr(config, k) for k in _ENGINE_KEYS}, "device": str(loaded.device)},
        default_sampling=sampling_defaults(getattr(loaded, "model_path", None)),
    )
    if model.default_sampling:
        log.info("sampling defaults for requests that omit them: %s", model.default_sampling)
    attach(ctx, engine, loaded.tokenizer, model, weights_bytes=int(loaded.weights_bytes),
           kv_cache_bytes=int(loaded.kv_cache_bytes))
    ctx.state.mark_ready()
    return engine


async def serve(config: ServerConfig) -> int:
    """Run the server until SIGTERM/SIGINT (exit 0 after draining) or a fatal error (exit 1)."""
    served_name = config.resolved_served_name()
    max_request_bytes = config.max_request_bytes or default_max_request_bytes(config.max_model_len)
    try:  # settings that cannot work stop the start here, naming the flag, before the model loads
        capture = open_capture(config.capture_path, fraction=config.capture_fraction,
                               max_bytes=config.capture_max_bytes, max_files=config.capture_max_files,
                               redact=config.capture_redact, default_redaction=config.capture_default_redaction)
        tracing = setup_tracing(config.otlp_endpoint, os.environ, model=served_name)
    except (CaptureConfigError, TracingConfigError) as exc:
        log.error("invalid configuration: %s", exc)
        print(f"fleetserve serve: {exc}", file=sys.stderr, flush=True)
        return 2
    app = create_app(None, served_name=served_name, api_key=config.api_key, log_prompts=config.log_prompts,
                     max_request_bytes=max_request_bytes, capture=capture, tracing=tracing)
    ctx = app_context(app)
    # h11 named, not "auto": the router's extra brings httptools into the same install, and the
    # server's HTTP edge cases (fuzzed, tested) were settled on h11
    server = _Server(uvicorn.Config(app, host=config.host, port=config.port, log_config=None,
                                    access_log=False, timeout_graceful_shutdown=5, lifespan="on", http="h11"))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    server_task = asyncio.create_task(server.serve(), name="uvicorn")
    while not server.started and not server_task.done():
        await asyncio.sleep(0.02)
    if server_task.done():
        log.error("could not start the HTTP server on %s:%s", config.host, config.port)
        return 1
    port = server.servers[0].sockets[0].getsockname()[1] if server.servers else config.port
    log.info("listening", extra={"fields": {"event": "listening", "host": config.host, "port": port,
                                            "model": served_name, "auth": config.api_key is not None}})

    bring_up = asyncio.create_task(_bring_up(ctx, config), name="bring-up")
    stop_wait = asyncio.create_task(stop.wait())
    await asyncio.wait({bring_up, stop_wait, server_task}, return_when=asyncio.FIRST_COMPLETED)
    engine = None
    exit_code = 0
    if bring_up.done() and bring_up.exception() is not None:
        exc = bring_up.exception()
        ctx.state.load_error = f"{type(exc).__name__}: {exc}"
        log.error("model loading failed: %s", ctx.state.load_error, exc_info=exc)
        print(f"fleetserve serve: could not load {config.model}: {exc}", flush=True)
        exit_code = 1
    elif bring_up.done():
        engine = bring_up.result()
        log.info("ready", extra={"fields": {"event": "ready", "port": port, "model": served_name}})
        print(f"fleetserve: ready on http://{config.host}:{port} (model '{served_name}')", flush=True)
        await asyncio.wait({stop_wait, server_task}, return_when=asyncio.FIRST_COMPLETED)
    if server_task.done() and not stop.is_set():
        log.error("the HTTP server stopped unexpectedly")
        exit_code = 1
    if stop.is_set() and exit_code == 0:
        if engine is not None:
            aborted = await ctx.state.drain(config.drain_timeout)
            log.info("drained", extra={"fields": {"event": "drained", "aborted": len(aborted)}})
        else:
            ctx.state.phase = Phase.DRAINING
    bring_up.cancel()
    stop_wait.cancel()
    server.should_exit = True
    with contextlib.suppress(asyncio.CancelledError):
        await server_task
    ctx.state.phase = Phase.STOPPED
    if engine is not None and hasattr(engine, "shutdown"):
        try:
            await _maybe_await(engine.shutdown())
        except Exception:
            log.exception("engine shutdown failed")
    if tracing is not None:
        tracing.shutdown()  # export the spans still buffered
    if capture is not None:
        capture.close()
    log.info("stopped", extra={"fields": {"event": "stopped", "exit_code": exit_code}})
    return exit_code


def describe(config: ServerConfig) -> str:
    """The effective configuration as JSON, without the API key."""
    return json.dumps(config.model_dump(exclude={"api_key"}), sort_keys=True)
