"""Iteration-level continuous batching over the paged KV cache."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from fleetserve_server.engine.block_manager import BlockManager
from fleetserve_server.engine.config import EngineConfig
from fleetserve_server.engine.interfaces import FinishReason, ScheduledBatch, ScheduledSequence
from fleetserve_server.engine.sequence import Sequence, SequenceStatus


@dataclass
class SchedulerOutput:
    """One step's plan: the batch for the runner and, in the same order, how
    many tokens of which sequence it computes."""

    batch: ScheduledBatch
    scheduled: list[tuple[Sequence, int]] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


class Scheduler:
    """Decides, every step, which tokens of which sequences are computed.

    Every step, within ``max_batch_tokens`` tokens:
      1. each running sequence that is decoding gets its one token, oldest
         first (decodes go first so a long prompt never stalls them); when its
         next token needs a KV block and none is free, the newest running
         sequence is preempted (blocks freed, recomputed later) until one is;
      2. running sequences still in prefill get their next chunk;
      3. waiting sequences are admitted in arrival order (FCFS: the head of
         the queue is never overtaken) while ``max_num_seqs`` and the free
         blocks allow, each starting with as much of its prompt as the budget
         leaves (chunked prefill; without it a prompt must fit whole).

    Invariants: every RUNNING sequence holds blocks for all its tokens known
    at admission; WAITING ones hold none; ``len(running) <= max_num_seqs``; a
    sequence appears at most once per batch.
    """

    def __init__(self, config: EngineConfig, block_manager: BlockManager) -> None:
        self.config = config
        self.block_manager = block_manager
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # admission order, newest last
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    # ---- scheduling -------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        budget = self.config.max_batch_tokens
        scheduled: list[tuple[Sequence, int]] = []
        preempted: list[Sequence] = []
        bm = self.block_manager

        # 1. decodes, oldest first; preempt the newest when a block is missing
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            if seq.num_uncomputed_tokens != 1:
                i += 1
                continue
            while not bm.can_append(seq):
                victim = self.running[-1]
                self._preempt(victim)
                preempted.append(victim)
                if victim is seq:
                    break
            if seq.status is not SequenceStatus.RUNNING:
                break  # it preempted itself: nothing newer is left
            bm.append(seq)
            scheduled.append((seq, 1))
            budget -= 1
            i += 1

        # 2. running sequences in the middle of their prefill (decodes have
        #    exactly one uncomputed token and were handled above)
        for seq in self.running:
            if budget <= 0:
                break
            if seq.num_uncomputed_tokens > 1:
                chunk = self._chunk(seq.num_uncomputed_tokens, budget)
                if chunk and bm.can_append(seq):
                    bm.append(seq)  # a no-op: admission allocated the whole prompt
                    scheduled.append((seq, chunk))
                    budget -= chunk

        # 3. admit waiting sequences in arrival order
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            if not self.config.enable_chunked_prefill and len(seq) > budget:
                break
            if not bm.can_allocate(seq):
                break
            self.waiting.popleft()
            bm.allocate(seq)
            if seq.num_cached_tokens is None:
                seq.num_cached_tokens = seq.num_computed_tokens
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            chunk = self._chunk(seq.num_uncomputed_tokens, budget)
            if chunk:
                scheduled.append((seq, chunk))
                budget -= chunk

        return SchedulerOutput(self._build_batch(scheduled), scheduled, preempted)

    def _chunk(self, remaining: int, budget: int) -> int:
        if remaining <= budget:
            return remaining
        return budget if self.config.enable_chunked_prefill else 0

    @staticmethod
    def _build_batch(scheduled: list[tuple[Sequence, int]]) -> ScheduledBatch:
        seqs = []
        for seq, n in scheduled:
            start = seq.num_computed_tokens
            seqs.append(
                ScheduledSequence(
                    seq_id=seq.seq_id,
                    token_ids=seq.token_ids[start : start + n],
                    start_pos=start,
                    block_table=tuple(seq.block_table),
                    sample=start + n == len(seq.token_ids),
                    params=seq.params,
                    num_generated=seq.num_output_tokens,
                    history=seq.token_ids if seq.params.has_penalties or seq.params.prompt_logprobs is not None else (),
                    grammar=seq.grammar,
                )
            )
        return ScheduledBatch(seqs)

    def _preempt(self, seq: Sequence) -> None:
        """Free the sequence's blocks and put it back at the head of the queue;
        it will be recomputed (its full blocks likely from the prefix cache)."""
        self.running.remove(seq)
        self.block_manager.free(seq)
        seq.num_computed_tokens = 0
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    # ---- after the step ---------------------------------------------------

    def update(self, output: SchedulerOutput, sampled: dict[int, int]) -> list[Sequence]:
        """Advance the scheduled sequences by what the runner computed and
        append their sampled tokens; returns the sequences that got a token."""
        got_token: list[Sequence] = []
        for seq, n in output.scheduled:
            if seq.status is not SequenceStatus.RUNNING:
                continue  # aborted while the step ran
            sample = seq.num_computed_tokens + n == len(seq.token_ids)
            seq.num_computed_tokens += n
            self.block_manager.mark_computed(seq)
            if sample:
                token = sampled.get(seq.seq_id)
                if token is None:
                    raise RuntimeError(f"the model runner returned no token for sequence {seq.seq_id}")
                seq.append_token(token)
                got_token.append(seq)
        return got_token

    def finish(self, seq: Sequence, reason: FinishReason) -> None:
        """Finish a sequence (done or aborted): its blocks are released at once."""
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
            self.block_manager.free(seq)
        elif seq.status is SequenceStatus.WAITING:
            self.waiting.remove(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
