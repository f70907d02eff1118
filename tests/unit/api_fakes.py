"""A fake engine and tokenizer for the HTTP layer's unit tests.

The fake implements ``EngineClient`` the way the real ``AsyncEngine`` behaves
at its boundary: admission errors on the first ``anext``, one delta per step,
stop strings cut from the text, a final delta with timings, abort ending the
stream with ``finish_reason="abort"``, and KV blocks held per running request.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator

from fleetserve_server.api.state import ModelInfo
from fleetserve_server.engine.errors import QueueFullError, RequestValidationError
from fleetserve_server.engine.interfaces import EngineStats, RequestOutputDelta
from fleetserve_server.engine.sampling_params import SamplingParams

GREEDY_TEXT = "the quick brown fox jumps over the lazy dog. "
ALPHABET = "abcdefghijklmnopqrstuvwxyz "


class FakeTokenizer:
    """One token per character (ids = code points mod 256); a tiny chat template."""

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return [ord(c) % 256 for c in text]

    def apply_chat_template(self, conversation, tokenize=False, add_generation_prompt=False, **_):  # type: ignore[no-untyped-def]
        text = "".join(f"<{m['role']}>{m['content']}\n" for m in conversation)
        return text + ("<assistant>" if add_generation_prompt else "")

    def __len__(self) -> int:
        return 256


class FakeEngine:
    """Generates one character per step (``step_s`` apart): greedy text is fixed, seeded text is random."""

    def __init__(self, *, step_s: float = 0.001, max_queue_length: int | None = None,
                 max_num_seqs: int = 8, block_size: int = 4, num_blocks: int = 256) -> None:
        self.step_s = step_s
        self.max_queue_length = max_queue_length
        self.max_num_seqs = max_num_seqs
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.blocks_used: dict[str, int] = {}
        self.waiting: list[str] = []
        self.aborted: set[str] = set()
        self.abort_calls: list[str] = []
        self.finished: list[str] = []
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.batch_sizes: list[int] = []
        self.dead = False

    async def generate(self, request_id: str, prompt: str | list[int],
                       params: SamplingParams) -> AsyncIterator[RequestOutputDelta]:
        arrival = time.monotonic()
        if self.max_queue_length is not None and len(self.waiting) >= self.max_queue_length:
            raise QueueFullError(f"{len(self.waiting)} requests are waiting", retry_after=2.5)
        if isinstance(prompt, list) and 0 in prompt:
            raise RequestValidationError("prompt: token id 0 is reserved", param="prompt")
        n_prompt = len(prompt)
        self.waiting.append(request_id)
        try:
            while len(self.blocks_used) >= self.max_num_seqs and request_id not in self.aborted:
                await asyncio.sleep(self.step_s)
        finally:
            self.waiting.remove(request_id)
        scheduled = time.monotonic()
        self.blocks_used[request_id] = -(-n_prompt // self.block_size)
        self.prompt_tokens += n_prompt
        rng = random.Random(params.seed) if params.seed is not None else random.Random()
        full = "".join(GREEDY_TEXT[i % len(GREEDY_TEXT)] if params.greedy else rng.choice(ALPHABET)
                       for i in range(params.max_tokens))
        # Like a real engine, text that ends in a stop string is cut before it and never sent.
        hits = [full.index(s) + len(s) for s in params.stop if s in full]
        n_steps = min(hits) if hits else params.max_tokens
        visible = full[: n_steps - len(next(s for s in params.stop if full.index(s) + len(s) == n_steps))] \
            if hits else full
        first_token_at: float | None = None
        try:
            for i in range(n_steps):
                await asyncio.sleep(self.step_s)
                self.batch_sizes.append(len(self.blocks_used))
                if request_id in self.aborted:
                    yield self._final(request_id, "", "abort", n_prompt, i, arrival, scheduled, first_token_at)
                    return
                first_token_at = first_token_at or time.monotonic()
                self.generation_tokens += 1
                self.blocks_used[request_id] = -(-(n_prompt + i + 1) // self.block_size)
                ch = visible[i] if i < len(visible) else ""
                if i + 1 == n_steps:
                    yield self._final(request_id, ch, "stop" if hits else "length", n_prompt, n_steps, arrival,
                                      scheduled, first_token_at)
                    return
                if ch:
                    yield RequestOutputDelta(request_id=request_id, text=ch, token_ids=[ord(ch)])
        finally:
            self.blocks_used.pop(request_id, None)
            self.finished.append(request_id)

    def _final(self, request_id: str, text: str, reason: str, n_prompt: int, n_out: int, arrival: float,
               scheduled: float, first: float | None) -> RequestOutputDelta:
        now = time.monotonic()
        return RequestOutputDelta(
            request_id=request_id, text=text, token_ids=[ord(c) for c in text], finish_reason=reason,  # type: ignore[arg-type]
            prompt_tokens=n_prompt, completion_tokens=n_out, queue_time=scheduled - arrival,
            time_to_first_token=(first - arrival) if first else None, e2e_latency=now - arrival)

    async def abort(self, request_id: str) -> None:
        self.abort_calls.append(request_id)
        self.aborted.add(request_id)

    async def check_health(self) -> None:
        if self.dead:
            raise RuntimeError("engine loop stopped")

    def stats(self) -> EngineStats:
        used = sum(self.blocks_used.values())
        sizes, self.batch_sizes = self.batch_sizes, []
        return EngineStats(
            requests_waiting=len(self.waiting), requests_running=len(self.blocks_used),
            kv_blocks_total=self.num_blocks, kv_blocks_free=self.num_blocks - used,
            kv_cache_usage_ratio=used / self.num_blocks, kv_capacity_tokens=self.num_blocks * self.block_size,
            prefix_cache_queries_tokens=self.prompt_tokens, prefix_cache_hits_tokens=0,
            preemptions=0, prompt_tokens=self.prompt_tokens, generation_tokens=self.generation_tokens,
            recent_batch_sizes=sizes)


MODEL = ModelInfo(served_name="fake-model", max_model_len=256, quantization="none", dtype="float32",
                  source="fake:model", engine_config={"block_size": 4})
