"""``TorchModelRunner``: the engine's ``ModelRunner`` over ``PagedCausalLM``.

Owns the paged KV cache tensor and the sampler. Per step it turns a
``ScheduledBatch`` into flat tensors (one ``torch.tensor`` call per field),
runs one forward, and samples only for the sequences that ask for a token —
logits are computed for those rows alone (the lm_head over a 49k vocabulary
is the costliest matmul of a decode step).
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import sys
from dataclasses import dataclass
from typing import Any

import torch

from fleetserve_server.engine.interfaces import ScheduledBatch, ScheduledSequence, StepLogprobs
from fleetserve_server.runner.model import PagedCausalLM, StepMetadata
from fleetserve_server.runner.sampler import Sampler, distribution_stats, token_stats


@dataclass(frozen=True)
class StepPlan:
    """One step in plain ints, what rank 0 broadcasts to tensor-parallel workers: the token ids
    and their positions, the cache slot each token's KV goes to, each decode sequence's block
    table and context length (decode sequences first), each multi-token chunk (token slice start,
    length, start position, its block table) and the flat
    indices of the tokens whose logits are wanted."""

    ids: list[int]
    positions: list[int]
    slots: list[int]
    decode_tables: list[list[int]]
    decode_lens: list[int]
    prefills: list[tuple[int, int, int, list[int] | None]]
    logits_idx: list[int]


class TorchModelRunner:
    """Implements ``engine.interfaces.ModelRunner``.

    Invariant: ``kv_cache`` has shape ``[layers, 2, kv_heads, num_blocks *
    block_size, head_dim]`` (see ``model``) and is allocated once; its size is exactly
    ``num_blocks x block_size x kv_bytes_per_token`` (what the planner predicts).
    """

    def __init__(
        self,
        model: PagedCausalLM,
        *,
        num_blocks: int,
        block_size: int,
        eos_token_ids: frozenset[int],
        seed: int = 0,
        workers: Any = None,
    ) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"num_blocks and block_size must be >= 1, got {num_blocks}, {block_size}")
        self.model = model
        model.pack_cpu_linears()
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.eos_token_ids = frozenset(eos_token_ids)
        self.device = model.device
        self.vocab_size = model.vocab_size
        self.kv_cache = _zeros(
            (model.num_layers, 2, model.num_kv_heads, num_blocks * block_size, model.head_dim),
            model.dtype, self.device,
        )
        # seq_id -> the logprobs the last execute() computed (see ModelRunner.execute)
        self.last_logprobs: dict[int, StepLogprobs] = {}
        # seq_id -> (logprob of the sampled token, entropy of its distribution), for the
        # output-quality metrics; like last_logprobs, valid until the next execute()
        self.last_token_stats: dict[int, tuple[float, float]] = {}
        self.sampler = Sampler(self.device, base_seed=seed, eos_token_ids=self.eos_token_ids)
        self._row_base = torch.arange(2 * model.num_kv_heads, device=self.device) * (num_blocks * block_size)
        # tensor parallelism: the model's collectives (every rank) and, on rank 0, the workers
        self.tp = model.tp
        self.workers = workers

    @property
    def kv_cache_bytes(self) -> int:
        return self.kv_cache.numel() * self.kv_cache.element_size()

    def release(self, seq_id: int) -> None:
        self.sampler.release(seq_id)

    def check_health(self) -> None:
        """Raise ``WorkerFailedError`` when a tensor-parallel worker is gone (no-op without workers)."""
        if self.workers is not None:
            problem = self.workers.check_health()
            if problem:
                from fleetserve_server.runner.distributed import WorkerFailedError

                raise WorkerFailedError(problem)

    def close(self) -> None:
        """Stop the tensor-parallel workers (idempotent; no-op without them)."""
        if self.workers is not None:
            self.workers.stop()

    @torch.inference_mode()
    def follow(self) -> None:
        """A worker rank's loop: run rank 0's plans on this shard until it sends the stop plan."""
        while (plan := self.tp.recv_plan()) is not None:
            input_ids, meta = self._tensors(plan)
            self.model(input_ids, meta, self.kv_cache)

    def warmup(self, prefill_tokens: int = 2, decode_batch: int = 1) -> None:
        """Run one ``prefill_tokens``-token prefill, then one decode step of ``decode_batch``
        sequences over that context, on the first blocks (free blocks: overwritten later).
        A full step budget and a full decode batch allocate a step's largest activations
        (and grow the allocator's heap to them) once, so the process's resident memory after
        warm-up is what it keeps under load."""
        from fleetserve_server.engine.sampling_params import SamplingParams

        n = max(1, min(prefill_tokens, self.model.max_positions - 1, self.num_blocks * self.block_size - 1))
        table = list(range(n // self.block_size + 1))
        greedy = SamplingParams(max_tokens=1, temperature=0.0)
        first = ScheduledSequence(-1, [0] * n, 0, table, True, greedy)
        self.execute(ScheduledBatch([first]))
        self.execute(ScheduledBatch([ScheduledSequence(-1 - i, [0], n, table, True, greedy)
                                     for i in range(max(1, decode_batch))]))
        for i in range(max(1, decode_batch)):
            self.release(-1 - i)

    @torch.inference_mode()
    def execute(self, batch: ScheduledBatch) -> dict[int, int]:
        if not batch.sequences:
            return {}
        self.last_logprobs = {}
        self.last_token_stats = {}
        plan, sample_rows, prompt_rows = self._prepare(batch)
        if self.tp is not None:
            self.check_health()  # a clear error, not a collective's, when a worker is gone
            self.tp.broadcast_plan(plan)
        input_ids, meta = self._tensors(plan)
        logits = self.model(input_ids, meta, self.kv_cache)
        n_sample = len(sample_rows)
        if prompt_rows:
            self._prompt_logprobs(logits[n_sample:], prompt_rows)
        if not sample_rows:
            return {}
        logits = logits[:n_sample]
        lse, entropy = distribution_stats(logits)  # before sample(): a grammar may mask rows in place
        tokens = self.sampler.sample(logits, sample_rows)
        self.last_token_stats = {row.seq_id: stats for row, stats in
                                 zip(sample_rows, token_stats(logits, lse, entropy, tokens), strict=True)}
        wanted = [i for i, row in enumerate(sample_rows) if row.params.logprobs is not None]
        if wanted:
            index = torch.tensor(wanted, device=logits.device)
            entries = self.sampler.logprobs(logits[index], [tokens[i] for i in wanted],
                                            [sample_rows[i].params.logprobs or 0 for i in wanted])
            for i, entry in zip(wanted, entries, strict=True):
                self.last_logprobs.setdefault(sample_rows[i].seq_id, StepLogprobs()).sampled = entry
        return {row.seq_id: token for row, token in zip(sample_rows, tokens, strict=True)}

    def _prompt_logprobs(self, logits: torch.Tensor, prompt_rows: list[tuple[ScheduledSequence, int, int]]) -> None:
        """``prompt_rows[j]`` = (sequence, position p, token at p + 1): logits row j (computed at p)
        scores the prompt token at p + 1."""
        entries = self.sampler.logprobs(logits, [t for _, _, t in prompt_rows],
                                        [seq.params.prompt_logprobs or 0 for seq, _, _ in prompt_rows])
        for (seq, position, _), entry in zip(prompt_rows, entries, strict=True):
            self.last_logprobs.setdefault(seq.seq_id, StepLogprobs()).prompt.append((position + 1, entry))

    def _rows(self, slots: torch.Tensor) -> torch.Tensor:
        """Slot indices -> row indices of a layer's cache viewed as [2 * kv * slots, hd],
        in [2, kv, len(slots)] order."""
        return (self._row_base[:, None] + slots[None, :]).view(-1)

    def _prepare(
        self, batch: ScheduledBatch
    ) -> tuple[StepPlan, list[ScheduledSequence], list[tuple[ScheduledSequence, int, int]]]:
        bs = self.block_size
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        decode_tables: list[list[int]] = []
        decode_lens: list[int] = []
        prefills: list[tuple[int, int, int, list[int] | None]] = []
        logits_idx: list[int] = []
        sample_rows: list[ScheduledSequence] = []
        prompt_rows: list[tuple[ScheduledSequence, int, int]] = []
        prompt_idx: list[int] = []
        max_positions = self.model.max_positions
        num_blocks = self.num_blocks
        # decode sequences (one token) first, so the model addresses them as q[:B]
        ordered = sorted(batch.sequences, key=lambda s: len(s.token_ids) != 1)
        for seq in ordered:
            n = len(seq.token_ids)
            if n == 0:
                raise ValueError(f"sequence {seq.seq_id}: a scheduled chunk must have at least one token")
            start = len(ids)
            start_pos = seq.start_pos
            end_pos = start_pos + n
            if end_pos > max_positions:
                raise ValueError(
                    f"sequence {seq.seq_id}: position {end_pos - 1} exceeds max_model_len {max_positions}"
                )
            # the blocks of positions 0 .. end_pos-1: the whole context attention reads
            # (for a decode or a later chunk), ending with the ones written now
            table = seq.block_table[: (end_pos + bs - 1) // bs]
            if len(table) * bs < end_pos:
                raise ValueError(
                    f"sequence {seq.seq_id}: block_table covers {len(seq.block_table) * bs} positions, "
                    f"needs {end_pos}"
                )
            if max(table) >= num_blocks or min(table) < 0:
                raise ValueError(f"sequence {seq.seq_id}: block_table names a block outside [0, {num_blocks})")
            ids.extend(seq.token_ids)
            if n == 1:
                positions.append(start_pos)
                slots.append(table[start_pos // bs] * bs + start_pos % bs)
                decode_tables.append(list(table))
                decode_lens.append(end_pos)
            else:
                positions.extend(range(start_pos, end_pos))
                slots.extend(table[p // bs] * bs + p % bs for p in range(start_pos, end_pos))
                prefills.append((start, n, start_pos, list(table)))
            if seq.sample:
                logits_idx.append(start + n - 1)
                sample_rows.append(seq)
            if seq.params.prompt_logprobs is not None:
                # positions whose next token is a prompt token: their logits score it
                num_prompt = len(seq.history) - seq.num_generated
                for p in range(start_pos, min(end_pos, num_prompt - 1)):
                    prompt_idx.append(start + p - start_pos)
                    prompt_rows.append((seq, p, seq.history[p + 1]))
        if max(ids) >= self.model.vocab_size or min(ids) < 0:
            bad = next(t for t in ids if t < 0 or t >= self.model.vocab_size)
            raise ValueError(f"token id {bad} is outside the model's vocabulary [0, {self.model.vocab_size})")
        # sampling rows first, then the prompt-logprob rows
        plan = StepPlan(ids, positions, slots, decode_tables, decode_lens, prefills, logits_idx + prompt_idx)
        return plan, sample_rows, prompt_rows

    def _tensors(self, plan: StepPlan) -> tuple[torch.Tensor, StepMetadata]:
        """The step's tensors on this rank's device (every rank builds the same from the same plan)."""
        dev = self.device
        tables = plan.decode_tables + [t or [] for _, _, _, t in plan.prefills]
        width = max(len(t) for t in tables)
        token_seq = list(range(len(plan.decode_tables)))
        for i, (_, n, _, _) in enumerate(plan.prefills, start=len(plan.decode_tables)):
            token_seq.extend([i] * n)
        positions = torch.tensor(plan.positions, dtype=torch.long, device=dev)
        slots = torch.tensor(plan.slots, dtype=torch.long, device=dev)
        meta = StepMetadata(
            positions=positions,
            write_index=self._rows(slots),
            slots=slots,
            num_decode=len(plan.decode_tables),
            tables=torch.tensor([[*t, *[0] * (width - len(t))] for t in tables], dtype=torch.int32, device=dev),
            token_seq=torch.tensor(token_seq, dtype=torch.int32, device=dev),
            token_ctx=(positions + 1).to(torch.int32),
            logits_idx=torch.tensor(plan.logits_idx, dtype=torch.long, device=dev),
            block_size=self.block_size,
        )
        return torch.tensor(plan.ids, dtype=torch.long, device=dev), meta


log = logging.getLogger(__name__)

HUGE_PAGE = 2 << 20
MADV_HUGEPAGE = 14  # <asm-generic/mman-common.h>


@functools.cache
def _libc() -> Any:
    return ctypes.CDLL(None, use_errno=True)


def advise_huge_pages(t: torch.Tensor) -> int:
    """Ask Linux to back the 2 MiB-aligned interior of a CPU tensor's memory with transparent huge
    pages (``madvise(MADV_HUGEPAGE)``); returns the bytes advised (0 off Linux/CPU, for a tensor
    smaller than a huge page, or when the kernel refuses). Call it before the pages are first
    written: pages faulted in afterwards are huge ones at once.

    Why: decode attention reads each sequence's KV block by block, and a sequence's blocks are
    scattered through the cache (each append takes the next free block), so with 4 KiB pages
    every block (head_dim x block_size values of one head, 4 KiB in float32) is a TLB miss of
    its own; with the system's default ``madvise`` THP mode nothing is huge unless asked.
    Memory is unchanged: the whole cache is written at startup anyway (``_zeros``).
    ``FLEETSERVE_HUGE_PAGES=0`` in the environment turns it off."""
    if t.device.type != "cpu" or not sys.platform.startswith("linux") or os.environ.get("FLEETSERVE_HUGE_PAGES") == "0":
        return 0
    start = t.data_ptr()
    end = start + t.numel() * t.element_size()
    first = (start + HUGE_PAGE - 1) & ~(HUGE_PAGE - 1)
    last = end & ~(HUGE_PAGE - 1)
    if last <= first:
        return 0
    if _libc().madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), MADV_HUGEPAGE) != 0:
        log.info("madvise(MADV_HUGEPAGE) refused (errno %d): the KV cache stays on 4 KiB pages",
                 ctypes.get_errno())
        return 0
    return last - first


def _zeros(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Zero-filled tensor with every page written now, so it is resident (committed)
    at startup. A lazily mapped cache (calloc, torch.empty) would be committed by
    the first traffic instead, and a pod over its memory limit would be OOM-killed
    while serving rather than while starting. Zeros matter too: padded attention
    multiplies masked slots by 0, and 0 x NaN garbage would poison the sum.
    On CPU the memory is advised to be huge pages first (``advise_huge_pages``)."""
    out = torch.empty(shape, dtype=dtype, device=device)
    advise_huge_pages(out)
    out.zero_()  # a write to every page (calloc'd zeros would stay unmapped)
    return out
