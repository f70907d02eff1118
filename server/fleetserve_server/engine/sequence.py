"""One request's tokens and its progress through the engine."""

from __future__ import annotations

import itertools
from enum import Enum

from fleetserve_server.engine.interfaces import FinishReason, StepLogprobs, TokenGrammar, TokenLogprob
from fleetserve_server.engine.sampling_params import SamplingParams


class SequenceStatus(Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


_seq_ids = itertools.count()


class Sequence:
    """A request as the scheduler and the block manager see it.

    Invariants:
      * ``token_ids`` = prompt tokens followed by generated tokens; it only grows.
      * ``0 <= num_computed_tokens <= len(token_ids)``; positions below
        ``num_computed_tokens`` have their KV in the blocks of ``block_table``
        (position p in ``block_table[p // block_size]``).
      * While RUNNING, ``block_table`` covers at least ``num_computed_tokens``
        positions; while WAITING or FINISHED it is empty.
      * ``block_hashes[i]`` is the chained content hash of full block i
        (a pure function of ``token_ids[: (i + 1) * block_size]``), filled lazily.
    """

    def __init__(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        *,
        arrival_time: float,
        prompt: str | None = None,
    ) -> None:
        self.seq_id = next(_seq_ids)
        self.request_id = request_id
        self.prompt = prompt
        self.params = params
        self.token_ids: list[int] = list(prompt_token_ids)
        self.num_prompt_tokens = len(prompt_token_ids)
        self.status = SequenceStatus.WAITING
        self.num_computed_tokens = 0
        self.block_table: list[int] = []
        self.block_hashes: list[bytes] = []
        # leading blocks of block_table already offered to the prefix cache
        self.num_registered_blocks = 0
        # prompt tokens served from the prefix cache at first admission
        self.num_cached_tokens: int | None = None
        self.num_preemptions = 0
        self.finish_reason: FinishReason | None = None
        # with params.grammar: where the output stands in it (set by the engine at admission,
        # advanced with every appended token, dropped when the sequence finishes)
        self.grammar: TokenGrammar | None = None
        # with params.logprobs: one per output token; with params.prompt_logprobs: one per prompt
        # token, the first None (nothing predicts it), filled as prefill chunks run
        self.output_logprobs: list[TokenLogprob] = []
        self.prompt_logprobs: list[TokenLogprob | None] | None = (
            [None] * self.num_prompt_tokens if params.prompt_logprobs is not None else None)
        # output-quality statistics over the sampled tokens (runners that compute them): sums of
        # each token's log-probability and of its distribution's entropy, and how many tokens
        self.sum_token_logprob = 0.0
        self.sum_token_entropy = 0.0
        self.num_token_stats = 0
        # timings on the engine's clock
        self.arrival_time = arrival_time
        self.first_scheduled_time: float | None = None
        self.first_token_time: float | None = None
        self.finish_time: float | None = None

    def __len__(self) -> int:
        return len(self.token_ids)

    def __repr__(self) -> str:
        return (
            f"Sequence(seq_id={self.seq_id}, request_id={self.request_id!r}, status={self.status.value}, "
            f"len={len(self.token_ids)}, computed={self.num_computed_tokens}, blocks={self.block_table})"
        )

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_uncomputed_tokens(self) -> int:
        """Tokens whose KV still has to be computed; 1 means a decode step."""
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def append_token(self, token_id: int) -> None:
        self.token_ids.append(token_id)

    def record_token_stats(self, logprob: float, entropy: float) -> None:
        self.sum_token_logprob += logprob
        self.sum_token_entropy += entropy
        self.num_token_stats += 1

    def record_logprobs(self, step: StepLogprobs) -> None:
        """Keep what a runner step computed; call before the step's token is appended.
        A recomputation after preemption rewrites the same prompt positions with the same values."""
        if self.prompt_logprobs is not None:
            for position, entry in step.prompt:
                if 0 < position < self.num_prompt_tokens:
                    self.prompt_logprobs[position] = entry
        if step.sampled is not None:
            self.output_logprobs.append(step.sampled)
