"""Token sampling: greedy, temperature, top-k, top-p, per-request seeds.

Each sampling sequence draws its randomness from its own ``torch.Generator``,
keyed by ``seq_id`` and kept until the sequence is released, so a seeded
request produces the same tokens whatever else shares the batch and however
often it is preempted (a recomputation samples nothing new). Requests without
a seed get a generator seeded from the runner's base seed and their seq_id.
"""

from __future__ import annotations

import torch

from fleetserve_server.engine.sampling_params import SamplingParams


class Sampler:
    """Turns a [S, vocab] float32 logits matrix into one token per row."""

    def __init__(self, device: torch.device, base_seed: int = 0) -> None:
        self.device = device
        self.base_seed = base_seed
        self._generators: dict[int, torch.Generator] = {}

    def release(self, seq_id: int) -> None:
        self._generators.pop(seq_id, None)

    def _generator(self, seq_id: int, params: SamplingParams) -> torch.Generator:
        gen = self._generators.get(seq_id)
        if gen is None:
            seed = params.seed if params.seed is not None else hash((self.base_seed, seq_id)) & 0x7FFF_FFFF
            gen = torch.Generator(device=self.device)
            gen.manual_seed(seed)
            self._generators[seq_id] = gen
        return gen

    def sample(self, logits: torch.Tensor, seq_ids: list[int], params: list[SamplingParams]) -> list[int]:
        greedy_tokens = logits.argmax(dim=-1)
        if all(p.greedy for p in params):
            return greedy_tokens.tolist()
        out = greedy_tokens.tolist()
        for row, (seq_id, p) in enumerate(zip(seq_ids, params, strict=True)):
            if p.greedy:
                continue
            probs = _filtered_probs(logits[row], p)
            # Exponential race (Gumbel-max equivalent): argmax(p / E), E ~ Exp(1).
            noise = torch.empty_like(probs).exponential_(1.0, generator=self._generator(seq_id, p))
            out[row] = int(torch.argmax(probs / noise))
        return out


def _filtered_probs(row: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """Softmax of ``row / temperature`` restricted to the top-k and the top-p nucleus."""
    scaled = row / p.temperature
    if p.top_k and p.top_k < scaled.shape[-1]:
        kth = torch.topk(scaled, p.top_k).values[-1]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    probs = torch.softmax(scaled, dim=-1)
    if p.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        cumulative = sorted_probs.cumsum(-1)
        # keep the smallest prefix whose mass reaches top_p (always at least one token)
        drop_sorted = (cumulative - sorted_probs) >= p.top_p
        drop = torch.zeros_like(drop_sorted).scatter_(0, order, drop_sorted)
        probs = probs.masked_fill(drop, 0.0)
    return probs
