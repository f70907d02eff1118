"""Token sampling for a whole batch at once: logits processing, greedy, temperature, top-k, top-p, min-p.

One batched path, no Python loop over rows or over the vocabulary:

1. logits processing (only when some row asks for it): ``logit_bias``,
   ``min_tokens`` (EOS and stop ids masked), repetition / presence /
   frequency penalties from the sequence's token history; then the
   ``response_format`` grammars: the constrained rows' ``next_mask`` bitmasks
   go into one int32 tensor and one kernel call sets every forbidden logit to
   -inf (``runner.grammar.apply_token_masks``); the grammar itself advances in
   the engine, with the token it accepts;
2. greedy rows take the argmax of the processed logits;
3. sampling rows with top-k or top-p cut the vocabulary with one ``topk`` to
   a bounded candidate set (``CANDIDATES`` tokens, or top_k if larger) and
   apply top-k, top-p and min-p inside it; the probabilities are the full
   softmax's (a ``logsumexp`` over the vocabulary), so the nucleus is exact
   whenever the candidates hold top_p of the mass — otherwise (a flat
   distribution) the batch falls back to sorting the full vocabulary;
   rows without a cut sample from the full vocabulary (min-p is a mask);
4. the pick is an exponential race (``argmax(p / E)``, E ~ Exp(1), the
   Gumbel-max trick) whose noise is counter-based: a hash of (row seed,
   position, token id). A seeded row therefore draws the same tokens whatever
   else is in the batch, after any preemption, on any device, with no
   per-sequence generator state to keep or free.

Rows without a seed use a seed derived from the runner's base seed and the
sequence id.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fleetserve_server.engine.errors import SequenceError
from fleetserve_server.engine.interfaces import ScheduledSequence, TokenLogprob
from fleetserve_server.engine.sampling_params import SamplingParams

# Candidate set for top-k / top-p: at temperature <= 1 a language model's top
# 256 tokens hold well over 0.9 of the mass; when they do not, the full sort runs.
CANDIDATES = 256

_MASK64 = (1 << 64) - 1


def _signed(value: int) -> int:
    value &= _MASK64
    return value - (1 << 64) if value >= 1 << 63 else value


_GOLDEN = _signed(0x9E3779B97F4A7C15)
_MIX1 = _signed(0xBF58476D1CE4E5B9)
_MIX2 = _signed(0x94D049BB133111EB)


def _shr(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's >> is arithmetic)."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def _splitmix64(x: torch.Tensor) -> torch.Tensor:
    """SplitMix64's finalizer on int64 tensors (wrapping arithmetic): a well-mixed 64-bit hash."""
    z = x + _GOLDEN
    z = (z ^ _shr(z, 30)) * _MIX1
    z = (z ^ _shr(z, 27)) * _MIX2
    return z ^ _shr(z, 31)


