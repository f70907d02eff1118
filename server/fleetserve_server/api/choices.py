"""Several engine requests answering one HTTP request: ``n`` copies of a prompt and/or a batch of prompts.

Choice ``index = prompt_index * n + copy``. Copy 0 of each prompt is admitted
first; when ``n > 1`` the others are admitted once its prompt has been
computed, so that they find the prompt's full KV blocks in the prefix cache
and share them (reference-counted) instead of computing and storing the
prompt n times. Copy j of a seeded request uses ``seed + j`` (vLLM's rule), so
the copies differ and the whole answer stays reproducible.

``RunGroup`` offers what the streaming code reads from one ``GenerationRun``
(``first_pending``, ``wait_first``, ``deltas()``, ``usage``), with the deltas
of all runs merged as they come.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Coroutine
from typing import Any

from starlette.requests import Request

from fleetserve_server.api.context import APIContext
from fleetserve_server.api.generation import GenerationRun, start_run
from fleetserve_server.api.protocol import UsageInfo
from fleetserve_server.api.state import Serving
from fleetserve_server.engine.interfaces import RequestOutputDelta
from fleetserve_server.engine.sampling_params import MAX_SEED, SamplingParams

_END = object()
# How long copy 0's prompt may take before the other copies are admitted anyway (unshared).
SHARE_WAIT_SECONDS = 600.0


class RunGroup:
    """The runs of one HTTP request, in choice order; ``index_of`` maps a delta to its choice."""

    def __init__(self, runs: list[GenerationRun], prompts: list[list[int]]) -> None:
        self.runs = runs
        self.prompts = prompts
        self._index = {run.engine_id: i for i, run in enumerate(runs)}

    @property
    def engine_id(self) -> str:
        return self.runs[0].engine_id

    @property
    def created(self) -> int:
        return self.runs[0].created

    @property
    def sse_keepalive_seconds(self) -> float:
        return self.runs[0].sse_keepalive_seconds

    @property
    def first_pending(self) -> bool:
        return all(run.first_pending for run in self.runs)

    async def wait_first(self, timeout: float) -> bool:
        pending = [run for run in self.runs if run.first_pending]
        if len(pending) < len(self.runs):
            return True
        done = await asyncio.gather(*(run.wait_first(timeout) for run in pending))
        return any(done)

    def index_of(self, delta: RequestOutputDelta) -> int:
        return self._index[delta.request_id]

    async def deltas(self) -> AsyncIterator[RequestOutputDelta]:
        """Every run's deltas, merged in arrival order; an error in one run ends them all (the
        others are cancelled, which aborts them in the engine)."""
        if len(self.runs) == 1:
            async for delta in self.runs[0].deltas():
                yield delta
            return
        queue: asyncio.Queue[Any] = asyncio.Queue()

        async def pump(run: GenerationRun) -> None:
            try:
                async for delta in run.deltas():
                    queue.put_nowait(delta)
            except Exception as exc:  # noqa: BLE001 - handed to the consumer, which raises it
                queue.put_nowait(exc)
            finally:
                queue.put_nowait(_END)

        tasks = [asyncio.create_task(pump(run)) for run in self.runs]
        remaining = len(tasks)
        try:
            while remaining:
                item = await queue.get()
                if item is _END:
                    remaining -= 1
                elif isinstance(item, Exception):
                    raise item
                else:
                    yield item
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    @property
    def usage(self) -> UsageInfo:
        """Prompt tokens count once per prompt (not per copy), as OpenAI counts them for ``n``."""
        n = len(self.runs) // len(self.prompts)
        usages = [run.usage for run in self.runs]
        prompt = sum(u.prompt_tokens for u in usages[::n])
        completion = sum(u.completion_tokens for u in usages)
        cached = sum((u.prompt_tokens_details or {}).get("cached_tokens", 0) for u in usages[::n])
        return UsageInfo(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion,
                         prompt_tokens_details={"cached_tokens": cached})


def copy_params(params: SamplingParams, copy: int) -> SamplingParams:
    if copy == 0 or params.seed is None:
        return params
    return dataclasses.replace(params, seed=(params.seed + copy) % MAX_SEED)


async def start_group(ctx: APIContext, http_request: Request, serving: Serving, *, endpoint: str,
                      prompts: list[list[int]], params: list[SamplingParams], n: int,
                      log_prompts: list[Any]) -> RunGroup:
    """Admit ``n`` copies of each prompt (``params[i]`` for prompt i); errors raise before any
    response, and then every run already admitted is aborted."""
    started: dict[int, GenerationRun] = {}

    async def admit(index: int, prompt: list[int], run_params: SamplingParams) -> None:
        started[index] = await start_run(ctx, http_request, serving, endpoint=endpoint, prompt_ids=prompt,
                                         params=run_params, log_prompt=log_prompts[index // n])

    try:
        await _together([admit(p * n, prompt, params[p]) for p, prompt in enumerate(prompts)])
        if n > 1:
            # the prompts are computed (and their full blocks in the prefix cache) at the first output
            await asyncio.gather(*(started[p * n].wait_first(SHARE_WAIT_SECONDS) for p in range(len(prompts))))
            await _together([admit(p * n + copy, prompt, copy_params(params[p], copy))
                             for p, prompt in enumerate(prompts) for copy in range(1, n)])
    except BaseException:
        for run in started.values():
            run._end(aborted=True)  # noqa: SLF001 - release and abort the admitted ones
        raise
    return RunGroup([started[i] for i in range(len(prompts) * n)], prompts)


async def _together(admissions: list[Coroutine[Any, Any, None]]) -> None:
    """Run the admissions at once, in order, so the engine computes the runs in the same steps (one
    after another, each would wait for its first output, up to the first-output grace: a batch of
    scoring prompts ran one per step). On an error the others are cancelled and settled first, so
    every run admitted is in ``started`` for the caller to abort."""
    tasks = [asyncio.ensure_future(admission) for admission in admissions]
    try:
        await asyncio.gather(*tasks)
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise
