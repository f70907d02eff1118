"""A deterministic pure-Python model and a byte tokenizer for engine tests.

``ToyModelRunner`` honours the ``ModelRunner`` protocol over a real paged
"KV cache": for every position it stores the token and its position in the
block slot the engine's block table names, and it predicts the next token
from the context it *reads back from those slots*. A wrong block table, a
wrong ``start_pos``, a shared block with other tokens, or KV the engine
claims is cached but never was, therefore changes the output (or raises
``KVCacheViolation``) — unlike a stub, it can make engine tests fail.

``toy_generate`` computes the same model without any cache, one request at a
time: the reference the engine's batched output must equal.
"""

from __future__ import annotations

import random
import time

from fleetserve_server.engine.interfaces import ScheduledBatch
from fleetserve_server.engine.sampling_params import SamplingParams

EOS_TOKEN_ID = 256
VOCAB_SIZE = 257
_ALPHABET = b"abcdefghijklmnopqrstuvwxyz ."
_MASK = (1 << 64) - 1


class KVCacheViolation(AssertionError):
    """The engine asked the runner to read KV that was never written where it said."""


def _context_hash(tokens: list[int]) -> int:
    h = 0xCBF29CE484222325
    for t in tokens:
        h = ((h ^ (t + 1)) * 0x100000001B3) & _MASK
    return h ^ (h >> 29)


def toy_next_token(context: list[int], *, eos_period: int, rng: random.Random | None = None) -> int:
    """The toy model: a function of the whole context (and, when sampling, one draw of ``rng``)."""
    h = _context_hash(context)
    if eos_period and (h >> 17) % eos_period == 0:
        return EOS_TOKEN_ID
    offset = rng.randrange(len(_ALPHABET)) if rng is not None else 0
    return _ALPHABET[(h + offset) % len(_ALPHABET)]


def _rng_for(params: SamplingParams) -> random.Random | None:
    if params.greedy:
        return None
    return random.Random(params.seed)


def toy_generate(prompt_token_ids: list[int], params: SamplingParams, *, eos_period: int = 0) -> list[int]:
    """Reference generation without a KV cache: the tokens the engine must produce
    (including the EOS or stop token that ends it, as the engine reports them)."""
    tokens = list(prompt_token_ids)
    rng = _rng_for(params)
    out: list[int] = []
    while len(out) < params.max_tokens:
        token = toy_next_token(tokens, eos_period=eos_period, rng=rng)
        tokens.append(token)
        out.append(token)
        if (token == EOS_TOKEN_ID and not params.ignore_eos) or token in params.stop_token_ids:
            break
    return out


class ToyModelRunner:
    """Pure-Python ``ModelRunner`` whose output depends on the paged KV it stored.

    ``tokens_computed`` counts positions written (prefix-cache hits lower it);
    ``delay_seconds`` makes each ``execute`` take that long, for tests that
    need a request to be in flight.
    """

    eos_token_ids: frozenset[int] = frozenset({EOS_TOKEN_ID})
    vocab_size = VOCAB_SIZE

    def __init__(self, num_blocks: int, block_size: int, *, eos_period: int = 0, delay_seconds: float = 0.0):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.eos_period = eos_period
        self.delay_seconds = delay_seconds
        self.kv: list[list[tuple[int, int] | None]] = [[None] * block_size for _ in range(num_blocks)]
        self.rngs: dict[int, random.Random | None] = {}
        self.tokens_computed = 0
        self.batches: list[list[tuple[int, int, int, bool]]] = []  # (seq_id, start, n, sample) per step
        self.released: list[int] = []

    def _slot(self, block_table: tuple[int, ...] | list[int], pos: int, seq_id: int) -> tuple[int, int]:
        index = pos // self.block_size
        if index >= len(block_table):
            raise KVCacheViolation(f"seq {seq_id}: position {pos} beyond its block table {list(block_table)}")
        block = block_table[index]
        if not 0 <= block < self.num_blocks:
            raise KVCacheViolation(f"seq {seq_id}: block id {block} out of range")
        return block, pos % self.block_size

    def execute(self, batch: ScheduledBatch) -> dict[int, int]:
        if self.delay_seconds:
            time.sleep(self.delay_seconds)
        seen: set[int] = set()
        contexts: dict[int, list[int]] = {}
        # 1. everything before start_pos must already be in the cache (written by an earlier step)
        for s in batch.sequences:
            if s.seq_id in seen:
                raise KVCacheViolation(f"seq {s.seq_id} appears twice in one batch")
            seen.add(s.seq_id)
            if not s.token_ids:
                raise KVCacheViolation(f"seq {s.seq_id}: empty chunk")
            context = []
            for pos in range(s.start_pos):
                block, slot = self._slot(s.block_table, pos, s.seq_id)
                entry = self.kv[block][slot]
                if entry is None or entry[1] != pos:
                    raise KVCacheViolation(f"seq {s.seq_id}: no KV for position {pos} in block {block} slot {slot}")
                context.append(entry[0])
            contexts[s.seq_id] = context
        # 2. write this step's KV
        for s in batch.sequences:
            for i, token in enumerate(s.token_ids):
                block, slot = self._slot(s.block_table, s.start_pos + i, s.seq_id)
                self.kv[block][slot] = (token, s.start_pos + i)
            self.tokens_computed += len(s.token_ids)
        self.batches.append([(s.seq_id, s.start_pos, len(s.token_ids), s.sample) for s in batch.sequences])
        # 3. sample
        out: dict[int, int] = {}
        for s in batch.sequences:
            if not s.sample:
                continue
            if s.seq_id not in self.rngs:
                self.rngs[s.seq_id] = _rng_for(s.params)
            context = contexts[s.seq_id] + list(s.token_ids)
            out[s.seq_id] = toy_next_token(context, eos_period=self.eos_period, rng=self.rngs[s.seq_id])
        return out

    def release(self, seq_id: int) -> None:
        self.rngs.pop(seq_id, None)
        self.released.append(seq_id)


class ByteTokenizer:
    """Every UTF-8 byte is a token (0..255); 256 is EOS (``<eos>``, a special token)."""

    eos_token_id = EOS_TOKEN_ID

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, token_ids: list[int], *, skip_special_tokens: bool = False) -> str:
        parts: list[str] = []
        buf = bytearray()
        for t in token_ids:
            if t < 256:
                buf.append(t)
            elif not skip_special_tokens:
                parts.append(buf.decode("utf-8", errors="replace"))
                buf.clear()
                parts.append("<eos>")
        parts.append(buf.decode("utf-8", errors="replace"))
        return "".join(parts)

    def __len__(self) -> int:
        return VOCAB_SIZE
