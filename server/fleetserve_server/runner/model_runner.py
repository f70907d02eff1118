"""``TorchModelRunner``: the engine's ``ModelRunner`` over ``PagedCausalLM``.

Owns the paged KV cache tensor and the sampler. Per step it turns a
``ScheduledBatch`` into flat tensors (one ``torch.tensor`` call per field),
runs one forward, and samples only for the sequences that ask for a token —
logits are computed for those rows alone (the lm_head over a 49k vocabulary
is the costliest matmul of a decode step).
"""

from __future__ import annotations

import torch

from fleetserve_server.engine.interfaces import ScheduledBatch, ScheduledSequence
from fleetserve_server.runner.model import PagedCausalLM, StepMetadata
from fleetserve_server.runner.sampler import Sampler


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
    ) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"num_blocks and block_size must be >= 1, got {num_blocks}, {block_size}")
        self.model = model
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.eos_token_ids = frozenset(eos_token_ids)
        self.device = model.device
        self.vocab_size = model.vocab_size
        self.kv_cache = _zeros(
            (model.num_layers, 2, model.num_kv_heads, num_blocks * block_size, model.head_dim),
            model.dtype, self.device,
        )
        self.sampler = Sampler(self.device, base_seed=seed)
        self._row_base = torch.arange(2 * model.num_kv_heads, device=self.device) * (num_blocks * block_size)
        self._neg_inf = torch.finfo(model.dtype).min

    @property
    def kv_cache_bytes(self) -> int:
        return self.kv_cache.numel() * self.kv_cache.element_size()

    def release(self, seq_id: int) -> None:
        self.sampler.release(seq_id)

    def warmup(self) -> None:
        """Run one two-token prefill and one decode on block 0 (overwritten later)."""
        from fleetserve_server.engine.sampling_params import SamplingParams

        greedy = SamplingParams(max_tokens=1, temperature=0.0)
        first = ScheduledSequence(-1, [0, 0], 0, [0], True, greedy)
        self.execute(ScheduledBatch([first]))
        self.execute(ScheduledBatch([ScheduledSequence(-1, [0], 2, [0], True, greedy)]))
        self.release(-1)

    @torch.inference_mode()
    def execute(self, batch: ScheduledBatch) -> dict[int, int]:
        if not batch.sequences:
            return {}
        input_ids, meta, sample_ids, sample_params = self._prepare(batch)
        logits = self.model(input_ids, meta, self.kv_cache)
        if not sample_ids:
            return {}
        tokens = self.sampler.sample(logits, sample_ids, sample_params)
        return dict(zip(sample_ids, tokens, strict=True))

    def _rows(self, slots: torch.Tensor) -> torch.Tensor:
        """Slot indices -> row indices of a layer's cache viewed as [2 * kv * slots, hd],
        in [2, kv, len(slots)] order."""
        return (self._row_base[:, None] + slots[None, :]).view(-1)

    def _prepare(self, batch: ScheduledBatch):  # type: ignore[no-untyped-def]
        bs = self.block_size
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        decode_slots: list[list[int]] = []
        prefills: list[tuple[int, int, int, list[int] | None]] = []
        logits_idx: list[int] = []
        sample_ids: list[int] = []
        sample_params = []
        # decode sequences (one token) first, so the model addresses them as q[:B]
        ordered = sorted(batch.sequences, key=lambda s: len(s.token_ids) != 1)
        for seq in ordered:
            n = len(seq.token_ids)
            if n == 0:
                raise ValueError(f"sequence {seq.seq_id}: a scheduled chunk must have at least one token")
            start = len(ids)
            end_pos = seq.start_pos + n
            if end_pos > self.model.max_positions:
                raise ValueError(
                    f"sequence {seq.seq_id}: position {end_pos - 1} exceeds max_model_len "
                    f"{self.model.max_positions}"
                )
            table = seq.block_table
            if len(table) * bs < end_pos:
                raise ValueError(
                    f"sequence {seq.seq_id}: block_table covers {len(table) * bs} positions, needs {end_pos}"
                )
            if max(table) >= self.num_blocks or min(table) < 0:
                raise ValueError(f"sequence {seq.seq_id}: block_table names a block outside [0, {self.num_blocks})")
            ids.extend(seq.token_ids)
            positions.extend(range(seq.start_pos, end_pos))
            # slots of positions 0 .. end_pos-1: the whole context attention reads
            # (for a decode or a later chunk) ending with the ones written now
            seq_slots = [blk * bs + off for blk in table[: (end_pos + bs - 1) // bs] for off in range(bs)]
            del seq_slots[end_pos:]
            slots.extend(seq_slots[seq.start_pos :])
            if n == 1:
                decode_slots.append(seq_slots)
            else:
                prefills.append((start, n, seq.start_pos, seq_slots if seq.start_pos else None))
            if seq.sample:
                logits_idx.append(start + n - 1)
                sample_ids.append(seq.seq_id)
                sample_params.append(seq.params)
        dev = self.device
        if max(ids) >= self.model.vocab_size or min(ids) < 0:
            bad = next(t for t in ids if t < 0 or t >= self.model.vocab_size)
            raise ValueError(f"token id {bad} is outside the model's vocabulary [0, {self.model.vocab_size})")
        dindex = dmask = None
        if decode_slots:
            width = max(len(t) for t in decode_slots)
            lens = torch.tensor([len(t) for t in decode_slots], device=dev)
            dslots = torch.tensor([t + [0] * (width - len(t)) for t in decode_slots], dtype=torch.long, device=dev)
            dmask = torch.zeros(len(decode_slots), 1, width, dtype=self.model.dtype, device=dev)
            dmask.masked_fill_((torch.arange(width, device=dev)[None, :] >= lens[:, None])[:, None, :], self._neg_inf)
            dindex = self._rows(dslots.view(-1))
        meta = StepMetadata(
            positions=torch.tensor(positions, dtype=torch.long, device=dev),
            write_index=self._rows(torch.tensor(slots, dtype=torch.long, device=dev)),
            num_decode=len(decode_slots),
            decode_index=dindex,
            decode_mask=dmask,
            prefills=[
                (s, n, sp, None if t is None else self._rows(torch.tensor(t, dtype=torch.long, device=dev)))
                for s, n, sp, t in prefills
            ],
            logits_idx=torch.tensor(logits_idx, dtype=torch.long, device=dev),
        )
        return torch.tensor(ids, dtype=torch.long, device=dev), meta, sample_ids, sample_params

def _zeros(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Zero-filled tensor. On CPU it comes from calloc'd (lazily mapped) pages, so
    a large, mostly idle KV cache costs resident memory only for blocks in use;
    zeros matter: padded attention multiplies masked slots by 0, and 0 x NaN
    garbage would poison the sum."""
    if device.type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    import numpy as np

    numel = 1
    for dim in shape:
        numel *= dim
    itemsize = torch.empty((), dtype=dtype).element_size()
    raw = torch.from_numpy(np.zeros(numel * itemsize, dtype=np.uint8))
    return raw.view(dtype).view(shape)
