"""Trials against the real server: plan each setting, start `fleetserve serve` with it on loopback,
replay the workload's arrivals and lengths at an offered rate, and judge the objective."""

from __future__ import annotations

import asyncio
import os
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fleetserve_server.bench import launch, loadgen
from fleetserve_server.tune.search import Objective, Setting, SettingResult, Trial, capacity_search, judge
from fleetserve_server.tune.workload import Request, Workload


@dataclass(frozen=True)
class Target:
    """Where the settings run: the model, the device and its memory, the context limit."""

    model: str
    device: str  # "cpu" or "cuda"
    device_memory_bytes: int
    device_memory: str  # as the user wrote it, for the report
    max_model_len: int
    threads: int | None = None
    block_size: int = 16


def plan(target: Target, setting: Setting) -> tuple[bool, str, int]:
    """The memory planner's verdict for ``setting``: (fits, message, KV tokens). On CPU the runtime's
    reserve (what Python, torch and the tokenizer hold) comes off the memory first, as the operator does."""
    from fleetserve_server.memory import known_architecture, plan_memory
    from fleetserve_server.runner.factory import (
        CPU_RUNTIME_RESERVE_BYTES,
        DEFAULT_MAX_BATCH_TOKENS,
        cpu_max_batch_tokens,
    )

    arch = known_architecture(target.model)
    if arch is None:
        raise ValueError(f"model {target.model!r} is not in the catalog and is not a directory with config.json")
    memory = target.device_memory_bytes
    if target.device == "cpu":
        memory -= CPU_RUNTIME_RESERVE_BYTES
        if memory < 1:
            return False, "the device memory does not even hold the CPU runtime's 1 GiB reserve", 0
    batch = setting.max_batch_tokens
    if batch is None:
        batch = DEFAULT_MAX_BATCH_TOKENS if target.device != "cpu" else cpu_max_batch_tokens(
            arch, cores=target.threads or len(os.sched_getaffinity(0)), max_model_len=target.max_model_len,
            max_num_seqs=setting.max_num_seqs, block_size=target.block_size)
    try:
        p = plan_memory(arch, quantization=setting.quantization, dtype="auto", device=target.device,
                        device_memory_bytes=memory, kv_cache_memory_fraction=setting.kv_cache_memory_fraction,
                        max_model_len=target.max_model_len, max_num_seqs=setting.max_num_seqs,
                        block_size=target.block_size, max_batch_tokens=batch)
    except ValueError as exc:
        return False, str(exc), 0
    return p.fits, p.message, p.kv_capacity_tokens


def _prompt_ids(salt: int, index: int, n: int, vocab: int) -> list[int]:
    """Distinct token ids per request and per trial (``salt``): no prompt shares a prefix with any other
    the server has seen, so neither a request nor a later trial on the same server is flattered by the
    prefix cache."""
    rng = random.Random(f"{salt}:{index}")
    lo, hi = min(1000, vocab // 4), vocab - 1
    return [rng.randint(lo, hi) for _ in range(n)]


async def _one(client: Any, model: str, salt: int, index: int, req: Request, vocab: int, timeout: float
               ) -> loadgen.RequestResult:
    start = time.perf_counter()
    result = loadgen.RequestResult(conversation=index, turn=0, ok=False, start=start)
    chunks = 0
    try:
        stream = await client.completions.create(
            model=model, prompt=_prompt_ids(salt, index, req.prompt_tokens, vocab), max_tokens=req.output_tokens,
            temperature=0.0, stream=True, stream_options={"include_usage": True},
            extra_body={"ignore_eos": True}, timeout=timeout)
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].text:
                if result.ttft is None:
                    result.ttft = time.perf_counter() - start
                chunks += 1
            if getattr(chunk, "usage", None):
                result.prompt_tokens = chunk.usage.prompt_tokens
                result.output_tokens = chunk.usage.completion_tokens
                details = getattr(chunk.usage, "prompt_tokens_details", None)
                result.cached_tokens = int(getattr(details, "cached_tokens", 0) or 0) if details else 0
        result.e2e = time.perf_counter() - start
        result.output_tokens = result.output_tokens or chunks
        result.ok = True
    except Exception as exc:  # a failed request is a data point of the trial
        result.error = f"{type(exc).__name__}: {exc}"[:300]
        result.e2e = time.perf_counter() - start
    return result


