"""The synchronous engine: requests in, one batched model step at a time, output deltas out."""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from fleetserve_server.engine.block_manager import BlockManager
from fleetserve_server.engine.config import EngineConfig
from fleetserve_server.engine.detokenizer import IncrementalDetokenizer, find_stop, partial_stop_len
from fleetserve_server.engine.errors import (
    GrammarError,
    QueueFullError,
    RequestValidationError,
    SequenceError,
)
from fleetserve_server.engine.interfaces import (
    EngineStats,
    FinishReason,
    ModelRunner,
    OutputStats,
    RequestOutputDelta,
    ScheduledBatch,
)
from fleetserve_server.engine.sampling_params import SamplingParams
from fleetserve_server.engine.scheduler import Scheduler
from fleetserve_server.engine.sequence import Sequence, SequenceStatus
from fleetserve_server.engine.tokenizer import Tokenizer

log = logging.getLogger(__name__)


# Batch sizes kept between two stats() calls at most (one int per engine step).
MAX_RECENT_BATCH_SIZES = 10_000


@dataclass
class _RequestState:
    """Output-side state of one request: its detokenizer and streamed text."""

    seq: Sequence
    detokenizer: IncrementalDetokenizer
    text: str = ""
    num_emitted_chars: int = 0
    new_token_ids: list[int] = field(default_factory=list)