def exponential_noise(row_keys: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """Exp(1) noise [rows, n] as float32, a pure function of (row key, token id)."""
    z = _splitmix64(row_keys[:, None] ^ _splitmix64(token_ids))
    # top 53 bits -> uniform in (0, 1), never 0 (so -log(u) is finite)
    u = (_shr(z, 11).to(torch.float64) + 0.5) * (1.0 / (1 << 53))
    return (-torch.log(u)).to(torch.float32)


def row_seed(seq_id: int, params: SamplingParams, base_seed: int) -> int:
    if params.seed is not None:
        return params.seed
    return hash((base_seed, seq_id)) & 0x7FFF_FFFF_FFFF_FFFF


def distribution_stats(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of raw ``logits`` [S, vocab]: the log of the softmax's denominator (logsumexp)
    and the entropy, in nats, of the model's next-token distribution (temperature 1, before
    penalties and masks: a property of the model and the context, not of the request's
    sampling parameters). One pass of exp over the batch: H = lse - sum(p * logit).

    The output-quality metrics average these over a request's generated tokens: a damaged
    model (a bad quantization, a wrong checkpoint or chat template) shifts them."""
    x = logits.float()
    top = x.amax(dim=-1, keepdim=True)
    e = torch.sub(x, top).exp_()
    total = e.sum(dim=-1)
    expected = e.mul_(x).sum(dim=-1) / total  # sum(p * logit)
    lse = top.squeeze(-1) + total.log()
    return lse, lse - expected


def token_stats(logits: torch.Tensor, lse: torch.Tensor, entropy: torch.Tensor,
                tokens: list[int]) -> list[tuple[float, float]]:
    """``(log-probability of the chosen token, entropy)`` per row; ``logits`` rows hold the raw
    logit of each chosen token (masking in place only ever sets *forbidden* tokens to -inf)."""
    chosen = logits.gather(1, torch.tensor(tokens, device=logits.device)[:, None]).squeeze(1).float()
    return list(zip((chosen - lse).tolist(), entropy.tolist(), strict=True))


class Sampler:
    """Turns a [S, vocab] float32 logits matrix into one token per row."""

    def __init__(self, device: torch.device, base_seed: int = 0, eos_token_ids: frozenset[int] = frozenset()) -> None:
        self.device = device
        self.base_seed = base_seed
        self.eos_token_ids = eos_token_ids

    def release(self, seq_id: int) -> None:
        """Nothing to forget: the noise is counter-based (kept for the runner's interface)."""

    def sample(self, logits: torch.Tensor, rows: Sequence[ScheduledSequence]) -> list[int]:
        """One token per row. The runner reads a row's raw distribution from ``logits`` afterwards
        when that row asks for logprobs: such rows are never changed in place (the rows of a grammar
        are masked in place only when none of them asks for logprobs, saving a copy of the batch)."""
        params = [r.params for r in rows]
        processed = any(p.needs_logits_processing for p in params)
        if processed:
            logits = self.process_logits(logits, rows)
        constrained = [i for i, r in enumerate(rows) if r.grammar is not None]
        if constrained:
            copy = not processed and any(params[i].logprobs is not None for i in constrained)
            logits = self.mask_logits(logits.clone() if copy else logits, rows, constrained)
        sampling = [i for i, p in enumerate(params) if not p.greedy]
        if len(sampling) < len(rows):
            out = logits.argmax(dim=-1).tolist()
        else:
            out = [0] * len(rows)  # every row samples: skip the argmax pass over the vocabulary
        if not sampling:
            return out
        # Two groups at most: rows that cut the vocabulary (top-k / top-p) and rows that do not.
        cut = [i for i in sampling if params[i].top_k > 0 or params[i].top_p < 1.0]
        full = [i for i in sampling if not (params[i].top_k > 0 or params[i].top_p < 1.0)]
        for group, picker in ((cut, self._sample_cut), (full, self._sample_full)):
            if group:
                tokens = picker(logits, rows, group)
                for i, token in zip(group, tokens.tolist(), strict=True):
                    out[i] = token
        return out

    @staticmethod
    def logprobs(logits: torch.Tensor, token_ids: list[int], top_n: list[int]) -> list[TokenLogprob]:
        """Log-softmax of the raw ``logits`` rows (the model's distribution, before temperature,
        penalties and masks, as OpenAI and vLLM report it): each row's ``token_ids`` entry and
        its ``top_n`` most likely tokens."""
        if not token_ids:
            return []
        lp = torch.log_softmax(logits.float(), dim=-1)
        chosen = lp.gather(1, torch.tensor(token_ids, device=lp.device)[:, None]).squeeze(1).tolist()
        k = max(top_n)
        top_vals: list[list[float]] = [[] for _ in token_ids]
        top_ids: list[list[int]] = [[] for _ in token_ids]
        if k:
            values, ids = torch.topk(lp, k, dim=-1)
            top_vals, top_ids = values.tolist(), ids.tolist()
        return [TokenLogprob(token_id=t, logprob=c, top=tuple(zip(top_ids[i][:n], top_vals[i][:n], strict=True)))
                for i, (t, c, n) in enumerate(zip(token_ids, chosen, top_n, strict=True))]

    # ---- logits processing ---------------------------------------------------

    @staticmethod
    def mask_logits(logits: torch.Tensor, rows: Sequence[ScheduledSequence], constrained: list[int]) -> torch.Tensor:
        """In place: -inf for every token the row's grammar forbids next (rows ``constrained``).

        A row whose mask does not fit the vocabulary fails alone (``SequenceError``, raised
        before anything is drawn)."""
        from fleetserve_server.runner.grammar import apply_token_masks  # xgrammar: only with response_format

        width = (logits.shape[-1] + 31) // 32
        masks = [rows[i].grammar.next_mask for i in constrained]  # type: ignore[union-attr]
        bad = [rows[i].seq_id for i, m in zip(constrained, masks, strict=True)
               if not isinstance(m, torch.Tensor) or m.dtype != torch.int32 or tuple(m.shape) != (1, width)]
        if bad:
            raise SequenceError(bad, f"the response_format mask does not fit the model's vocabulary "
                                     f"({logits.shape[-1]} tokens)")
        apply_token_masks(logits, masks, constrained)
        return logits

    def process_logits(self, logits: torch.Tensor, rows: Sequence[ScheduledSequence]) -> torch.Tensor:
        """Bias, min_tokens masks and penalties, applied to a copy of ``logits``."""
        logits = logits.clone()
        vocab = logits.shape[-1]
        dev = logits.device
        bias_rows: list[int] = []
        bias_ids: list[int] = []
        bias_vals: list[float] = []
        mask_rows: list[int] = []
        mask_ids: list[int] = []
        for i, r in enumerate(rows):
            p = r.params
            for token, bias in p.logit_bias:
                if token < vocab:
                    bias_rows.append(i)
                    bias_ids.append(token)
                    bias_vals.append(bias)
            if p.min_tokens and r.num_generated < p.min_tokens:
                banned = set(p.stop_token_ids) | (set() if p.ignore_eos else set(self.eos_token_ids))
                for token in banned:
                    if token < vocab:
                        mask_rows.append(i)
                        mask_ids.append(token)
        if bias_rows:
            index = (torch.tensor(bias_rows, device=dev), torch.tensor(bias_ids, device=dev))
            logits.index_put_(index, torch.tensor(bias_vals, device=dev, dtype=logits.dtype), accumulate=True)
        penalized = [i for i, r in enumerate(rows) if r.params.has_penalties]
        if penalized:
            self._apply_penalties(logits, rows, penalized)
        if mask_rows:
            logits[torch.tensor(mask_rows, device=dev), torch.tensor(mask_ids, device=dev)] = float("-inf")
        return logits

    @staticmethod
    def _apply_penalties(logits: torch.Tensor, rows: Sequence[ScheduledSequence], penalized: list[int]) -> None:
        """Repetition (HF: divide positive / multiply negative logits of every token seen in prompt or
        output), then presence and frequency (OpenAI: subtract, over the output's token counts)."""
        dev, vocab = logits.device, logits.shape[-1]
        n = len(penalized)
        histories = [list(rows[i].history) for i in penalized]
        width = max(1, max(len(h) for h in histories))
        ids = torch.zeros(n, width, dtype=torch.long)
        is_output = torch.zeros(n, width, dtype=torch.bool)
        valid = torch.zeros(n, width, dtype=torch.bool)
        for j, (i, h) in enumerate(zip(penalized, histories, strict=True)):
            if h:
                ids[j, : len(h)] = torch.tensor(h, dtype=torch.long).clamp_(0, vocab - 1)
                valid[j, : len(h)] = True
                num_prompt = len(h) - rows[i].num_generated
                is_output[j, num_prompt : len(h)] = True
        ids, is_output, valid = ids.to(dev), is_output.to(dev), valid.to(dev)
        counts = torch.zeros(n, vocab, dtype=logits.dtype, device=dev)
        counts.scatter_add_(1, ids, is_output.to(logits.dtype))
        seen = torch.zeros(n, vocab, dtype=torch.bool, device=dev)
        seen.scatter_(1, ids, valid)
        index = torch.tensor(penalized, device=dev)
        sub = logits[index]
        params = [rows[i].params for i in penalized]
        rep = torch.tensor([p.repetition_penalty for p in params], dtype=logits.dtype, device=dev)[:, None]
        penalized_logits = torch.where(sub > 0, sub / rep, sub * rep)
        sub = torch.where(seen, penalized_logits, sub)
        presence = torch.tensor([p.presence_penalty for p in params], dtype=logits.dtype, device=dev)[:, None]
        frequency = torch.tensor([p.frequency_penalty for p in params], dtype=logits.dtype, device=dev)[:, None]
        sub = sub - presence * (counts > 0).to(logits.dtype) - frequency * counts
        logits[index] = sub

    # ---- sampling --------------------------------------------------------------

    def _row_keys(self, rows: Sequence[ScheduledSequence], group: list[int], device: torch.device) -> torch.Tensor:
        """One int64 key per row from its seed and the position it samples (so every step draws anew)."""
        keys = []
        for i in group:
            r = rows[i]
            position = r.start_pos + len(r.token_ids)
            keys.append(_signed(row_seed(r.seq_id, r.params, self.base_seed) * 0x100000001B3 + position))
        return _splitmix64(torch.tensor(keys, dtype=torch.long, device=device))

    def _sample_full(self, logits: torch.Tensor, rows: Sequence[ScheduledSequence], group: list[int]) -> torch.Tensor:
        """Rows without top-k / top-p: softmax over the whole vocabulary, min-p as a mask."""
        dev = logits.device
        index = torch.tensor(group, device=dev)
        temps = torch.tensor([rows[i].params.temperature for i in group], dtype=logits.dtype, device=dev)
        probs = torch.softmax(logits[index] / temps[:, None], dim=-1)
        min_p = torch.tensor([rows[i].params.min_p for i in group], dtype=logits.dtype, device=dev)
        if bool((min_p > 0).any()):
            probs = probs.masked_fill(probs < min_p[:, None] * probs.max(dim=-1, keepdim=True).values, 0.0)
        vocab_ids = torch.arange(logits.shape[-1], device=dev)
        noise = exponential_noise(self._row_keys(rows, group, dev), vocab_ids)
        return torch.argmax(probs / noise, dim=-1)

    def _sample_cut(self, logits: torch.Tensor, rows: Sequence[ScheduledSequence], group: list[int]) -> torch.Tensor:
        dev, vocab = logits.device, logits.shape[-1]
        # every row in the group (the common case): no gather copy of the logits
        sub = logits if len(group) == logits.shape[0] else logits[torch.tensor(group, device=dev)]
        params = [rows[i].params for i in group]
        inv_temp = torch.tensor([1.0 / p.temperature for p in params], dtype=logits.dtype, device=dev)[:, None]
        top_k = torch.tensor([p.top_k for p in params], device=dev)
        top_p = torch.tensor([p.top_p for p in params], dtype=logits.dtype, device=dev)
        min_p = torch.tensor([p.min_p for p in params], dtype=logits.dtype, device=dev)
        k = min(vocab, max(CANDIDATES, max(p.top_k for p in params)))
        # temperature is a positive per-row scale: the order of the raw logits is the order of the
        # scaled ones, so the cut runs on the raw logits and only k values per row get scaled.
        top = sub.max(dim=-1, keepdim=True).values
        # log of the full softmax's denominator, relative to the max (see _logsumexp on the clamp)
        log_denominator = torch.sub(sub, top).mul_(inv_temp).clamp_(min=-80.0).exp_().sum(dim=-1, keepdim=True).log_()
        while True:
            values, ids = torch.topk(sub, k, dim=-1)  # sorted, descending
            probs = ((values - top) * inv_temp - log_denominator).exp_()  # the full softmax's probabilities
            # top-k, then renormalize (as HF and vLLM do) before top-p
            rank = torch.arange(k, device=dev)
            probs = probs.masked_fill((top_k[:, None] > 0) & (rank[None, :] >= top_k[:, None]), 0.0)
            mass = probs.sum(dim=-1, keepdim=True)
            probs = probs / torch.where(top_k[:, None] > 0, mass, torch.ones_like(mass))
            cumulative = probs.cumsum(dim=-1)
            # Rows without top-k whose candidates hold less than top_p: the nucleus reaches past
            # them, so sort the whole vocabulary (rare: a very flat distribution).
            short = (top_k == 0) & (top_p < 1.0) & (cumulative[:, -1] < top_p)
            if k == vocab or not bool(short.any()):
                break
            k = vocab
        # keep the smallest prefix whose mass reaches top_p (always at least the first token)
        probs = probs.masked_fill((cumulative - probs) >= top_p[:, None], 0.0)
        probs = probs.masked_fill(probs < min_p[:, None] * probs[:, :1], 0.0)
        noise = exponential_noise(self._row_keys(rows, group, dev), ids)
        choice = torch.argmax(probs / noise, dim=-1, keepdim=True)
        return ids.gather(1, choice).squeeze(1)