async def replay(base_url: str, model: str, workload: Workload, *, vocab: int, salt: int, timeout: float = 300.0
                 ) -> tuple[list[loadgen.RequestResult], float]:
    """Send each request at its arrival time (open loop: a slow server does not slow the arrivals)."""
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=base_url + "/v1", api_key="none", max_retries=0, timeout=timeout)
    started = time.perf_counter()

    async def at(index: int, req: Request) -> loadgen.RequestResult:
        await asyncio.sleep(max(0.0, req.arrival_s - (time.perf_counter() - started)))
        return await _one(client, model, salt, index, req, vocab, timeout)

    results = await asyncio.gather(*(at(i, r) for i, r in enumerate(workload.requests)))
    duration = time.perf_counter() - started
    await client.close()
    return list(results), duration


def trial_summary(name: str, results: list[loadgen.RequestResult], duration: float) -> dict[str, Any]:
    """The trial's summary, with what the prefix cache served (0 unless the server's cache outlived
    distinct prompts) and each request's [arrival, TTFT, e2e] in seconds after the first request was
    sent, in arrival order (TTFT None: no token) — what :func:`served_rate` reads."""
    summary = loadgen.summarize(name, results, duration).to_dict()
    summary["cached_prompt_tokens"] = sum(r.cached_tokens for r in results)
    t0 = min((r.start for r in results), default=0.0)
    summary["per_request_s"] = [
        [round(r.start - t0, 6), None if r.ttft is None else round(r.ttft, 6), None if r.e2e is None else round(r.e2e, 6)]
        for r in sorted(results, key=lambda r: r.start)]
    return summary


def run_setting(target: Target, setting: Setting, workload: Workload, objective: Objective, *,
                start_rate: float, steps: int, trial_requests: int, log_dir: Path,
                on_trial: Callable[[Trial], None] = lambda t: None, startup_timeout: float = 600.0
                ) -> SettingResult:
    """Plan ``setting``; when it fits, start a server with it and search its capacity."""
    from fleetserve_server.memory import known_architecture

    fits, message, kv_tokens = plan(target, setting)
    result = SettingResult(setting, fits, message, kv_tokens, target.device_memory)
    if not fits:
        return result
    arch = known_architecture(target.model)
    assert arch is not None  # plan() checked
    port = launch.free_port()
    extra = ["--device", target.device, "--quantization", setting.quantization,
             "--max-num-seqs", str(setting.max_num_seqs), "--kv-cache-tokens", str(kv_tokens),
             "--max-model-len", str(target.max_model_len), "--block-size", str(target.block_size),
             "--log-format", "json"]
    if setting.max_batch_tokens is not None:
        extra += ["--max-batch-tokens", str(setting.max_batch_tokens)]
    if target.threads is not None:
        extra += ["--threads", str(target.threads)]
    name = "tune-" + setting.label.replace(" ", "_").replace("=", "")
    try:
        server = launch.start_server(name, launch.fleetserve_argv(target.model, port, extra), port=port,
                                     ready_path="/ready", log_dir=log_dir, timeout=startup_timeout)
    except (RuntimeError, TimeoutError) as exc:
        result.error = f"server did not start: {str(exc)[:2000]}"
        return result
    try:
        import httpx

        model_id = httpx.get(server.base_url + "/v1/models", timeout=30).json()["data"][0]["id"]
        # Warm-up: two requests of the workload's median shape, not measured.
        shapes = sorted(workload.requests, key=lambda r: r.prompt_tokens + r.output_tokens)
        median = shapes[len(shapes) // 2]
        warm = Workload("warm-up", (Request(0.0, median.prompt_tokens, median.output_tokens),) * 2)
        asyncio.run(replay(server.base_url, model_id, warm, vocab=arch.vocab_size, salt=0))
        trial_load = workload.head(trial_requests)
        salts = iter(range(1, 1 << 30))

        def measure(rate: float) -> Trial:
            results, duration = asyncio.run(replay(server.base_url, model_id, trial_load.at_rate(rate),
                                                   vocab=arch.vocab_size, salt=next(salts)))
            trial = judge(objective, setting, rate, trial_summary(setting.label, results, duration))
            on_trial(trial)
            return trial

        result.trials = capacity_search(measure, start_rate, steps)
    except Exception as exc:  # a setting that breaks the server is a finding, not the end of the search
        result.error = f"{type(exc).__name__}: {exc}"[:2000]
        print(f"fleetserve tune: {setting.label}: {result.error}\n{server.log_tail(1500)}", file=sys.stderr)
    finally:
        server.stop()
    return result
