"""The contracts between the engine, the model runner and the HTTP layer.

engine (scheduler, block manager) --ScheduledBatch--> ModelRunner --tokens--> engine
AsyncEngine --RequestOutputDelta / EngineStats--> HTTP layer and metrics
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from fleetserve_server.engine.sampling_params import SamplingParams

FinishReason = Literal["stop", "length", "abort", "error"]


class TokenGrammar(Protocol):
    """One request's position in its ``response_format`` grammar (``runner.grammar.RequestGrammar``).

    The engine calls ``accept`` with every token the sequence gets (``GrammarError`` if it
    is not allowed) and ends the sequence once ``is_complete`` (nothing but a stop token may
    follow). The runner's sampler only reads ``next_mask``, the tokens allowed next.
    """

    next_mask: Any
    is_complete: bool

    def accept(self, token_id: int) -> None: ...


@dataclass(frozen=True)
class ScheduledSequence:
    """One sequence's share of one engine step.

    ``token_ids`` are the tokens whose KV must be computed this step; they sit
    at positions ``start_pos .. start_pos + len(token_ids) - 1``. The KV of all
    earlier positions is already in the paged cache at ``block_table``
    (position p lives in block ``block_table[p // block_size]``, slot
    ``p % block_size``); ``block_table`` already covers every position written
    this step. ``sample`` is true when this chunk ends at the sequence's last
    known token, i.e. the runner must return a next token for it (a prefill
    chunk that is not the last one samples nothing).
    """

    seq_id: int
    token_ids: Sequence[int]
    start_pos: int
    block_table: Sequence[int]
    sample: bool
    params: SamplingParams
    # tokens generated so far (min_tokens; the prompt is history[: len(history) - num_generated])
    num_generated: int = 0
    # the sequence's tokens so far (prompt + output), only when its params need them (penalties)
    history: Sequence[int] = ()
    # with response_format: the request's grammar state (the sampler masks with its next_mask)
    grammar: TokenGrammar | None = None


@dataclass(frozen=True)
class TokenLogprob:
    """A token's log-probability under the model's raw distribution (log-softmax of its logits,
    before temperature, penalties or masks), with the ``top`` most likely alternatives."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass
class StepLogprobs:
    """What a runner step computed for one sequence's logprobs: the sampled token's (if it
    asked for ``logprobs``) and ``(position, logprob of the prompt token at position)`` pairs
    (if it asked for ``prompt_logprobs``)."""

    sampled: TokenLogprob | None = None
    prompt: list[tuple[int, TokenLogprob]] = field(default_factory=list)


@dataclass(frozen=True)
class ScheduledBatch:
    sequences: Sequence[ScheduledSequence]

    @property
    def num_tokens(self) -> int:
        return sum(len(s.token_ids) for s in self.sequences)


class ModelRunner(Protocol):
    """Runs the model over the paged KV cache. The only part that imports torch."""

    block_size: int
    num_blocks: int
    eos_token_ids: frozenset[int]

    def execute(self, batch: ScheduledBatch) -> dict[int, int]:
        """Compute KV for every scheduled token; return seq_id -> sampled token
        for each sequence with ``sample=True``. Per-request seeded generators
        are keyed by seq_id and persist until ``release``. A runner that
        computes logprobs leaves them in ``last_logprobs`` (seq_id ->
        ``StepLogprobs``) until the next call; one that computes the output
        statistics leaves ``last_token_stats`` (seq_id -> (logprob of the sampled
        token, entropy of its distribution))."""
        ...

    def release(self, seq_id: int) -> None:
        """Forget per-sequence state (e.g. its seeded generator)."""
        ...


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: FinishReason | None


@dataclass
class RequestOutput:
    """Offline API result, vLLM-shaped: ``outs[0].outputs[0].text``."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    num_cached_tokens: int = 0


@dataclass(frozen=True)
class OutputStats:
    """What a finished request's output looked like, for the output-quality metrics: the
    temperature it asked for, whether it ran into ``max_tokens``, and the means over its generated
    tokens of the sampled token's log-probability and of the entropy (nats) of the model's
    next-token distribution (both None when the runner does not compute them, or no token came)."""

    temperature: float
    max_tokens_reached: bool
    mean_token_logprob: float | None = None
    mean_token_entropy: float | None = None


@dataclass
class RequestOutputDelta:
    """What the async engine yields per step for one request: the new text and
    tokens since the previous delta. The last delta has ``finish_reason`` set
    and the timing fields filled."""

    request_id: str
    text: str
    token_ids: list[int]
    finish_reason: FinishReason | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_prompt_tokens: int = 0
    # seconds, measured by the engine (None until known)
    queue_time: float | None = None
    time_to_first_token: float | None = None
    e2e_latency: float | None = None
    error: str | None = None
    # with SamplingParams.logprobs: one entry per token in token_ids
    logprobs: list[TokenLogprob] | None = None
    # with SamplingParams.prompt_logprobs, on the first delta with tokens: one per prompt token (the first None)
    prompt_logprobs: list[TokenLogprob | None] | None = None
    # with finish_reason "error": the request field at fault (its own input -> a 400), else None
    error_param: str | None = None
    # on the last delta of a request the engine ran (finish_reason set)
    output_stats: OutputStats | None = None


@dataclass
class EngineStats:
    """A point-in-time snapshot; counters are cumulative since start."""

    requests_waiting: int = 0
    requests_running: int = 0
    kv_blocks_total: int = 0
    kv_blocks_free: int = 0
    kv_cache_usage_ratio: float = 0.0
    kv_capacity_tokens: int = 0
    prefix_cache_queries_tokens: int = 0
    prefix_cache_hits_tokens: int = 0
    evictions: dict[str, int] = field(default_factory=lambda: {"expired": 0, "pressure": 0})
    preemptions: int = 0
    prompt_tokens: int = 0
    generation_tokens: int = 0
    steps: int = 0
    # batch sizes (sequences per step) of the steps since the previous snapshot
    recent_batch_sizes: list[int] = field(default_factory=list)


class EngineClient(Protocol):
    """What the HTTP layer talks to (the real AsyncEngine or a fake in tests)."""

    def generate(
        self, request_id: str, prompt: str | list[int], params: SamplingParams
    ) -> AsyncIterator[RequestOutputDelta]:
        """An async generator (``async def`` with ``yield``): validation errors,
        ``QueueFullError`` and ``EngineDrainingError`` raise on the first
        ``anext`` before anything is yielded; the last delta has a finish_reason."""
        ...

    async def abort(self, request_id: str) -> None:
        ...

    async def check_health(self) -> None:
        """Raise if the engine loop is dead."""
        ...

    def stats(self) -> EngineStats:
        ...