class LLMEngine:
    """Owns the scheduler, the block manager and the model runner; ``step()``
    runs one batch and returns what each request gained.

    Not thread-safe, except ``stats()`` and ``make_sequence()``, which may be
    called from another thread while ``step()`` runs (``AsyncEngine`` does).
    Invalid requests raise ``RequestValidationError`` from ``add_request`` and
    never reach the scheduler, so one bad request cannot affect others. A
    failure inside a step that belongs to some requests (``SequenceError`` from
    the runner, an exception while turning one request's token into text)
    finishes those requests with ``finish_reason="error"`` and ``error`` set;
    the others keep their progress. Any other exception from the runner
    propagates: the step cannot be attributed to a request.
    """

    def __init__(
        self,
        config: EngineConfig,
        runner: ModelRunner,
        tokenizer: Tokenizer,
        clock: Callable[[], float] = time.monotonic,
        *,
        vocab_size: int | None = None,
    ) -> None:
        if runner.block_size != config.block_size or runner.num_blocks != config.num_blocks:
            raise ValueError(
                f"the model runner's KV cache ({runner.num_blocks} blocks of {runner.block_size}) does not match "
                f"the engine config ({config.num_blocks} blocks of {config.block_size}); build both from one plan"
            )
        self.config = config
        self.runner = runner
        self.tokenizer = tokenizer
        self.clock = clock
        self.vocab_size = vocab_size if vocab_size is not None else getattr(runner, "vocab_size", None)
        self.block_manager = BlockManager(
            config.num_blocks,
            config.block_size,
            enable_prefix_caching=config.enable_prefix_caching,
            cache_ttl_seconds=config.cache_ttl_seconds,
            clock=clock,
        )
        self.scheduler = Scheduler(config, self.block_manager)
        self._requests: dict[str, _RequestState] = {}
        self._pending: list[RequestOutputDelta] = []  # abort deltas for the next step()
        self._stats_lock = threading.Lock()
        self._recent_batch_sizes: list[int] = []
        self.num_steps = 0
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self._mean_e2e: float | None = None  # moving average of finished requests' latency

    # ---- requests ----------------------------------------------------------

    def make_sequence(self, request_id: str, prompt: str | list[int], params: SamplingParams) -> Sequence:
        """Validate and tokenize a request without touching engine state."""
        if not isinstance(params, SamplingParams):
            raise RequestValidationError(f"params must be SamplingParams, got {type(params).__name__}")
        if isinstance(prompt, str):
            if not prompt:
                raise RequestValidationError("prompt is empty; send at least one token", param="prompt")
            token_ids = list(self.tokenizer.encode(prompt, add_special_tokens=True))
            text: str | None = prompt
        else:
            token_ids = list(prompt)
            text = None
            bad = [t for t in token_ids if isinstance(t, bool) or not isinstance(t, int) or t < 0
                   or (self.vocab_size is not None and t >= self.vocab_size)]
            if bad:
                limit = f" below the vocabulary size {self.vocab_size}" if self.vocab_size else ""
                raise RequestValidationError(
                    f"prompt token ids must be integers >= 0{limit}; got {bad[:5]!r}", param="prompt"
                )
        if not token_ids:
            raise RequestValidationError("prompt is empty; send at least one token", param="prompt")
        n, limit_len = len(token_ids), self.config.max_model_len
        if n >= limit_len:
            raise RequestValidationError(
                f"the prompt has {n} tokens but max_model_len is {limit_len}: at most {limit_len - 1} prompt "
                "tokens leave room for one output token; shorten the prompt",
                param="prompt",
            )
        if n + params.max_tokens > limit_len:
            raise RequestValidationError(
                f"prompt ({n} tokens) + max_tokens ({params.max_tokens}) = {n + params.max_tokens} exceeds "
                f"max_model_len {limit_len}; set max_tokens to at most {limit_len - n} or shorten the prompt",
                param="max_tokens",
            )
        if any(isinstance(t, bool) or not isinstance(t, int) for t in params.stop_token_ids):
            raise RequestValidationError("stop_token_ids must be integers", param="stop_token_ids")
        seq = Sequence(request_id, token_ids, params, arrival_time=self.clock(), prompt=text)
        if params.grammar is not None:
            try:
                seq.grammar = params.grammar.matcher()
            except Exception as exc:  # noqa: BLE001 - a broken grammar is this request's problem
                raise RequestValidationError(f"response_format: the grammar cannot start ({exc})",
                                             param="response_format") from None
        return seq

    def add_sequence(self, seq: Sequence) -> None:
        """Queue a sequence made by ``make_sequence``."""
        if seq.request_id in self._requests:
            raise RequestValidationError(f"request id {seq.request_id!r} is already in flight", param="request_id")
        max_queue = self.config.max_queue_length
        if max_queue is not None and len(self.scheduler.waiting) >= max_queue:
            raise QueueFullError(
                f"the waiting queue is full ({max_queue} requests); retry later",
                retry_after=self.retry_after_estimate(),
            )
        self._requests[seq.request_id] = _RequestState(
            seq, IncrementalDetokenizer(self.tokenizer, seq.token_ids, skip_special_tokens=True)
        )
        self.scheduler.add(seq)

    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams) -> list[int]:
        """Validate and queue a request; returns its prompt token ids."""
        seq = self.make_sequence(request_id, prompt, params)
        self.add_sequence(seq)
        return list(seq.token_ids)

    def abort_request(self, request_id: str) -> None:
        """Stop a request now and free its KV blocks; the next ``step()`` returns
        its final delta with ``finish_reason="abort"``. Unknown ids are ignored."""
        state = self._requests.get(request_id)
        if state is None:
            return
        self._finish(state, "abort")
        self._pending.append(self._delta(state, finished=True))

    def set_max_queue_length(self, max_queue_length: int | None) -> None:
        """Change the waiting-queue bound (the server sets its default once the KV cache is sized)."""
        self.config = dataclasses.replace(self.config, max_queue_length=max_queue_length)
        self.scheduler.config = self.config

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished() or bool(self._pending)

    @property
    def num_unfinished(self) -> int:
        return self.scheduler.num_unfinished

    def retry_after_estimate(self) -> float:
        """Seconds a rejected client should wait: how long the queue ahead of it takes to
        drain, from the recent mean request latency; between 1 and 60 s."""
        if self._mean_e2e is None:
            return 1.0
        batches_ahead = (len(self.scheduler.waiting) + 1) / self.config.max_num_seqs
        return max(1.0, min(60.0, batches_ahead * self._mean_e2e))

    # ---- the step ----------------------------------------------------------

    def step(self) -> list[RequestOutputDelta]:
        """Schedule a batch, run it, and turn sampled tokens into output deltas."""
        self.expire_cache()
        deltas, self._pending = self._pending, []
        out = self.scheduler.schedule()
        if out.is_empty:
            return deltas
        now = self.clock()
        for seq, _ in out.scheduled:
            if seq.first_scheduled_time is None:
                seq.first_scheduled_time = now
                self.prompt_tokens += seq.num_prompt_tokens
        by_id = {seq.seq_id: seq for seq, _ in out.scheduled}
        sampled = self._execute(out.batch, by_id, deltas)
        for seq_id, step_logprobs in (getattr(self.runner, "last_logprobs", None) or {}).items():
            if seq_id in by_id and (seq_id in sampled or step_logprobs.prompt):
                by_id[seq_id].record_logprobs(step_logprobs)  # before update() appends the token
        for seq_id, (logprob, entropy) in (getattr(self.runner, "last_token_stats", None) or {}).items():
            if seq_id in sampled and seq_id in by_id:
                by_id[seq_id].record_token_stats(logprob, entropy)
        got_token = self.scheduler.update(out, sampled)
        now = self.clock()
        self.num_steps += 1
        with self._stats_lock:
            # Drained by every stats() call (each /metrics scrape); a server nobody scrapes must not
            # grow by one entry per step for days, so past the bound the histogram just misses steps.
            if len(self._recent_batch_sizes) < MAX_RECENT_BATCH_SIZES:
                self._recent_batch_sizes.append(len(out.scheduled))
        for seq in got_token:
            state = self._requests[seq.request_id]
            try:
                deltas.append(self._process_token(state, now))
            except GrammarError as exc:  # this request's grammar alone: the others go on
                log.warning("request %s failed in its grammar: %s", seq.request_id, exc)
                deltas.append(self._fail(state, f"structured output failed: {exc}", None))
            except Exception as exc:  # noqa: BLE001 - this request's output alone is broken
                log.exception("processing the output of request %s failed", seq.request_id)
                deltas.append(self._fail(state, f"internal error while processing the output "
                                                f"({type(exc).__name__}); the request was stopped", None))
        return deltas

    def _execute(self, batch: ScheduledBatch, by_id: dict[int, Sequence],
                 deltas: list[RequestOutputDelta]) -> dict[int, int]:
        """Run the batch; on a ``SequenceError`` fail the rows it names and run the rest again.

        Running again is safe: the forward rewrites the same KV at the same
        slots, and the runner raises ``SequenceError`` before it draws any
        per-row randomness, so the surviving rows sample what they would have.
        An error naming no row of this batch is not attributable: it propagates.
        """
        for _ in range(len(batch.sequences)):
            try:
                return self.runner.execute(batch)
            except SequenceError as exc:
                in_batch = {s.seq_id for s in batch.sequences}
                bad = [i for i in dict.fromkeys(exc.seq_ids) if i in in_batch and i in by_id]
                if not bad:
                    raise
                log.warning("failing %d request(s) alone: %s", len(bad), exc)
                for seq_id in bad:
                    state = self._requests.get(by_id[seq_id].request_id)
                    if state is not None:
                        deltas.append(self._fail(state, exc.reason, exc.param))
                remaining = [s for s in batch.sequences if s.seq_id not in bad]
                if not remaining:
                    return {}
                batch = ScheduledBatch(remaining)
        return self.runner.execute(batch)

    def _fail(self, state: _RequestState, message: str, param: str | None) -> RequestOutputDelta:
        """Finish one request with ``finish_reason="error"``: blocks freed, runner state released."""
        if state.seq.request_id in self._requests:
            self._finish(state, "error")
        delta = self._delta(state, finished=True)
        delta.finish_reason = "error"
        delta.error = message
        delta.error_param = param
        return delta

    def expire_cache(self) -> int:
        """Free prefix-cache blocks idle past ``cache_ttl_seconds``."""
        return self.block_manager.expire()

    def reset_prefix_cache(self) -> int:
        """Drop every cached block nobody references (e.g. to measure a cold start);
        returns how many. Not counted as evictions."""
        return self.block_manager.reset_prefix_cache()

    def _process_token(self, state: _RequestState, now: float) -> RequestOutputDelta:
        seq, params = state.seq, state.seq.params
        token = seq.token_ids[-1]
        self.generation_tokens += 1
        state.new_token_ids.append(token)
        if seq.first_token_time is None:
            seq.first_token_time = now
        reason: FinishReason | None = None
        stopped_on_string = False
        if seq.grammar is not None:
            seq.grammar.accept(token)  # GrammarError: step() fails this request alone
        if (token in self.runner.eos_token_ids and not params.ignore_eos) or token in params.stop_token_ids:
            reason = "stop"  # the stop token's text is not part of the output
        else:
            new_text = state.detokenizer.add(token)
            if new_text and self._append_text(state, new_text):
                reason, stopped_on_string = "stop", True
        if reason is None and seq.grammar is not None and seq.grammar.is_complete:
            reason = "stop"  # the JSON value is complete: nothing but a stop token could follow
        if reason is None and (seq.num_output_tokens >= params.max_tokens or len(seq) >= self.config.max_model_len):
            reason = "length"
        if reason is not None:
            if not stopped_on_string:
                # the end: release text held back for an incomplete character
                held = state.detokenizer.flush()
                if held and self._append_text(state, held):
                    reason = "stop"
            seq.finish_time = now
            self._finish(state, reason)
        return self._delta(state, finished=reason is not None)

    def _append_text(self, state: _RequestState, new_text: str) -> bool:
        """Add decoded text; on a stop string cut the text before it and return True."""
        start = len(state.text)
        state.text += new_text
        stops = state.seq.params.stop
        if stops:
            idx = find_stop(state.text, stops, start)
            if idx != -1:
                state.text = state.text[:idx]
                return True
        return False

    def _finish(self, state: _RequestState, reason: FinishReason) -> None:
        seq = state.seq
        if seq.finish_time is None:
            seq.finish_time = self.clock()
        if reason not in ("abort", "error"):
            e2e = seq.finish_time - seq.arrival_time
            self._mean_e2e = e2e if self._mean_e2e is None else 0.8 * self._mean_e2e + 0.2 * e2e
        self.scheduler.finish(seq, reason)
        seq.grammar = None  # the matcher is this request's alone: freed with it
        self.runner.release(seq.seq_id)
        del self._requests[seq.request_id]

    def _delta(self, state: _RequestState, *, finished: bool) -> RequestOutputDelta:
        seq = state.seq
        end = len(state.text)
        if not finished and seq.params.stop:
            end -= partial_stop_len(state.text, seq.params.stop)  # may still become a stop string
        end = max(end, state.num_emitted_chars)
        text = state.text[state.num_emitted_chars : end]
        state.num_emitted_chars = end
        token_ids, state.new_token_ids = state.new_token_ids, []
        first = seq.first_token_time is not None and seq.num_output_tokens == 1
        delta = RequestOutputDelta(
            request_id=seq.request_id,
            text=text,
            token_ids=token_ids,
            finish_reason=seq.finish_reason if finished else None,
            prompt_tokens=seq.num_prompt_tokens,
            completion_tokens=seq.num_output_tokens,
            cached_prompt_tokens=seq.num_cached_tokens or 0,
        )
        if seq.params.logprobs is not None and token_ids:
            delta.logprobs = seq.output_logprobs[seq.num_output_tokens - len(token_ids) : seq.num_output_tokens]
        if seq.prompt_logprobs is not None and token_ids and seq.num_output_tokens == len(token_ids):
            delta.prompt_logprobs = seq.prompt_logprobs  # the first delta with tokens: the prompt is done
        if finished or first:
            if seq.first_scheduled_time is not None:
                delta.queue_time = seq.first_scheduled_time - seq.arrival_time
            if seq.first_token_time is not None:
                delta.time_to_first_token = seq.first_token_time - seq.arrival_time
        if finished and seq.finish_time is not None:
            delta.e2e_latency = seq.finish_time - seq.arrival_time
        if finished:
            delta.output_stats = OutputStats(
                temperature=seq.params.temperature,
                max_tokens_reached=seq.finish_reason == "length" and seq.num_output_tokens >= seq.params.max_tokens,
                mean_token_logprob=(seq.sum_token_logprob / seq.num_token_stats) if seq.num_token_stats else None,
                mean_token_entropy=(seq.sum_token_entropy / seq.num_token_stats) if seq.num_token_stats else None)
        return delta

    # ---- stats -------------------------------------------------------------

    def stats(self) -> EngineStats:
        """A snapshot; ``recent_batch_sizes`` holds the steps since the previous call."""
        bm = self.block_manager
        with self._stats_lock:
            batch_sizes, self._recent_batch_sizes = self._recent_batch_sizes, []
        return EngineStats(
            requests_waiting=len(self.scheduler.waiting),
            requests_running=len(self.scheduler.running),
            kv_blocks_total=bm.num_blocks,
            kv_blocks_free=bm.num_free_blocks,
            kv_cache_usage_ratio=bm.usage_ratio,
            kv_capacity_tokens=bm.num_blocks * bm.block_size,
            prefix_cache_queries_tokens=bm.prefix_queries_tokens,
            prefix_cache_hits_tokens=bm.prefix_hits_tokens,
            evictions=dict(bm.evictions),
            preemptions=self.scheduler.num_preemptions,
            prompt_tokens=self.prompt_tokens,
            generation_tokens=self.generation_tokens,
            steps=self.num_steps,
            recent_batch_sizes=batch_sizes,
        )

    def is_running(self, request_id: str) -> bool:
        state = self._requests.get(request_id)
        return state is not None and state.seq.status is SequenceStatus.RUNNING
